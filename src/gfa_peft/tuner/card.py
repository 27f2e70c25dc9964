"""The GFA section of a saved adapter's model card (README.md), so a folder shared alone says what it is.

PEFT's `PeftModel.save_pretrained` writes a generic card (library, base model, PEFT version) at the top of the
save folder, then saves each adapter's weights and, last, its config (`GfaConfig.save_pretrained`). PEFT offers
no hook for a method's own card text, so the config's save adds this section: into the card PEFT just wrote, or
into a new card in a named adapter's subfolder, where PEFT writes none. The section sits between two markers and
is replaced on every save, so saving again into the same folder leaves one current section.
"""

from __future__ import annotations

import os
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from gfa_peft.layout import Layout
from gfa_peft.tuner.task_classes import TASK_MODEL_CLASSES

CARD_NAME = "README.md"
START = "<!-- gfa-peft: start of the GFA section, rewritten on every save -->"
END = "<!-- gfa-peft: end of the GFA section -->"
TAG = "gfa"



def write_card(directory: str, config, auto_mapping: Optional[dict] = None) -> None:
    """Put the GFA section of `config` (a GfaConfig) into `directory`'s README.md, creating the card if needed."""
    path = os.path.join(directory, CARD_NAME)
    if os.path.exists(path):
        card = ModelCard.load(path)
    else:
        data = ModelCardData(library_name="peft", base_model=config.base_model_name_or_path)
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# Adapter card\n")
    card.data.tags = sorted({*(card.data.tags or []), TAG})
    card.text = _with_section(card.text, gfa_section(config, auto_mapping))
    card.save(path)


def _with_section(text: str, section: str) -> str:
    """`text` with its GFA section replaced by `section`, or `section` added below the card's title."""
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        return before + block + rest.split(END, 1)[1]
    lines = text.splitlines()
    title = next((index for index, line in enumerate(lines) if line.startswith("# ")), -1)
    return "\n".join([*lines[: title + 1], "", block, "", *lines[title + 1:]])


def gfa_section(config, auto_mapping: Optional[dict] = None) -> str:
    """Markdown: what the adapter is, its layout and trainable count, how to install, load and merge it."""
    base = config.base_model_name_or_path or "BASE_MODEL"
    task = getattr(config.task_type, "value", config.task_type)
    if task in TASK_MODEL_CLASSES:
        model_class = TASK_MODEL_CLASSES[task].__name__
    elif auto_mapping and auto_mapping.get("parent_library", "").startswith("transformers"):
        model_class = auto_mapping["base_model_class"]
    else:
        model_class = "AutoModel"
    lines = [
        "## GFA adapter (gfa-peft)",
        "",
        "This is a **Global Factorized Adaptation (GFA)** adapter, a PEFT method provided by the `gfa-peft` "
        "package. The updates of all N adapted weight matrices are concatenated into one vector of length d, "
        "viewed as an m x k matrix (k = floor(sqrt d), m = ceil(d / k); with the aligned grid, k is the multiple of "
        "the modules' input width nearest sqrt d), and learnt as one product B A (B: m x r, A: r x k) shared by every "
        "module; each module adds s times its slice of B A (s = `scale`, or `scale` / sqrt(r) under the rsqrt rule; "
        "with module gains, times a learned gain of its own).",
        "",
    ]
    if config.layout is not None:
        layout = Layout.from_dict(config.layout)
        lines += [
            "| N (modules) | d | m | k | grid | r | s | module gains | trainable parameters |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {len(layout.modules)} | {layout.d} | {layout.m} | {layout.k} | {config.grid} | {config.r} | "
            f"{config.effective_scale:g} | {len(layout.modules) if config.module_gain else 'none'} | "
            f"{layout.trainable(config.r, config.module_gain)} |",
            "",
            f"Adapted modules, in layout order: `{layout.names[0]}` first, `{layout.names[-1]}` last "
            "(all of them, with shapes and offsets, are in `adapter_config.json`).",
        ]
    else:
        lines.append(f"r = {config.r}; the layout (N, d, m, k) is laid out when the adapter is created.")
    if config.modules_to_save:
        lines.append(f"Also trained and saved in full: `modules_to_save` = {sorted(config.modules_to_save)}.")
    lines += [
        "",
        "### Install and load",
        "",
        "```bash",
        "pip install gfa-peft",
        "```",
        "",
        "Once it is installed, any Python process that imports PEFT knows GFA (the package installs a start-up "
        "hook; with `GFA_PEFT_AUTOREGISTER=0` it does not, and `import gfa_peft` before loading registers GFA).",
        "",
        "```python",
        f"from transformers import {model_class}",
        "from peft import PeftModel",
        "",
        f"base = {model_class}.from_pretrained({base!r})",
        "model = PeftModel.from_pretrained(base, 'path/to/this/folder')",
        "```",
        "",
        "A plain checkpoint with the update merged in, which loads without PEFT: "
        "`gfa merge path/to/this/folder --base BASE_FOLDER --out MERGED_FOLDER`. transformers' own adapter "
        "loading (`from_pretrained` of this folder, `load_adapter`, `pipeline`) refuses GFA, as PEFT's "
        "`inject_adapter_in_model` refuses every method whose weights are shared between modules: use "
        "`PeftModel.from_pretrained` or `gfa merge`.",
    ]
    return "\n".join(lines)
