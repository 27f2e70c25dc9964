"""`gfa bench`: records, ratios, pairing order, memory accounting, output files and bad input.

No timing is asserted: the timing targets are checked by running the bench, never by timed tests.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from fake_workers import logging_worker
from gfa_peft.analysis.budget import rank_anchors
from gfa_peft.cli import main
from gfa_peft.bench import plan as bench
from gfa_peft.bench.plan import BenchSettings, Run, add_ratios, measure_group, plan
from gfa_peft.bench.shapes import SCOPES, SHAPES, BenchShapes
from gfa_peft.bench.report import format_summary, summarize
from gfa_peft.bench.worker import CpuAllocationRecorder, Trainer, WorkerError, WorkerSpec
from gfa_peft.targets import find_targets, target_shapes

# A SmolLM2 with tiny widths: q_proj 64 -> 64, v_proj 64 -> 2 key-value heads x 16 = 32, two layers.
TINY = BenchShapes(
    "tiny", "smollm2",
    {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
     "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128},
)
LORA_PER_RANK = 2 * ((64 + 64) + (64 + 32))  # r * sum(p + q) over q_proj and v_proj of both layers
REQUIRED_KEYS = {"cell", "shapes", "scope", "anchor", "method", "trainable", "step_time_s", "tokens_per_s",
                 "peak_mem_mb", "time_ratio_to_lora", "mem_ratio_to_lora"}


def tiny_anchors(labels):
    """The budget module's placement of every method at `labels`, for TINY at q+v."""
    return {anchor.label: anchor for anchor in rank_anchors(target_shapes(TINY.build("meta"), SCOPES["q+v"]), labels)}


@pytest.fixture
def tiny_shapes(monkeypatch):
    monkeypatch.setitem(SHAPES, TINY.name, TINY)


def test_end_to_end_through_worker_processes(tiny_shapes, tmp_path):
    json_path, out = tmp_path / "records.json", tmp_path / "out"
    code = main(["bench", "--shapes", "tiny", "--scopes", "q+v", "--anchors", "1/2,1", "--methods", "gfa,gfa-gain,lora,floor,wgrad",
                 "--steps", "2", "--warmup", "1",
                 "--batch-size", "2", "--seq-len", "8", "--threads", "1", "--json", str(json_path), "--out", str(out),
                 "--no-progress"])
    assert code == 0
    records = json.loads(json_path.read_text())
    by_key = {(record["anchor"], record["method"]): record for record in records}
    assert len(by_key) == len(records) == 7
    assert set(by_key) == {("1/2", "gfa"), ("1", "gfa"), ("1/2", "gfa-gain"), ("1", "gfa-gain"), ("1", "lora"),
                           ("1", "floor"), ("1", "wgrad")}
    assert all(REQUIRED_KEYS <= record.keys() for record in records)

    anchors = tiny_anchors(["1/2", "1"])
    assert by_key["1/2", "gfa"]["trainable"] == anchors["1/2"].gfa_params
    assert by_key["1", "gfa"]["trainable"] == anchors["1"].gfa_params
    for label in ("1/2", "1"):  # one gain per target module: 2 layers x (q, v)
        assert by_key[label, "gfa-gain"]["trainable"] == anchors[label].gfa_params + 4
    assert by_key["1", "lora"]["trainable"] == LORA_PER_RANK
    assert by_key["1", "floor"]["trainable"] == by_key["1", "wgrad"]["trainable"] == 0

    lora = by_key["1", "lora"]
    for record in records:
        assert len(record["step_times_s"]) == 2
        assert record["step_time_s"] == statistics.median(record["step_times_s"])
        assert record["tokens_per_s"] == pytest.approx(16 / record["step_time_s"])
        assert record["reference"] == "tiny/q+v/1"
        assert record["time_ratio_to_lora"] == pytest.approx(record["step_time_s"] / lora["step_time_s"])
        assert record["mem_ratio_to_lora"] == pytest.approx(record["peak_mem_mb"] / lora["peak_mem_mb"])
        assert record["peak_mem_mb"] == pytest.approx(record["resting_mem_mb"] + record["step_mem_mb"])
        assert record["step_mem_mb"] > 0
    # Every method holds the same frozen model; the adapters add their factors and AdamW's two moments.
    floor = by_key["1", "floor"]["resting_mem_mb"]
    # (4 bytes each for the factor, its gradient-free moments exp_avg and exp_avg_sq; AdamW also keeps a float32
    # step count per tensor: A and B of 4 modules.)
    assert by_key["1", "lora"]["resting_mem_mb"] == pytest.approx(floor + (3 * 4 * LORA_PER_RANK + 8 * 4) / 2**20)
    # The weight-gradient floor keeps nothing between steps: its weight gradients are dropped, with no optimizer.
    assert by_key["1", "wgrad"]["resting_mem_mb"] == floor

    assert json.loads((out / "results.json").read_text()) == records
    markdown = (out / "results.md").read_text()
    assert all(record["cell"] in markdown for record in records)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["anchors"] == ["1/2", "1"] and config["settings"]["shapes"][0]["name"] == "tiny"


def test_weight_gradient_floor_computes_every_target_weight_gradient_and_changes_nothing(monkeypatch):
    spec = WorkerSpec(shapes=TINY, scope="q+v", method="wgrad", rank=None, batch_size=2, seq_len=8, device="cpu",
                      dtype="float32", threads=1, seed=0)
    trainer = Trainer(spec)
    targets = {name for name, _ in find_targets(trainer.model, SCOPES["q+v"])}
    assert {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad} == \
        {f"{name}.weight" for name in targets}
    assert trainer.optimizer is None and trainer.trainable == 0
    before = {name: parameter.clone() for name, parameter in trainer.model.named_parameters()}
    seen = []
    for name, parameter in trainer.model.named_parameters():
        if parameter.requires_grad:
            parameter.register_hook(lambda grad, name=name: seen.append(name) or grad)
    trainer.step()
    assert sorted(seen) == sorted(f"{name}.weight" for name in targets)  # every target's weight gradient, computed
    assert all(parameter.grad is None for parameter in trainer.model.parameters())  # ... and dropped
    assert all(torch.equal(parameter, before[name]) for name, parameter in trainer.model.named_parameters())


def test_cpu_recorder_counts_every_tensor_held_since_it_started():
    recorder = CpuAllocationRecorder()
    held = torch.empty(100_000)  # 400,000 bytes, held by no module: resting memory all the same
    kept = []

    def run():
        first = torch.empty(250_000)  # 1,000,000 bytes
        second = torch.empty(500_000)  # 2,000,000 bytes: 3,000,000 more held
        del first
        kept.append(torch.empty(125_000))  # 500,000 bytes: 2,500,000 more held
        del second

    assert recorder.measure(run) == (400_000, 3_400_000)
    with pytest.raises(RuntimeError, match="measures once"):
        recorder.measure(run)
    del held


def test_sub_rank1_anchor_runs_beside_its_lora_reference():
    groups = plan(BenchSettings(shapes=(TINY,), scopes=("q+v",), anchors=("1/2", "4")))
    described = [[(run.anchor, run.method, run.rank) for run in runs] for runs in groups]
    anchors = tiny_anchors(["1/2", "4"])
    assert described == [
        [("1/2", "gfa", anchors["1/2"].gfa_rank), ("1", "lora", 1), ("1", "floor", None)],
        [("4", "gfa", anchors["4"].gfa_rank), ("4", "lora", 4), ("4", "dora", 4), ("4", "floor", None)],
    ]


def test_ratios_divide_by_lora_of_the_reference_cell():
    def record(anchor, method, time, memory):
        return {"cell": f"s/q+v/{anchor}", "shapes": "s", "scope": "q+v", "anchor": anchor, "method": method,
                "batch_size": 4, "step_time_s": time, "cpu_time_s": None, "peak_mem_mb": memory,
                "step_mem_mb": memory / 2}

    records = add_ratios([record("1/2", "gfa", 3.0, 90.0), record("1", "lora", 2.0, 100.0),
                          record("4", "gfa", 5.0, 120.0)])
    assert [r["reference"] for r in records] == ["s/q+v/1", "s/q+v/1", None]
    assert [r["time_ratio_to_lora"] for r in records] == [1.5, 1.0, None]
    assert [r["mem_ratio_to_lora"] for r in records] == [0.9, 1.0, None]
    assert [r["step_mem_ratio_to_lora"] for r in records] == [0.9, 1.0, None]
    assert [r["cpu_time_ratio_to_lora"] for r in records] == [None, None, None]
    assert [r["time_ratio_to_dora"] for r in records] == [None, None, None]  # no DoRA measured


def test_summary_takes_median_and_worst_gfa_cell_against_the_targets():
    def record(anchor, method, time, memory):
        return {"cell": f"s/q+v/{anchor}", "shapes": "s", "scope": "q+v", "anchor": anchor, "method": method,
                "batch_size": 4, "step_time_s": time, "cpu_time_s": 2 * time, "peak_mem_mb": memory,
                "step_mem_mb": memory, "step_times_s": [time], "cpu_times_s": [2 * time], "threads": 2}

    records = add_ratios([
        record("1/2", "gfa", 1.00, 100.0), record("1", "gfa", 1.10, 103.0), record("1", "lora", 1.0, 100.0),
        record("1", "dora", 1.05, 110.0), record("4", "gfa", 2.08, 200.0), record("4", "lora", 2.0, 200.0),
        record("4", "dora", 2.5, 230.0),
    ])
    [summary] = summarize(records)
    assert summary["cells"] == 3
    assert summary["median_time_ratio"] == pytest.approx(1.04)  # of 1.00, 1.10, 1.04
    assert summary["worst_time_ratio"] == pytest.approx(1.10)
    assert summary["worst_mem_ratio"] == pytest.approx(1.03)
    # Anchor 1/2 is compared with DoRA r = 1, as with LoRA r = 1; 1.10 > 1.05 at anchor 1.
    assert (summary["faster_than_dora"], summary["cells_with_dora"]) == (2, 3)
    assert summary["slower_than_dora"] == ["s/q+v/1"]
    text = format_summary(records)
    assert "median 1.040 (target <= 1.07: met)" in text and "worst 1.100 (target <= 1.12: met)" in text
    assert "faster than DoRA in 2/3 cells (target: every cell: MISSED in s/q+v/1)" in text
    assert "peak memory worst 1.030 (target <= 1.02: MISSED)" in text
    assert "The steps got 100% of their threads' time" in text  # cpu = 2 x wall on 2 threads
    assert summary["median_time_over_wgrad"] is None and "weight-gradient floor" not in text

    # With the weight-gradient floor: GFA over it per cell, and the floor over DoRA.
    records = add_ratios([*records, record("1", "wgrad", 1.08, 100.0), record("4", "wgrad", 2.0, 200.0)])
    [summary] = summarize(records)
    assert summary["median_time_over_wgrad"] == pytest.approx(1.10 / 1.08)  # of 1.00/1.08, 1.10/1.08, 2.08/2.0
    assert summary["median_wgrad_over_dora"] == pytest.approx((1.08 / 1.05 + 2.0 / 2.5) / 2)
    assert "the weight-gradient floor itself over DoRA median 0.914" in format_summary(records)


def test_rounds_alternate_order_and_memory_is_measured_after_the_warmup(monkeypatch, tmp_path):
    log = []
    monkeypatch.setattr(bench, "WorkerHandle", logging_worker(log, {"wall_s": 1.0, "cpu_s": 1.0}, log_stop=True))
    settings = BenchSettings(shapes=(TINY,), scopes=("q+v",), anchors=("1",), methods=("gfa", "lora", "floor"),
                             warmup=2, steps=3)
    measure_group(plan(settings)[0], settings, tmp_path)
    forward, backward = ["gfa", "lora", "floor"], ["floor", "lora", "gfa"]
    assert [method for command, method in log if command != "stop"] == (forward + backward) * 3
    commands = [command for command, _ in log]
    assert commands == ["step"] * 6 + ["memory"] * 3 + ["step"] * 9 + ["stop"] * 3


def test_a_stopped_full_run_keeps_the_groups_it_finished(monkeypatch, tiny_shapes, tmp_path):
    started = []

    class FakeWorker:  # the second group's workers stop the run, as Ctrl-C would
        def __init__(self, spec, log_path):
            started.append(spec.rank)
            if len(started) > 2:
                raise KeyboardInterrupt

        def receive(self, expected):
            return {"trainable": 1}

        def ask(self, command):
            if command == "memory":
                return {"resting_mem_mb": 1.0, "peak_mem_mb": 3.0, "step_mem_mb": 2.0}
            return {"wall_s": 1.0, "cpu_s": 1.0}

        def stop(self):
            pass

    monkeypatch.setattr(bench, "WorkerHandle", FakeWorker)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--shapes", "tiny", "--scopes", "q+v", "--anchors", "1,4", "--methods", "gfa,lora",
              "--out", str(out), "--no-progress"])
    records = json.loads((out / "results.json").read_text())
    assert [(record["anchor"], record["method"]) for record in records] == [("1", "gfa"), ("1", "lora")]
    config = json.loads((out / "config.json").read_text())
    assert (config["groups_measured"], config["groups"]) == (1, 2)
    assert "PARTIAL: 1 of 2 groups" in (out / "results.md").read_text()

    # Another settings' run may not replace it; the same command finishes it, measuring only the missing group.
    assert main(["bench", "--shapes", "tiny", "--scopes", "q+v", "--anchors", "1,16", "--methods", "gfa,lora",
                 "--out", str(out), "--no-progress"]) == 2
    assert json.loads((out / "results.json").read_text()) == records
    log = []
    monkeypatch.setattr(bench, "WorkerHandle", logging_worker(log, {"wall_s": 2.0, "cpu_s": 2.0}))
    assert main(["bench", "--shapes", "tiny", "--scopes", "q+v", "--anchors", "1,4", "--methods", "gfa,lora",
                 "--out", str(out), "--no-progress"]) == 0
    assert {command for command, _ in log} == {"step", "memory"} and len(log) == 2 * (1 + 1 + 8)
    finished = json.loads((out / "results.json").read_text())
    assert [(record["anchor"], record["method"], record["step_time_s"]) for record in finished] == [
        ("1", "gfa", 1.0), ("1", "lora", 1.0), ("4", "gfa", 2.0), ("4", "lora", 2.0)]
    assert finished[2]["time_ratio_to_lora"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert (config["groups_measured"], config["groups"], len(config["resumed"])) == (2, 2, 1)
    assert "PARTIAL" not in (out / "results.md").read_text()


def test_a_failing_worker_is_reported_with_its_traceback(tmp_path):
    broken = BenchShapes("broken", "no-such-preset")
    settings = BenchSettings(shapes=(broken,), steps=1)
    with pytest.raises(WorkerError, match=r"bench worker lora r=1 on broken/q\+v failed:(.|\n)*no-such-preset"):
        measure_group([Run(broken, "q+v", "1", "lora", 1, batch_size=4)], settings, tmp_path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--anchors", "100000"], "anchor rank 100000 is out of range"),
        (["--anchors", "0"], "anchor '0' is not"),
        (["--anchors", "1,,4"], "empty entry"),
        (["--anchors", "4,4"], "more than once"),
        (["--shapes", "gpt5"], "unknown shapes 'gpt5'"),
        (["--scopes", "q+k"], "unknown scope 'q+k'"),
        (["--methods", "gfa,vera"], "unknown method 'vera'"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--warmup", "0"], "warmup must be at least 1"),
        (["--seq-len", "1"], "sequence length must be at least 2"),
        (["--device", "tpu"], "the bench runs on 'cpu' or 'cuda[:N]'"),
        (["--json", "missing/records.json"], "does not exist"),
        (["--json", "."], "it is a folder"),
        (["--out", "a-file"], "is not a folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("keep")
    code = main(["bench", "--quick", "--no-progress", *flags])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("gfa bench: error: ") and message in error and error.count("\n") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_without_cuda_is_refused(capsys):
    assert main(["bench", "--quick", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
