"""GFA is known to PEFT however and whenever PEFT is imported, and a saved folder's card describes the adapter.

Every check of registration runs in a fresh interpreter. The import-order checks use a stand-in `peft` package and
count the calls of `register_gfa`, so they take a fraction of a second; the checks that load real adapters import
torch, transformers and PEFT (several seconds each) and are few in the default run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import gfa_peft
from gfa_peft import GfaConfig
from gfa_peft.registration import AUTOREGISTER_VARIABLE
from gfa_peft.tuner.card import END, START
from toy_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SOURCE = str(ROOT / "src")
AUTOREGISTER_PTH = ROOT / "src" / "gfa-peft-autoregister.pth"


def run_python(script: str, python: str = sys.executable, autoregister: bool = False, cwd=None) -> str:
    """Run `script` in a fresh interpreter that finds this checkout's gfa_peft; its stdout (stderr on failure)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1"}
    environment.pop(AUTOREGISTER_VARIABLE, None)
    if not autoregister:  # an installed start-up hook would hide what an explicit `import gfa_peft` does
        environment[AUTOREGISTER_VARIABLE] = "0"
    done = subprocess.run([python, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=environment,
                          timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# --- import orders, with a stand-in peft -----------------------------------------------------------------------

STAND_IN_PEFT = "import sys\nEXECUTED = True\n"

PROBES = {
    "plain import": "",
    "find_spec first": "import importlib.util; assert importlib.util.find_spec('peft') is not None",
    "find_spec twice": "import importlib.util; importlib.util.find_spec('peft'); importlib.util.find_spec('peft')",
    "metadata first": "import importlib.metadata; importlib.metadata.version('peft')",
    "both probes, as transformers' is_peft_available does":
        "import importlib.util, importlib.metadata; importlib.util.find_spec('peft'); importlib.metadata.version('peft')",
}


@pytest.fixture(scope="module")
def stand_in_peft(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stand_in")
    (folder / "peft").mkdir()
    (folder / "peft" / "__init__.py").write_text(STAND_IN_PEFT)
    (folder / "peft" / "utils.py").write_text("")
    return folder


@pytest.mark.parametrize("importing", ["import peft", "from peft import utils", "import peft.utils"])
@pytest.mark.parametrize("probe", list(PROBES), ids=list(PROBES))
def test_the_hook_registers_once_right_after_peft_has_executed_whatever_probed_first(stand_in_peft, probe, importing):
    output = run_python(f"""
        import sys
        sys.path.insert(0, {str(stand_in_peft)!r})
        import gfa_peft.registration as registration
        registration.register_gfa = lambda: print("registered after peft executed:", sys.modules["peft"].EXECUTED)
        {PROBES[probe]}
        print("probed")
        {importing}
        print("hook left:", any(type(finder).__name__ == "_RegisterAfterPeft" for finder in sys.meta_path))
    """)
    assert output.splitlines() == ["probed", "registered after peft executed: True", "hook left: False"]


# --- the real thing --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A tiny Llama saved as a base, a GFA adapter on it (random B, so it changes the logits) and the in-process
    logits of the base with the adapter loaded by `PeftModel.from_pretrained`."""
    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(folder / "base")
    model = get_peft_model(base, GfaConfig(r=2, task_type="CAUSAL_LM", init_weights=False))
    model.save_pretrained(folder / "adapter")
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(folder / "base")  # built from a config, the model had no path
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    ids = torch.arange(12).reshape(2, 6)
    torch.save(ids, folder / "ids.pt")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base"), folder / "adapter")
    with torch.no_grad():
        torch.save(loaded(input_ids=ids).logits, folder / "logits.pt")
    return {"base": str(folder / "base"), "adapter": str(folder / "adapter"), "ids": str(folder / "ids.pt"),
            "logits": str(folder / "logits.pt"), "folder": folder}


def same_logits(saved: dict) -> str:
    """Script lines that check the loaded `model`'s logits against those of the process that saved the adapter."""
    return f"""
        with torch.no_grad():
            logits = model(input_ids=torch.load({saved['ids']!r})).logits
        torch.testing.assert_close(logits, torch.load({saved['logits']!r}))
        print("same logits")
    """

def test_import_gfa_peft_then_a_transformers_load_then_peft_model_from_pretrained(saved):
    """The sequence of the report: loading any model runs transformers' is_peft_available(), a find_spec probe."""
    output = run_python(f"""
        import gfa_peft, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({saved['base']!r})
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, {saved['adapter']!r})
    """ + same_logits(saved))
    assert output.strip().endswith("same logits")


@pytest.mark.slow
@pytest.mark.parametrize("order", ["peft first", "transformers' is_peft_available first"])
def test_real_peft_knows_gfa_in_either_import_order(order):
    first = "import peft" if order == "peft first" else \
        "from transformers.utils import is_peft_available; assert is_peft_available()"
    output = run_python(f"""
        {first}
        import gfa_peft
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        print(PEFT_TYPE_TO_TUNER_MAPPING["GFA"].__name__)
    """)
    assert output.strip() == "GfaModel"


# --- installed: the start-up hook ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def installed_python(tmp_path_factory) -> str:
    """The interpreter of a virtual environment (seeing this machine's packages) whose site-packages holds the
    package's .pth file, as `pip install gfa-peft` leaves it; gfa_peft itself comes from this checkout."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    site_packages = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    shutil.copy(AUTOREGISTER_PTH, site_packages)
    return str(venv / ("Scripts" if os.name == "nt" else "bin") / Path(sys.executable).name)


START_UP = """
    import sys
    hooked = any(type(finder).__name__ == "_RegisterAfterPeft" for finder in sys.meta_path)
    heavy = sorted(name for name in ("torch", "transformers", "peft") if name in sys.modules)
    print(hooked, heavy)
"""


def test_the_installed_hook_is_there_at_start_up_imports_nothing_heavy_and_turns_off(installed_python):
    assert run_python(START_UP, installed_python, autoregister=True).strip() == "True []"
    assert run_python(START_UP, installed_python, autoregister=False).strip() == "False []"
    assert run_python(START_UP, sys.executable, autoregister=False).strip() == "False []"


def test_a_start_up_hook_left_behind_by_a_moved_or_removed_package_stays_silent(tmp_path):
    """An editable install whose checkout was moved, or a half-removed package, leaves the .pth file where
    gfa_peft cannot be found: every Python start must then go on as if the hook were not there, printing nothing."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    shutil.copy(AUTOREGISTER_PTH, site_packages)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / Path(sys.executable).name
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", AUTOREGISTER_VARIABLE)}
    done = subprocess.run([str(python), "-c", "import importlib.util; print(importlib.util.find_spec('gfa_peft'))"],
                          capture_output=True, text=True, env=environment, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "None\n", "")


def test_a_process_that_never_imports_gfa_peft_loads_an_adapter_with_peft_model_from_pretrained(installed_python,
                                                                                                saved):
    output = run_python(f"""
        import torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({saved['base']!r}),
                                          {saved['adapter']!r})
    """ + same_logits(saved), installed_python, autoregister=True)
    assert output.strip().endswith("same logits")


@pytest.mark.slow
def test_a_process_that_never_imports_gfa_peft_reads_the_config_and_loads_with_auto_peft_model(installed_python,
                                                                                               saved):
    output = run_python(f"""
        import torch
        from peft import AutoPeftModelForCausalLM, PeftConfig
        config = PeftConfig.from_pretrained({saved['adapter']!r})
        print(type(config).__name__, config.peft_type.value, config.r)
        model = AutoPeftModelForCausalLM.from_pretrained({saved['adapter']!r})
    """ + same_logits(saved), installed_python, autoregister=True)
    assert output.splitlines()[-2:] == ["GfaConfig GFA 2", "same logits"]


@pytest.mark.slow
def test_transformers_own_adapter_loading_is_refused_in_one_line_naming_the_ways_that_load(installed_python, saved):
    """transformers loads adapters through PEFT's inject_adapter_in_model, which refuses every method whose weights
    live on the tuner (VeRA, VB-LoRA, GFA), naming get_peft_model; for GFA the refusal names the ways that load."""
    output = run_python(f"""
        from transformers import AutoModelForCausalLM, pipeline
        attempts = {{
            "from_pretrained": lambda: AutoModelForCausalLM.from_pretrained({saved['adapter']!r}),
            "load_adapter": lambda: AutoModelForCausalLM.from_pretrained({saved['base']!r}).load_adapter(
                {saved['adapter']!r}),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "loaded")
            except ValueError as error:
                message = str(error)
                print(name, len(message.splitlines()), "PeftModel.from_pretrained" in message, "gfa merge" in message)
    """, installed_python, autoregister=True)
    assert output.splitlines()[-2:] == ["from_pretrained 1 True True", "load_adapter 1 True True"]


def test_only_the_class_level_read_of_uses_shared_state_refuses():
    """The tuner's own code reads uses_shared_state on instances (True); hasattr, inspect and help see the class
    attribute as absent; PEFT's inject_adapter_in_model, the one class-level reader, gets the refusal."""
    from peft import inject_adapter_in_model

    from gfa_peft.tuner.model import GfaModel, LoadWithPeftModel

    model = get_peft_model(tiny_llama(), GfaConfig(r=2))
    assert model.base_model.uses_shared_state is True
    assert not hasattr(GfaModel, "uses_shared_state")
    with pytest.raises(LoadWithPeftModel, match=r"PeftModel\.from_pretrained\(base_model, adapter_dir\).*gfa merge"):
        inject_adapter_in_model(GfaConfig(r=2), tiny_llama())


# --- the model card --------------------------------------------------------------------------------------------

def _card(folder: Path) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def test_the_saved_card_says_gfa_its_layout_its_count_and_how_to_load_it(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), GfaConfig(r=3, task_type="CAUSAL_LM", scale_rule="constant"))
    model.add_adapter("second", GfaConfig(r=4, target_modules=["o_proj"], task_type="CAUSAL_LM", scale_rule="rsqrt",
                                          grid="aligned", module_gain=True))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again replaces the section instead of adding one
    # (grid, s, gains): the second adapter's s is 1 / sqrt(4) under the rsqrt rule, and it has a gain per module
    for folder, name, grid, s, gains in ((tmp_path, "default", "square", "1", False),
                                         (tmp_path / "second", "second", "aligned", "0.5", True)):
        layout = gfa_peft.layout_of(model, name)
        r, n_modules = model.peft_config[name].r, len(layout.modules)
        count = r * (layout.m + layout.k) + (n_modules if gains else 0)
        card = _card(folder)
        assert card.count(START) == card.count(END) == 1
        row = (f"| {n_modules} | {layout.d} | {layout.m} | {layout.k} | {grid} | {r} | {s} | "
               f"{n_modules if gains else 'none'} | {count} |")
        assert row in card
        assert count == sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n and "gfa_" in n)
        assert "pip install gfa-peft" in card and "PeftModel.from_pretrained(base," in card
        assert "AutoModelForCausalLM" in card and "gfa merge" in card and "GFA_PEFT_AUTOREGISTER=0" in card
    assert "- PEFT " in _card(tmp_path)  # PEFT's own part of the card is still there
