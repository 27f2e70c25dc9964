"""A GFA adapter converts to LoRA with PEFT's own `convert_to_lora`, and `gfa convert` writes what it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from peft.tuners.lora.conversion import convert_to_lora
from safetensors.torch import load_file

from gfa_peft import GfaConfig, factors, layout_of
from gfa_peft.cli import main
from references import reference_scale
from toy_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    # q_proj 32x32 and v_proj 16x32 on a 55-column grid: realized ranks well above r, and unequal
    # (and the rank-stable scale rule, s = 1/sqrt(r))
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], scale_rule="rsqrt")),
    # a classifier head in modules_to_save, which the LoRA adapter must carry; a scale other than 1
    "bert": (tiny_bert_classifier, dict(target_modules=["query", "value"], task_type="SEQ_CLS", scale=0.5)),
    # a learned gain per module, which the LoRA factors must carry
    "llama-gain": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], module_gain=True)),
}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def gfa_model(name: str):
    build, config = CASES[name]
    torch.manual_seed(0)
    base = build().eval()
    model = get_peft_model(base, GfaConfig(r=2, init_weights=False, **config)).eval()  # B random: a nonzero update
    if config.get("module_gain"):
        with torch.no_grad():
            model.base_model.gfa_gain["default"].weight.copy_(torch.tensor([0.5, 2.0] * 2))
    return model


def dense_updates(model) -> dict[str, torch.Tensor]:
    """Each module's update from the whole m x k product (no slicing code of the package), in float64."""
    B, A = factors(model)
    layout, config = layout_of(model), model.peft_config["default"]
    flat = reference_scale(config) * (B.detach().double() @ A.detach().double()).reshape(-1)
    gains = model.base_model.gfa_gain["default"].weight.detach().double() if config.module_gain else [1.0] * len(layout.modules)
    return {piece.name: gain * flat[piece.offset : piece.offset + piece.numel].reshape(piece.shape)
            for piece, gain in zip(layout.modules, gains)}


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """A base folder, a GFA adapter saved on it (recording that base), the live model and its outputs."""
    folder = tmp_path_factory.mktemp(request.param)
    build, _ = CASES[request.param]
    torch.manual_seed(0)
    build().save_pretrained(folder / "base")
    model = gfa_model(request.param)
    model.peft_config["default"].base_model_name_or_path = str(folder / "base")
    model.save_pretrained(folder / "adapter")
    inputs = token_batch(3)
    return request.param, folder, model, inputs, logits(model, inputs)


def convert(folder: Path, out: str, *flags: str) -> dict:
    """`gfa convert` on the saved adapter; its JSON report."""
    report = folder / f"{out}.json"
    assert main(["convert", str(folder / "adapter"), "--out", str(folder / out), "--json", str(report), *flags]) == 0
    return json.loads(report.read_text())


def test_gfa_layers_support_peft_convert_to_lora_exactly_at_full_rank(saved):
    name, _, model, inputs, adapted = saved
    assert model.supports_lora_conversion()
    config, state_dict = convert_to_lora(model, 1.0)  # energy 1: every module's full realized rank
    torch.manual_seed(0)
    lora = get_peft_model(CASES[name][0]().eval(), config)
    assert not set_peft_model_state_dict(lora, state_dict).unexpected_keys
    assert torch.allclose(logits(lora.eval(), inputs), adapted, atol=1e-5)


def test_conv1d_layers_do_not_claim_support():
    # GFA's update is (out, in); PEFT would factorize it as Conv1D's stored (in, out) and get it wrong
    model = get_peft_model(tiny_gpt2(), GfaConfig(r=2, target_modules=["c_attn", "c_proj"]))
    assert not model.supports_lora_conversion()
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(model, 4)


@pytest.mark.parametrize("size", [["--rank", "3"], ["--energy", "0.9"]], ids=" ".join)
def test_the_command_writes_what_peft_writes_for_the_loaded_adapter(saved, size):
    _, folder, model, _, _ = saved
    out = f"same-as-peft-{size[0][2:]}"
    convert(folder, out, *size)
    rank = int(size[1]) if size[0] == "--rank" else float(size[1])
    expected_config, expected = convert_to_lora(model, rank)

    written = load_file(folder / out / "adapter_model.safetensors")
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[key], expected[key]) for key in expected)
    config = json.loads((folder / out / "adapter_config.json").read_text())
    expected_config = json.loads(json.dumps(expected_config.to_dict(), default=sorted))  # sets as sorted lists
    for key in ("target_modules", "exclude_modules"):  # saved in set order, which varies between processes
        config[key], expected_config[key] = sorted(config[key]), sorted(expected_config[key])
    assert config == expected_config
    assert config["base_model_name_or_path"] == str(folder / "base")


def test_the_printed_error_is_the_discarded_singular_values_share(saved, capsys):
    _, folder, model, _, _ = saved
    rank = 3
    report = convert(folder, "lora-error", "--rank", str(rank))  # the JSON and the printed table
    printed = capsys.readouterr().out

    total_lost = total = 0.0
    for module, (name, update) in zip(report["modules"], dense_updates(model).items(), strict=True):
        energies = torch.linalg.svdvals(update) ** 2
        lost, squared = float(energies[rank:].sum()), float(energies.sum())
        assert module["name"] == name and module["rank"] == rank
        assert module["relative_error"] == pytest.approx((lost / squared) ** 0.5, rel=1e-4)
        assert module["energy_kept"] == pytest.approx(1 - lost / squared, abs=1e-6)  # its update formed in float32
        assert module["lora_params"] == rank * sum(update.shape)
        total_lost, total = total_lost + lost, total + squared
    assert report["relative_error"] == pytest.approx((total_lost / total) ** 0.5, rel=1e-4)
    assert f"= {report['relative_error']:.3g} " in printed
    assert report["gfa_params"] == sum(p.numel() for name, p in model.named_parameters() if ".gfa_" in name)
    assert report["lora_params"] == sum(module["lora_params"] for module in report["modules"])


def test_energy_picks_each_modules_smallest_rank_reaching_the_threshold(saved):
    _, folder, model, _, _ = saved
    threshold = 0.8
    report = convert(folder, "lora-energy", "--energy", str(threshold))
    for module, update in zip(report["modules"], dense_updates(model).values(), strict=True):
        energies = torch.linalg.svdvals(update) ** 2
        shares = torch.cumsum(energies, 0) / energies.sum()
        assert module["rank"] == int((shares < threshold).sum()) + 1  # every smaller rank holds less
        assert module["energy_kept"] >= threshold


# A fresh interpreter that refuses to import gfa_peft: plain transformers and PEFT load the converted folder.
PLAIN_PEFT = """
import sys
class NoGfa:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gfa_peft":
            raise ImportError("gfa_peft must not be needed")
sys.meta_path.insert(0, NoGfa())
import torch, transformers
from peft import PeftModel
base_dir, lora_dir, ids_file, out_file = sys.argv[1:]
config = transformers.AutoConfig.from_pretrained(base_dir)
base = getattr(transformers, config.architectures[0]).from_pretrained(base_dir).eval()
model = PeftModel.from_pretrained(base, lora_dir).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_file)).logits, out_file)
assert "gfa_peft" not in sys.modules
"""


@pytest.mark.parametrize("saved", ["bert"], indirect=True)  # one case: a fresh interpreter takes seconds
def test_the_folder_loads_with_plain_peft_in_a_process_without_gfa_peft(saved, tmp_path):
    _, folder, _, inputs, adapted = saved
    convert(folder, "lora-full", "--energy", "1")
    torch.save(inputs["input_ids"], tmp_path / "ids.pt")
    # no PYTHONPATH, and the installed package's start-up registration (a .pth file) switched off
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    environment.update(OMP_NUM_THREADS="1", GFA_PEFT_AUTOREGISTER="0")
    subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(folder / "base"), str(folder / "lora-full"),
                    str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, env=environment, timeout=300)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), adapted, atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "--rank must be at least 1, got 0"),
    (["--energy", "0"], "--energy must be in (0, 1], got 0.0"),
    (["--energy", "1.5"], "--energy must be in (0, 1], got 1.5"),
    (["--rank", "33"], "rank 33 exceeds the largest rank of module"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else "")
def test_bad_sizes_are_one_line_exit_2_and_nothing_written(saved, capsys, flags, message):
    folder = saved[1]
    assert main(["convert", str(folder / "adapter"), "--out", str(folder / "refused"), *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (folder / "refused").exists()


def test_a_folder_without_a_gfa_adapter_is_refused(tmp_path, capsys):
    model = get_peft_model(tiny_gpt2(), GfaConfig(r=2, target_modules=["c_attn"]))
    tiny_gpt2().save_pretrained(tmp_path / "base")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "gpt2-adapter")
    capsys.readouterr()  # what building the model printed
    for adapter, message in [(tmp_path / "base", "holds no adapter_config.json"),
                             (tmp_path / "gpt2-adapter", "is a Conv1D: LoRA conversion supports linear layers only")]:
        assert main(["convert", str(adapter), "--out", str(tmp_path / "refused"), "--rank", "1"]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1
        assert not (tmp_path / "refused").exists()


def test_out_is_never_a_folder_of_other_files_or_the_adapter(saved, capsys):
    folder = saved[1]
    (folder / "mine").mkdir()
    (folder / "mine" / "notes.txt").write_text("keep me")
    convert(folder, "lora-and-notes", "--rank", "1")
    (folder / "lora-and-notes" / "notes.txt").write_text("keep me")
    for out, message in [(folder / "mine", "is not empty and is not a LoRA adapter folder"),
                         (folder / "lora-and-notes", "is not empty and is not a LoRA adapter folder"),
                         (folder / "adapter", "an input of this command")]:
        assert main(["convert", str(folder / "adapter"), "--out", str(out), "--rank", "1", "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert (folder / "mine" / "notes.txt").read_text() == "keep me"
    assert (folder / "lora-and-notes" / "notes.txt").read_text() == "keep me"
    assert (folder / "adapter" / "adapter_config.json").is_file()
