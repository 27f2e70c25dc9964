"""`gfa inspect` and `gfa_peft.analysis.ranks`: every module's realized rank, norm and share checked against the dense
product B A cut with plain indexing, hand-computed ranks where the answer is known exactly, a saved adapter against
the live model's own updates and PEFT's own counts, and bad input refused with exit code 2."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from references import reference_scale
from toy_models import CASES, MLP

from gfa_peft import GfaConfig, delta_weights, factors, layout_of
from gfa_peft.cli import main
from gfa_peft.analysis.ranks import DEFAULT_RANK_TOL, realized_ranks
from gfa_peft.layout import build_layout

CONV_EMBEDDING = CASES[1]
GPT2 = CASES[3]


def dense_reference(B, A, layout, scale, tol):
    """Per module (norm, numerical rank, stable rank) from the whole product B A, sliced by plain indexing."""
    flat = (B.double() @ A.double()).reshape(-1)
    reference = {}
    for piece in layout.modules:
        update = scale * flat[piece.offset : piece.offset + piece.numel].reshape(piece.shape[0], -1)
        norm = float(torch.linalg.matrix_norm(update))
        spectral = float(torch.linalg.matrix_norm(update, ord=2))
        rank = int(torch.linalg.matrix_rank(update, rtol=tol))
        reference[piece.name] = (norm, rank, norm**2 / spectral**2 if spectral else 0.0)
    return reference


def assert_matches_reference(report, reference):
    total = sum(norm**2 for norm, _, _ in reference.values())
    assert [module.name for module in report.modules] == list(reference)
    for module in report.modules:
        norm, rank, stable = reference[module.name]
        assert module.norm == pytest.approx(norm, rel=1e-9, abs=1e-12)
        assert module.numerical_rank == rank
        assert module.stable_rank == pytest.approx(stable, rel=1e-9)
        assert module.energy_share == pytest.approx(norm**2 / total, rel=1e-9)


shapes = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),  # a Conv2d kernel
)


@settings(max_examples=40, deadline=None)
@given(st.lists(shapes, min_size=1, max_size=5), st.integers(1, 4), st.sampled_from([1.0, 0.5, 3.0]),
       st.sampled_from([DEFAULT_RANK_TOL, 1e-3, 0.2]), st.integers(0, 2**31))
def test_every_module_matches_the_dense_product(module_shapes, r, scale, tol, seed):
    layout = build_layout([(f"m{index}", shape) for index, shape in enumerate(module_shapes)])
    r = min(r, layout.max_rank())
    generator = torch.Generator().manual_seed(seed)
    B, A = torch.randn(layout.m, r, generator=generator), torch.randn(r, layout.k, generator=generator)
    report = realized_ranks(B, A, layout, scale, tol)
    assert_matches_reference(report, dense_reference(B, A, layout, scale, tol))

    record = report.to_dict()
    sides = [piece.shape[0] + math.prod(piece.shape[1:]) for piece in layout.modules]
    ranks = [module["numerical_rank"] for module in record["modules"]]
    assert record["trainable"] == r * (layout.m + layout.k)
    assert record["lora_params_same_rank"] == r * sum(sides)
    assert record["summary"]["lora_params_to_realize"] == sum(rank * side for rank, side in zip(ranks, sides))
    # the LoRA rank nearest GFA's budget, by brute force (ties to the smaller; rank 0 means LoRA cannot go so low)
    nearest = min(range(record["trainable"] + 1), key=lambda rank: (abs(rank * sum(sides) - record["trainable"]), rank))
    assert record["lora_rank_same_budget"] == (nearest or None)
    assert record["lora_params_same_budget"] == (nearest * sum(sides) or None)
    assert record["summary"]["max_numerical_rank"] == max(ranks)
    assert record["summary"]["modules_above_r"] == sum(rank > r for rank in ranks)


def test_rank_one_factors_give_a_full_rank_module_when_its_rows_are_not_grid_rows():
    # One 10 x 7 module: d = 70, k = 8. With B = 1 and A = e_0, vec(B A) is 1 at every multiple of 8, so entry
    # (i, j) of the module is 1 iff 7 i + j = 0 (mod 8), i.e. j = i mod 8: rows 0..6 are e_0..e_6, row 7 is
    # zero, rows 8 and 9 repeat e_0 and e_1. Rank 7 = min(p, q) from a rank-1 pair; ||.||_F^2 = 9 ones, and the
    # columns are orthogonal with at most 2 ones each, so sigma_1^2 = 2 and the stable rank is 9 / 2.
    layout = build_layout([("w", (10, 7))])
    assert (layout.m, layout.k) == (9, 8)
    B, A = torch.ones(9, 1), torch.zeros(1, 8)
    A[0, 0] = 1.0
    (module,) = realized_ranks(B, A, layout, scale=1.0).modules
    assert (module.numerical_rank, module.max_rank) == (7, 7)
    assert module.numerical_rank > 1
    assert module.norm == pytest.approx(3.0)
    assert module.stable_rank == pytest.approx(4.5)
    assert_matches_reference(realized_ranks(B, A, layout, 1.0), dense_reference(B, A, layout, 1.0, DEFAULT_RANK_TOL))


def test_modules_whose_rows_are_grid_rows_have_rank_exactly_r():
    # Two 6 x 10 modules: d = 120, k = 10 = q, and both start at a row boundary, so each is s * B[rows] A.
    layout = build_layout([("a", (6, 10)), ("b", (6, 10))])
    assert layout.k == 10 and all(piece.offset % layout.k == 0 for piece in layout.modules)
    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(layout.m, 3, generator=generator), torch.randn(3, layout.k, generator=generator)
    report = realized_ranks(B, A, layout, scale=2.0)
    assert [module.numerical_rank for module in report.modules] == [3, 3]
    assert report.to_dict()["summary"]["modules_above_r"] == 0
    assert_matches_reference(report, dense_reference(B, A, layout, 2.0, DEFAULT_RANK_TOL))


def test_zero_update_has_rank_zero_everywhere():
    layout = build_layout([("a", (5, 7)), ("conv", (4, 2, 3, 3))])
    report = realized_ranks(torch.zeros(layout.m, 2), torch.randn(2, layout.k), layout, scale=1.0)
    assert report.zero
    assert all((m.norm, m.energy_share, m.numerical_rank, m.stable_rank) == (0, 0, 0, 0) for m in report.modules)
    assert [module.max_rank for module in report.modules] == [5, 4]
    assert report.to_dict()["summary"]["lora_params_to_realize"] == 0


def test_factors_that_do_not_fit_the_layout_are_refused():
    layout = build_layout([("a", (5, 7))])
    with pytest.raises(ValueError, match="do not fit"):
        realized_ranks(torch.zeros(layout.m + 1, 2), torch.zeros(2, layout.k), layout, scale=1.0)
    with pytest.raises(ValueError, match="tolerance"):
        realized_ranks(torch.zeros(layout.m, 2), torch.zeros(2, layout.k), layout, scale=1.0, tol=0.0)


def saved_adapter(case, folder, r=2, scale=1.5, module_gain=False):
    """`case`'s toy model with a GFA adapter whose B (and gains) are random (as after training), saved to
    `folder`."""
    model = get_peft_model(case.model(), GfaConfig(r=r, scale=scale, module_gain=module_gain, **case.config))
    B, _ = factors(model)
    with torch.no_grad():
        B.copy_(torch.randn(B.shape, generator=torch.Generator().manual_seed(1)))
        if module_gain:
            gains = model.base_model.gfa_gain["default"].weight
            gains.uniform_(0.2, 3.0, generator=torch.Generator().manual_seed(2))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("module_gain", [False, True], ids=["shared", "module-gain"])
@pytest.mark.parametrize("case", [CONV_EMBEDDING, GPT2], ids=lambda case: case.name)
def test_saved_adapter_report_matches_the_live_model(case, module_gain, tmp_path, capsys):
    model = saved_adapter(case, tmp_path / "adapter", module_gain=module_gain)
    out = tmp_path / "report.json"
    assert main(["inspect", str(tmp_path / "adapter"), "--json", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())

    layout = layout_of(model)
    assert [module["name"] for module in record["modules"]] == layout.names
    assert [module["shape"] for module in record["modules"]] == [list(piece.shape) for piece in layout.modules]
    s = reference_scale(model.peft_config["default"])
    assert (record["N"], record["d"], record["m"], record["k"], record["padding"], record["r"], record["scale"]) == (
        len(layout.modules), layout.d, layout.m, layout.k, layout.padding, 2, s)
    for module, (name, delta) in zip(record["modules"], delta_weights(model).items(), strict=True):
        matrix = delta.double().reshape(delta.shape[0], -1)  # rank and norms do not see Conv1D's transpose
        assert module["name"] == name
        assert module["norm"] == pytest.approx(float(torch.linalg.matrix_norm(matrix)), rel=1e-5)
        assert module["numerical_rank"] == int(torch.linalg.matrix_rank(matrix, rtol=record["tol"]))
        spectral = float(torch.linalg.matrix_norm(matrix, ord=2))
        assert module["stable_rank"] == pytest.approx(module["norm"] ** 2 / spectral**2, rel=1e-4)
    assert record["summary"]["max_numerical_rank"] > record["r"]  # these toy layouts scatter past r

    # the counts, against PEFT's own: GFA's trainable parameters and LoRA's at the same rank
    assert record["trainable"] == model.get_nb_trainable_parameters()[0]
    lora = get_peft_model(case.model(), LoraConfig(r=2, **case.config))
    assert record["lora_params_same_rank"] == lora.get_nb_trainable_parameters()[0]
    assert record["lora_params_rank1"] * 2 == record["lora_params_same_rank"]

    printed = capsys.readouterr().out
    assert all(module["name"] in printed for module in record["modules"])


def test_top_lists_the_largest_norms_first_and_plot_is_written(tmp_path, capsys):
    saved_adapter(CONV_EMBEDDING, tmp_path / "adapter")
    plot = tmp_path / "ranks.png"
    assert main(["inspect", str(tmp_path / "adapter"), "--top", "2", "--plot", str(plot), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "adapter"), "--json", "-"]) == 0
    record = json.loads(capsys.readouterr().out)
    by_norm = sorted(record["modules"], key=lambda module: module["norm"], reverse=True)
    lines = table.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("module "))
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == [module["name"] for module in by_norm[:2]]
    assert lines[header + 3].startswith("(the 2 largest-norm of 3 modules")
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_untrained_adapter_is_reported_as_zero(tmp_path, capsys):
    get_peft_model(MLP(), GfaConfig(r=2, target_modules=["lin0", "lin1"])).save_pretrained(tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter"), "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["zero_update"] is True
    assert [module["numerical_rank"] for module in record["modules"]] == [0, 0]
    assert "exactly zero" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    saved_adapter(CONV_EMBEDDING, tmp_path / "good")
    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "good", truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"])).save_pretrained(tmp_path / "lora")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tmp_path / "good", no_weights)
    (no_weights / "adapter_model.safetensors").unlink()

    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(tmp_path / "lora")], "holds a LORA adapter, not a GFA one"),
        ([str(truncated)], "truncated"),
        ([str(no_weights)], "no adapter_model.safetensors"),
        ([str(tmp_path / "good"), "--tol", "0"], "--tol must be in (0, 1)"),
        ([str(tmp_path / "good"), "--top", "0"], "--top must be at least 1"),
        ([str(tmp_path / "good"), "--plot", str(tmp_path / "nowhere" / "p.png")], "does not exist"),
    ]
    out = tmp_path / "report.json"
    for arguments, message in cases:
        assert main(["inspect", *arguments, "--json", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert message in captured.err and captured.err.count("\n") == 1, captured.err
        assert not out.exists()
