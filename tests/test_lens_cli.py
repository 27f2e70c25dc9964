"""`gfa lens` and its inputs on tiny models saved to disk: every number checked against a direct computation
from the saved weights, the adapter path against PEFT's own factors, and bad input refused with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from toy_models import tiny_gpt2
from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, LlamaForCausalLM

from gfa_peft import GfaConfig, delta_weights
from gfa_peft.cli import main
from gfa_peft.analysis.lens.inputs import deltas_from_adapter, deltas_from_file, save_deltas

TARGETS = ["q_proj", "v_proj"]


def llama(hidden: int = 32, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ))


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lens_models")
    base = llama()
    base.save_pretrained(root / "base")
    tuned = llama()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if name.endswith("proj.weight"):
                rows, columns = parameter.shape
                local_rank1 = torch.randn(rows, 1, generator=generator) @ torch.randn(1, columns, generator=generator)
                parameter += 0.02 * torch.randn(rows, columns, generator=generator) + 0.1 * local_rank1
    tuned.save_pretrained(root / "tuned")
    llama(hidden=48).save_pretrained(root / "wider")
    llama(layers=2).save_pretrained(root / "shallower")
    BertModel(tiny_bert_config()).save_pretrained(root / "bert")
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    lora.save_pretrained(root / "lora")
    return {"root": root, "base": root / "base", "tuned": root / "tuned", "wider": root / "wider",
            "shallower": root / "shallower", "bert": root / "bert", "lora": root / "lora"}


def saved_deltas(folders) -> dict[str, torch.Tensor]:
    """Delta W* of the q and v projections, straight from the saved state dicts, in the model's order."""
    base = LlamaForCausalLM.from_pretrained(folders["base"]).state_dict()
    tuned = LlamaForCausalLM.from_pretrained(folders["tuned"]).state_dict()
    names = [key.removesuffix(".weight") for key in tuned if key.endswith(("q_proj.weight", "v_proj.weight"))]
    return {name: (tuned[f"{name}.weight"] - base[f"{name}.weight"]).double() for name in names}


def tail(matrix: torch.Tensor, rank: int) -> float:
    return float((torch.linalg.svdvals(matrix) ** 2)[rank:].sum())


def concatenated(deltas, names) -> torch.Tensor:
    """The global matrix by hand: flatten in order, pad with zeros to m x k, k = floor(sqrt(d))."""
    flat = torch.cat([deltas[name].flatten() for name in names])
    k = int(flat.numel() ** 0.5)
    m = -(-flat.numel() // k)
    return torch.cat([flat, flat.new_zeros(m * k - flat.numel())]).view(m, k)


RECORD_KEYS = {"budget", "e_gfa", "e_lora", "e_gfa_rel", "e_lora_rel", "gfa_rank", "lora_ranks", "favoured"}


def run_lens(folders, *options: str) -> int:
    return main(["lens", "--base", str(folders["base"]), "--tuned", str(folders["tuned"]), *options])


def test_lens_on_base_and_tuned_folders(folders, tmp_path, capsys):
    out, plot = tmp_path / "lens.json", tmp_path / "lens.png"
    code = run_lens(folders, "--targets", "q_proj,v_proj", "--module-order", "model,by_name", "--grid-points", "12",
                    "--json", str(out), "--plot", str(plot))
    assert code == 0
    assert "favoured" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    deltas = saved_deltas(folders)
    assert [module["name"] for module in report["modules"]] == list(deltas)
    total = sum(float(delta.square().sum()) for delta in deltas.values())
    assert report["total_energy"] == pytest.approx(total, rel=1e-6)
    lora_rank1 = sum(sum(delta.shape) for delta in deltas.values())
    assert {"label": "1", "budget": lora_rank1} in report["anchors"]
    assert lora_rank1 in [record["budget"] for record in report["budgets"]]

    def approx(value: float):
        return pytest.approx(value, rel=1e-5, abs=1e-9 * total)

    by_model = concatenated(deltas, list(deltas))
    by_name = concatenated(deltas, sorted(deltas, key=lambda name: name.endswith("v_proj")))  # all q, then all v
    m, k = by_model.shape
    assert (report["m"], report["k"]) == (m, k)
    for record in report["budgets"]:
        assert record.keys() >= RECORD_KEYS
        rank = min(record["budget"] // (m + k), k)
        assert record["gfa_rank"] == rank
        assert record["e_gfa"] == approx(tail(by_model, rank))
        assert record["e_gfa_rel"] == pytest.approx(record["e_gfa"] / total, rel=1e-5)
        equal_rank = record["budget"] // lora_rank1
        assert record["e_lora_equal"] == approx(sum(tail(delta, equal_rank) for delta in deltas.values()))
        ranks = record["lora_ranks"]
        assert sum(ranks[name] * sum(deltas[name].shape) for name in deltas) <= record["budget"]
        assert record["e_lora"] == approx(sum(tail(deltas[name], ranks[name]) for name in deltas))
        assert record["e_lora"] <= min(record["e_lora_greedy"], record["e_lora_equal"]) + 1e-9 * total
        closer = "gfa" if record["e_gfa"] < record["e_lora"] else "lora"
        assert record["favoured"] == ("tie" if abs(record["e_gfa"] - record["e_lora"]) <= 1e-3 * total else closer)
    for point in report["module_orders"]["by_name"]:
        assert point["e_gfa"] == approx(tail(by_name, point["gfa_rank"]))


def test_lens_json_to_stdout_with_explicit_budgets(folders, capsys):
    assert run_lens(folders, "--budgets", "400,100", "--json", "-") == 0
    report = json.loads(capsys.readouterr().out)
    assert [record["budget"] for record in report["budgets"]] == [100, 400]


def test_save_deltas_then_lens_on_the_file_gives_the_same_report(folders, tmp_path, capsys):
    saved, first, second = tmp_path / "deltas.safetensors", tmp_path / "a.json", tmp_path / "b.json"
    common = ["--budgets", "150,700", "--json"]
    assert run_lens(folders, "--save-deltas", str(saved), *common, str(first)) == 0
    assert main(["lens", "--deltas", str(saved), *common, str(second)]) == 0
    one, two = json.loads(first.read_text()), json.loads(second.read_text())
    assert one["budgets"] == two["budgets"] and one["modules"] == two["modules"]


def test_deltas_file_order_and_target_selection(tmp_path):
    tensors = {f"layers.{i}.{kind}": torch.full((2, 3), float(i)) for i in (10, 2, 1) for kind in ("q", "v")}
    recorded = tmp_path / "recorded.safetensors"
    save_deltas(recorded, tensors)
    assert list(deltas_from_file(recorded)) == list(tensors)
    unrecorded = tmp_path / "plain.safetensors"
    save_file(tensors, str(unrecorded))
    assert list(deltas_from_file(unrecorded, ["v"])) == ["layers.1.v", "layers.2.v", "layers.10.v"]
    assert torch.equal(deltas_from_file(unrecorded)["layers.10.q"], tensors["layers.10.q"])


def scaled_lora_product(peft_model, name: str) -> torch.Tensor:
    layer = peft_model.get_submodule(f"base_model.model.{name}")
    return layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]


def test_adapter_delta_of_a_classifier_lora_is_its_scaled_product(tmp_path, folders):
    """A LoRA trained on a 3-label classifier built from a bare encoder: the base loads with the saved head's
    label count, and each target's update is s * B A in (out, in) orientation."""
    classifier = BertForSequenceClassification.from_pretrained(folders["bert"], num_labels=3)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["query", "value"], task_type="SEQ_CLS",
                        init_lora_weights=False)
    peft_model = get_peft_model(classifier, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    deltas = deltas_from_adapter(tmp_path / "adapter", folders["bert"])
    assert len(deltas) == 4
    for name, delta in deltas.items():
        assert torch.allclose(delta, scaled_lora_product(peft_model, name), atol=1e-6)


def test_adapter_delta_of_a_conv1d_lora_is_seen_out_by_in(tmp_path):
    """GPT-2's Conv1D stores (in, out); the lens sees every update as (out, in), like the method does."""
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    deltas = deltas_from_adapter(tmp_path / "adapter", tmp_path / "base")
    for name, delta in deltas.items():
        assert delta.shape == (96, 32)
        assert torch.allclose(delta, scaled_lora_product(peft_model, name), atol=1e-6)


def test_adapter_delta_of_a_gfa_adapter_matches_its_own_updates(tmp_path, folders):
    """The generic path (load, merge, subtract) on a GFA adapter gives the updates GFA itself reports."""
    model = BertModel.from_pretrained(folders["bert"])
    peft_model = get_peft_model(model, GfaConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.normal_(generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path / "gfa")
    expected = delta_weights(peft_model)
    deltas = deltas_from_adapter(tmp_path / "gfa", folders["bert"])
    assert list(deltas) == list(expected)
    for name, delta in deltas.items():
        assert torch.allclose(delta, expected[name].detach(), atol=1e-5)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--base", "{bert}", "--tuned", "{tuned}"],
         r"base '.*bert' is a 'bert' model but tuned '.*tuned' is a 'llama' model"),
        (["--base", "{wider}", "--tuned", "{tuned}"],
         r"'model.layers.0.self_attn.q_proj' has update shape \[48, 48\] in base .* but \[32, 32\] in tuned"),
        (["--base", "{shallower}", "--tuned", "{tuned}"],
         r"'model.layers.2.self_attn.q_proj' of tuned .* is not in base"),
        (["--base", "{base}", "--tuned", "{tuned}", "--targets", "query"], r"match no module"),
        (["--base", "{base}", "--tuned", "{tuned}", "--budgets", "100,20"],
         r"budget 20 is below the smallest feasible budget 48"),
        (["--base", "{base}", "--tuned", "{base}"], r"zero on every target module"),
        (["--tuned", "{tuned}"], r"give --base with --tuned.*got --tuned"),
        (["--base", "{base}", "--adapter", "{tuned}"], r"has no adapter_config.json"),
        (["--base", "{wider}", "--adapter", "{lora}"],
         r"adapter '.*lora' does not fit base '.*wider': size mismatch for .*layers.0.self_attn.q_proj.lora_A"),
        (["--deltas", "{root}/missing.safetensors"], r"does not exist"),
    ],
)
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(folders, tmp_path, capsys, arguments, message):
    out = tmp_path / "lens.json"
    filled = [argument.format(**{key: str(path) for key, path in folders.items()}) for argument in arguments]
    assert main(["lens", *filled, "--json", str(out), "--plot", str(tmp_path / "lens.png")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("gfa lens: error:")
    assert re.search(message, error), error
    assert list(tmp_path.iterdir()) == []
