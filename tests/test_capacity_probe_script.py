"""scripts/capacity_probe.py, the capacity half of docs/study.md's "speed or capacity" question: the best rank-r
update on GFA's grid against a dense SVD, and the losses it reports against PEFT's own unmerged adapter."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from gfa_peft.analysis.lens.report import global_matrix
from gfa_peft.layout import build_layout
from gfa_peft.training.run import RunConfig, train
from script_modules import load_script


NO_PADDING = [("a", (6, 5)), ("b", (4, 7)), ("c", (2, 7))]  # d = 72: a 9 x 8 grid
PADDING = [("a", (6, 5)), ("b", (4, 7)), ("c", (3, 3))]  # d = 67: an 8 x 9 grid, 5 padding entries


def test_without_padding_the_grid_approximation_is_the_truncated_svd():
    torch.manual_seed(0)
    layout = build_layout(NO_PADDING)
    deltas = {piece.name: torch.randn(piece.shape) for piece in layout.modules}
    singular_values = torch.linalg.svdvals(global_matrix(deltas, layout).double())
    script = load_script("capacity_probe")
    for rank in (1, 3, layout.max_rank()):
        projected = script.best_grid_approximation(deltas, layout, rank)
        assert torch.linalg.matrix_rank(global_matrix(projected, layout), rtol=1e-5) == rank  # float32 updates
        tail = singular_values[rank:].square().sum() / singular_values.square().sum()  # Eckart-Young's optimum
        assert script.relative_error(deltas, projected) == pytest.approx(float(tail), abs=1e-6)
    torch.testing.assert_close(projected, deltas, atol=1e-5, rtol=1e-5)


def test_free_padding_lowers_the_error_and_recovers_an_update_gfa_can_express():
    torch.manual_seed(0)
    layout = build_layout(PADDING)
    script = load_script("capacity_probe")
    deltas = {piece.name: torch.randn(piece.shape) for piece in layout.modules}
    zero_padded = torch.linalg.svdvals(global_matrix(deltas, layout).double())
    tail = float(zero_padded[2:].square().sum() / zero_padded.square().sum())
    assert script.relative_error(deltas, script.best_grid_approximation(deltas, layout, 2)) < tail - 1e-3

    product = (torch.randn(layout.m, 2) @ torch.randn(2, layout.k)).view(-1)  # a rank-2 B A, padding and all
    expressible = {piece.name: product[piece.offset:piece.end].view(piece.shape) for piece in layout.modules}
    zero_padded = torch.linalg.svdvals(global_matrix(expressible, layout).double())
    assert zero_padded[2] > 1e-3 * zero_padded[0]  # dropping the padding made it rank 3: plain SVD would miss it
    assert script.relative_error(expressible, script.best_grid_approximation(expressible, layout, 2)) < 1e-6


def test_a_gfa_adapter_is_already_on_its_grid_and_the_losses_are_its_unmerged_loss(cache, tmp_path, monkeypatch, capsys):
    """Probing a GFA run against itself: its update has rank r on its grid, so the projection keeps all of it, and
    every loss with the update equals the loss of the adapter served unmerged by PEFT on the same batches."""
    run = tmp_path / "run"
    train(RunConfig(model="smollm2", task="arc_easy", method="gfa", anchor="1", steps=2, lr=1e-2, cache=str(cache)),
          run, progress=False)
    monkeypatch.setattr(sys, "argv", ["capacity_probe.py", str(run), str(run), "--examples", "6"])
    script = load_script("capacity_probe")
    script.main()
    probe = json.loads(capsys.readouterr().out)
    assert probe["relative_error"] < 1e-6

    prepared = script.prepared_run(run)
    batches = script.sample_batches(prepared, 6)
    base = LlamaForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32).eval()
    assert probe["loss"]["base"] == pytest.approx(script.answer_loss(base, batches), abs=1e-5)
    unmerged = script.answer_loss(PeftModel.from_pretrained(base, run / "adapter").eval(), batches)
    assert unmerged != pytest.approx(probe["loss"]["base"], abs=1e-4)  # two steps moved the loss: a real check
    for measured in ("lora", "lora_on_gfa_grid", "gfa"):
        assert probe["loss"][measured] == pytest.approx(unmerged, abs=1e-4)


def test_a_classification_run_is_refused_by_name(cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(RunConfig(task="rt", method="gfa", anchor="1", steps=1, lr=1e-2, cache=str(cache)), run, progress=False)
    monkeypatch.setattr(sys, "argv", ["capacity_probe.py", str(run), str(run)])
    with pytest.raises(SystemExit, match="classification run"):
        load_script("capacity_probe").main()
