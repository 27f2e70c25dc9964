"""Exact counts against PEFT's own trainable counts, the anchor rule against brute force, and `gfa count`."""

from __future__ import annotations

import copy
import json
import re
import shlex
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, VBLoRAConfig, VeraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from gfa_peft import GfaConfig
from gfa_peft.analysis.budget import (
    VBLORA_TOPK,
    budget_report,
    dora_params,
    gfa_params,
    lora_params,
    nearest_multiple,
    parse_anchor,
    rank_anchors,
    vblora_params,
    vblora_vector_length,
    vera_params,
)
from gfa_peft.cli import main
from gfa_peft.data.presets import load_architecture
from gfa_peft.layout import build_layout
from gfa_peft.targets import target_shapes
from gfa_peft.training.methods import place


class Mixed(nn.Module):
    """Every layer type LoRA adapts, with unequal widths (Conv1D(12, 36): 36 in, 12 out)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 12)
        self.conv = nn.Conv2d(3, 4, (3, 2))
        self.a = nn.Linear(12, 24)
        self.b = nn.Linear(24, 36, bias=False)
        self.c = Conv1D(12, 36)


LINEAR = ["a", "b", "c"]


def peft_trainable(model: nn.Module, config) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainable, _ = get_peft_model(copy.deepcopy(model), config).get_nb_trainable_parameters()
    return trainable


def shapes_of(model: nn.Module, targets) -> list[tuple[int, ...]]:
    return [shape for _, shape in target_shapes(model, targets)]


# --- counts against PEFT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 3])
def test_lora_count_matches_peft(r):
    targets = ["emb", "conv", *LINEAR]
    expected = peft_trainable(Mixed(), LoraConfig(r=r, target_modules=targets))
    assert lora_params(shapes_of(Mixed(), targets), r) == expected


@pytest.mark.parametrize("r", [1, 3])
def test_dora_count_matches_peft(r):
    # Embeddings are left out: PEFT gives them one magnitude per embedding dimension (see the module docstring).
    targets = ["conv", *LINEAR]
    config = LoraConfig(r=r, use_dora=True, target_modules=targets)
    assert dora_params(shapes_of(Mixed(), targets), r) == peft_trainable(Mixed(), config)


@pytest.mark.parametrize("r", [1, 5, 40])
def test_vera_count_matches_peft(r):
    assert vera_params(shapes_of(Mixed(), LINEAR), r) == peft_trainable(Mixed(), VeraConfig(r=r, target_modules=LINEAR))


@pytest.mark.parametrize("num_vectors, vector_length, r", [(2, 12, 4), (7, 12, 2), (5, 6, 1), (3, 4, 3)])
def test_vblora_count_matches_peft(num_vectors, vector_length, r):
    config = VBLoRAConfig(r=r, num_vectors=num_vectors, vector_length=vector_length, target_modules=LINEAR)
    expected = peft_trainable(Mixed(), config)
    assert vblora_params(shapes_of(Mixed(), LINEAR), num_vectors, vector_length, r) == expected


def test_vblora_refuses_a_length_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        vblora_params([(24, 12)], 2, 8)


@pytest.mark.parametrize("r", [1, 4])
def test_gfa_count_matches_the_gfa_tuner(r):
    targets = ["conv", *LINEAR]
    layout = build_layout(target_shapes(Mixed(), targets))
    assert gfa_params(layout, r) == peft_trainable(Mixed(), GfaConfig(r=r, target_modules=targets))


def test_counts_reject_rank_zero():
    for count in (lambda: lora_params([(2, 3)], 0), lambda: dora_params([(2, 3)], 0),
                  lambda: gfa_params(build_layout([("w", (2, 3))]), 0), lambda: vera_params([(2, 3)], 0)):
        with pytest.raises(ValueError, match="positive"):
            count()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2048), st.integers(1, 2048)), min_size=1, max_size=6))
def test_vblora_vector_length_is_the_largest_common_divisor_up_to_256(shapes):
    dims = [dim for shape in shapes for dim in shape]
    divides_all = [length for length in range(1, 257) if all(dim % length == 0 for dim in dims)]
    assert vblora_vector_length(shapes) == max(divides_all)


# --- the anchor rule against brute force -----------------------------------------------------------------------


def nearest(candidates, count, budget):
    """The candidate whose count is nearest the budget, ties to the smaller candidate."""
    return min(candidates, key=lambda value: (abs(count(value) - budget), value))


def expected_budget(label: str, shapes) -> int:
    lora_rank1 = sum(p + q for p, q in shapes)
    if label == "1/2":
        return nearest(range(lora_rank1 + 1), lambda budget: Fraction(budget), Fraction(3, 10) * lora_rank1)
    return int(label) * lora_rank1


named_shapes_strategy = st.lists(
    st.tuples(st.sampled_from([4, 8, 12, 16, 24, 48]), st.sampled_from([4, 8, 12, 16, 24, 48])), min_size=1, max_size=8
).map(lambda shapes: [(f"layer{i}", shape) for i, shape in enumerate(shapes)])


@settings(max_examples=60, deadline=None)
@given(named_shapes_strategy)
def test_every_method_is_placed_by_brute_force(named_shapes):
    shapes = [shape for _, shape in named_shapes]
    layout = build_layout(named_shapes)
    labels = [label for label in ("1/2", "1", "2", "4") if label == "1/2" or int(label) <= layout.max_rank()]
    length = vblora_vector_length(shapes)
    for anchor in rank_anchors(named_shapes, labels):
        budget = expected_budget(anchor.label, shapes)
        assert anchor.budget == budget
        assert anchor.gfa_rank == nearest(range(1, layout.max_rank() + 1), lambda r: r * (layout.m + layout.k), budget)
        assert anchor.gfa_params == anchor.gfa_rank * (layout.m + layout.k)
        if anchor.label == "1/2":
            assert anchor.lora_params is None and anchor.dora_params is None
        else:
            assert anchor.lora_params == budget
            assert anchor.dora_params == budget + sum(p for p, _ in shapes)
        vera_rank = nearest(range(1, budget + 1), lambda r: vera_params(shapes, r), budget)
        if vera_params(shapes, 1) > budget:
            assert anchor.vera_rank is None and anchor.vera_params is None
        else:
            assert (anchor.vera_rank, anchor.vera_params) == (vera_rank, vera_params(shapes, vera_rank))
        num_vectors = nearest(range(VBLORA_TOPK, budget + 2), lambda n: vblora_params(shapes, n, length), budget)
        if vblora_params(shapes, VBLORA_TOPK, length) > budget:
            assert anchor.vblora_num_vectors is None and anchor.vblora_params is None
        else:
            assert anchor.vblora_num_vectors == num_vectors
            assert anchor.vblora_params == vblora_params(shapes, num_vectors, length)
            assert anchor.vblora_vector_length == length


def test_a_tie_goes_to_the_smaller_gfa_rank():
    named_shapes = [("a", (2, 4)), ("b", (2, 4))]  # d = 16, m + k = 8, LoRA r=1 = 12: ranks 1 and 2 are 4 away
    layout = build_layout(named_shapes)
    (anchor,) = rank_anchors(named_shapes, ["1"])
    assert abs(1 * (layout.m + layout.k) - anchor.budget) == abs(2 * (layout.m + layout.k) - anchor.budget)
    assert anchor.gfa_rank == 1


def test_nearest_multiple_ties_down():
    assert [nearest_multiple(amount, 10) for amount in (0, 4, 5, 6, 14, 15, 16)] == [0, 0, 0, 1, 1, 1, 2]


def test_gfa_rank_is_clamped_to_one_and_to_min_m_k():
    (low,) = rank_anchors([("w", (4, 4))], ["1/2"])  # budget 2, while rank 1 already costs m + k = 8
    assert (low.gfa_rank, low.gfa_params, low.budget) == (1, 8, 2)
    many_scalars = [(f"s{i}", (1, 1)) for i in range(100)]  # d = 100: a 10 x 10 matrix; LoRA r=1 = 200
    assert [anchor.gfa_rank for anchor in rank_anchors(many_scalars, ["1", "2"])] == [10, 10]
    with pytest.raises(ValueError, match="out of range"):
        rank_anchors(many_scalars, ["11"])


def test_unreachable_budgets_are_none():
    shapes = [(f"w{i}", (1024, 1024)) for i in range(48)]
    (half,) = rank_anchors(shapes, ["1/2"])  # 29,491 < VeRA's floor 48 * 1024 + 48
    assert half.vera_rank is None and half.lora_params is None
    assert half.vblora_num_vectors == 16


def test_counts_do_not_depend_on_module_order():
    named_shapes = [("a", (24, 12)), ("b", (36, 24)), ("c", (12, 36)), ("d", (24, 12))]
    reports = [budget_report(named_shapes, module_order=order) for order in ("model", "by_name", 3)]
    for report in reports[1:]:
        assert {key: value for key, value in report.items() if key != "modules"} == {
            key: value for key, value in reports[0].items() if key != "modules"
        }
    assert [module["name"] for module in reports[2]["modules"]] != ["a", "b", "c", "d"]


@pytest.mark.parametrize("label, rank", [("1/2", None), ("1", 1), ("16", 16), ("32", 32)])
def test_parse_anchor_accepts(label, rank):
    assert parse_anchor(label) == rank


@pytest.mark.parametrize("label", ["0", "-1", "01", "1/3", "2.0", "", " 1", "half", "1/2 "])
def test_parse_anchor_rejects(label):
    with pytest.raises(ValueError, match="not '1/2' or a positive integer"):
        parse_anchor(label)


def test_repeated_anchor_is_rejected():
    with pytest.raises(ValueError, match="more than once"):
        rank_anchors([("w", (8, 8))], ["1", "1"])


# --- the paper's models --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, targets, n, lora_rank1",
    [  # N and LoRA r=1 as the paper states them (Sec. 1, 4 and 5)
        ("roberta-large", ["query", "value"], 48, 98_304),
        ("qwen2.5-3b", ["q_proj", "v_proj"], 72, 230_400),
        ("llama-3.2-3b", ["q_proj", "v_proj"], 56, 286_720),
    ],
)
def test_paper_module_counts_and_lora_rank1(preset, targets, n, lora_rank1):
    report = budget_report(target_shapes(load_architecture(preset), targets))
    assert report["N"] == n
    assert report["lora_per_rank"] == lora_rank1
    assert report["anchors"][1]["lora"] == lora_rank1


# --- gfa count -------------------------------------------------------------------------------------------------


def test_count_json_keys_and_values(tmp_path, capsys):
    out = tmp_path / "count.json"
    assert main(["count", "--model", "minilm", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"N", "d", "m", "k", "padding", "anchors"} <= set(report)
    assert [anchor["label"] for anchor in report["anchors"]] == ["1/2", "1", "2", "4", "8", "16"]
    anchors = rank_anchors(target_shapes(load_architecture("minilm"), ["query", "value"]))
    for written, anchor in zip(report["anchors"], anchors, strict=True):
        assert {"label", "budget", "gfa_rank", "gfa", "lora", "dora", "vera", "vblora"} <= set(written)
        assert (written["gfa_rank"], written["gfa"], written["lora"], written["vera"], written["vblora"]) == (
            anchor.gfa_rank, anchor.gfa_params, anchor.lora_params, anchor.vera_params, anchor.vblora_params)
    assert "anchor" in capsys.readouterr().out  # the table is printed too
    assert main(["count", "--model", "minilm", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == report


def test_count_places_gfa_on_the_aligned_grid_as_training_does(capsys):
    assert main(["count", "--model", "minilm", "--grid", "aligned", "--anchors", "1/2,1,16", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    shapes = target_shapes(load_architecture("minilm"), ["query", "value"])
    assert (report["grid"], report["m"], report["k"]) == ("aligned", 1536, 1152)
    for written in report["anchors"]:
        placed = place("gfa", shapes, anchor=written["label"], grid="aligned")
        assert (written["gfa_rank"], written["gfa"]) == (placed.knobs["r"], placed.trainable)
    with pytest.raises(SystemExit) as refused:
        main(["count", "--model", "minilm", "--grid", "diagonal"])
    assert refused.value.code == 2


def test_count_places_gfa_with_module_gains_as_training_does(capsys):
    assert main(["count", "--model", "smollm2", "--module-gain", "--anchors", "1/2,1,16", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    shapes = target_shapes(load_architecture("smollm2"), ["q_proj", "v_proj"])
    plain = rank_anchors(shapes, ["1/2", "1", "16"])
    assert report["module_gain"] and report["smallest"]["gfa"] == report["gfa_per_rank"] + report["N"]
    for written, without in zip(report["anchors"], plain, strict=True):
        placed = place("gfa", shapes, anchor=written["label"], module_gain=True)
        assert (written["gfa_rank"], written["gfa"]) == (placed.knobs["r"], placed.trainable)
        assert (written["gfa_rank"], written["gfa"]) == (without.gfa_rank, without.gfa_params + 60)
    assert main(["count", "--model", "smollm2", "--module-gain", "--anchors", "1"]) == 0
    assert "include its 60 module gains" in capsys.readouterr().out


def test_count_folder_with_a_config(tmp_path, capsys):
    load_architecture("smollm2").config.save_pretrained(tmp_path)
    assert main(["count", "--model", str(tmp_path), "--targets", "all-linear", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["N"] == 30 * 7
    assert report["lora_per_rank"] == 30 * (2 * (576 + 576) + 2 * (192 + 576) + 3 * (1536 + 576))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "no-such-preset"], "neither a folder nor a preset"),
        (["--model", "{tmp}/missing/"], "neither a folder nor a preset"),
        (["--model", "{tmp}"], "has no config.json"),
        (["--model", "minilm", "--targets", "q_proj,v_proj"], "match no module"),
        (["--model", "minilm", "--targets", "q_proj,,v_proj"], "empty entry"),
        (["--model", "minilm", "--targets", "embeddings"], "cannot adapt module"),
        (["--model", "minilm", "--anchors", "1,3/4"], "not '1/2' or a positive integer"),
        (["--model", "minilm", "--anchors", "1,100000"], "out of range"),
        (["--model", "minilm", "--module-order", "shuffled"], "module_order"),
        (["--model", "minilm", "--json", "{tmp}/no/such/folder/out.json"], "does not exist"),
    ],
)
def test_count_bad_input_exits_2_and_writes_nothing(arguments, message, tmp_path, capsys):
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    if "--json" not in arguments:
        arguments += ["--json", str(tmp_path / "out.json")]
    assert main(["count", *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("gfa count: error: ") and message in captured.err
    assert captured.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_docs_tables_are_the_commands_output(capsys):
    """Every console block in docs/budget.md is `gfa count` output, verbatim; the JSON example is its first anchor."""
    text = (Path(__file__).parents[1] / "docs" / "budget.md").read_text()
    blocks = re.findall(r"```console\n\$ gfa (count[^\n]*)\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 5
    for command, shown in blocks:
        assert main(shlex.split(command)) == 0
        assert capsys.readouterr().out == shown
    (example,) = re.findall(r"the first anchor of\n`gfa (count[^`]*)`:\n\n```json\n(.*?)```", text, flags=re.S)
    assert main(shlex.split(example[0])) == 0
    assert json.loads(capsys.readouterr().out)["anchors"][0] == json.loads(example[1])
