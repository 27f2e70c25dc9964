"""`gfa bench --inference`: the plan, the generation worker, records, checks against the targets, bad input.

No timing is asserted beyond being positive: the targets are checked by running the bench.
"""

from __future__ import annotations

import json

import pytest

from fake_workers import logging_worker
from gfa_peft.bench import plan as bench
from gfa_peft.bench.plan import INFERENCE_RATIOS, InferenceSettings, add_ratios, measure_group, plan
from gfa_peft.bench.report import format_summary, inference_checks
from gfa_peft.bench.shapes import SHAPES, BenchShapes
from gfa_peft.bench.worker import Generator, WorkerSpec
from gfa_peft.cli import main

TINY = BenchShapes(
    "tiny", "smollm2",
    {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
     "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128},
)


@pytest.fixture
def tiny_shapes(monkeypatch):
    monkeypatch.setitem(SHAPES, TINY.name, TINY)


@pytest.fixture
def generator():
    """Builds in-process generation sessions on TINY at all-linear. A session records allocations with PyTorch's
    profiler, of which one runs at a time, until its measured step (a worker process holds one session): so each
    earlier session's recording is ended with its measured step before the next is built, and the last at the end."""
    sessions = []

    def end_recordings() -> None:
        for session in sessions:
            if session._recorder._recording:
                session.measured_step()

    def build(method: str, batch_size: int = 2, new_tokens: int = 5) -> Generator:
        end_recordings()
        rank = None if method == "base" else 4
        sessions.append(Generator(WorkerSpec(TINY, "all-linear", method, rank, batch_size, 6, "cpu", "float32", 1, 0,
                                             task="generate", new_tokens=new_tokens)))
        return sessions[-1]

    yield build
    end_recordings()


def test_plan_measures_the_four_methods_together_at_each_batch_size():
    groups = plan(InferenceSettings(shapes=(TINY,), scopes=("q+v",), anchors=("4",), batch_sizes=(1, 8)))
    [gfa_rank] = {run.rank for runs in groups for run in runs if run.method == "gfa"}
    described = [[(run.method, run.rank, run.batch_size) for run in runs] for runs in groups]
    assert described == [
        [("base", None, batch), ("lora", 4, batch), ("gfa", gfa_rank, batch), ("gfa-merged", gfa_rank, batch)]
        for batch in (1, 8)
    ]
    specs = [bench.worker_spec(run, InferenceSettings(new_tokens=7, prompt_len=5)) for run in groups[1]]
    assert {(spec.task, spec.new_tokens, spec.seq_len, spec.batch_size) for spec in specs} == {("generate", 7, 5, 8)}


def test_rounds_alternate_the_four_methods(monkeypatch, tmp_path):
    log = []
    answer = {"prefill_s": 0.5, "prefill_cpu_s": 0.5, "decode_s": 0.1, "decode_cpu_s": 0.1, "tokens": [[1, 2]]}
    monkeypatch.setattr(bench, "WorkerHandle", logging_worker(log, answer))
    settings = InferenceSettings(shapes=(TINY,), scopes=("q+v",), batch_sizes=(2,), prompt_len=4, warmup=1, steps=2)
    records = measure_group(plan(settings)[0], settings, tmp_path)
    forward = ["base", "lora", "gfa", "gfa-merged"]
    assert [method for _, method in log] == forward + forward[::-1] + forward + forward[::-1]
    assert [command for command, _ in log] == ["step"] * 4 + ["memory"] * 4 + ["step"] * 8
    assert all(record["prefill_tokens_per_s"] == pytest.approx(2 * 4 / 0.5) for record in records)
    assert all(record["decode_tokens_per_s"] == pytest.approx(2 / 0.1) for record in records)


def test_generator_times_prefill_and_decode_and_returns_the_tokens(generator):
    session = generator("gfa", batch_size=3, new_tokens=4)
    session.step()  # the warm-up
    timed = session.timed_step()
    assert timed["prefill_s"] > 0 and timed["decode_s"] > 0
    assert 0 < timed["decode_cpu_s"] and 0 < timed["prefill_cpu_s"]
    tokens = timed["tokens"]
    assert len(tokens) == 3 and all(len(row) == 4 for row in tokens)
    memory = session.measured_step()
    assert memory["peak_mem_mb"] >= memory["resting_mem_mb"] > 0


def test_gfa_merged_and_unmerged_generate_the_same_tokens_with_a_nonzero_update(generator):
    unmerged, merged = generator("gfa"), generator("gfa-merged")
    [factor_b] = [parameter for name, parameter in unmerged.model.named_parameters() if "gfa_B" in name]
    assert factor_b.abs().sum() > 0  # B drawn at random: the update is not the zero a fresh adapter starts at
    assert merged.model.base_model.model.model.layers[0].self_attn.q_proj.merged
    assert merged.step().tolist() == unmerged.step().tolist()


def test_lora_generates_with_a_nonzero_update(generator):
    lora, base = generator("lora"), generator("base")
    assert lora.step().tolist() != base.step().tolist()


def test_end_to_end_through_worker_processes(tiny_shapes, tmp_path):
    json_path, out = tmp_path / "records.json", tmp_path / "out"
    code = main(["bench", "--inference", "--shapes", "tiny", "--scopes", "q+v", "--anchors", "1", "--batch-sizes", "2",
                 "--prompt-len", "4", "--new-tokens", "3", "--steps", "2", "--threads", "1", "--json", str(json_path),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    records = json.loads(json_path.read_text())
    assert [record["method"] for record in records] == ["base", "lora", "gfa", "gfa-merged"]
    by_method = {record["method"]: record for record in records}
    for record in records:
        assert len(record["decode_times_s"]) == 2 and record["decode_tokens_per_s"] > 0
        assert record["decode_ratio_to_lora"] == pytest.approx(record["decode_s"] / by_method["lora"]["decode_s"])
        assert record["decode_ratio_to_base"] == pytest.approx(record["decode_s"] / by_method["base"]["decode_s"])
        assert len(record["generated"]) == 2 and all(len(row) == 3 for row in record["generated"])
    assert by_method["gfa"]["generated"] == by_method["gfa-merged"]["generated"]
    assert by_method["base"]["trainable"] == 0 and by_method["gfa"]["trainable"] > 0
    assert json.loads((out / "results.json").read_text()) == records
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# gfa bench --inference") and "GFA/LoRA unmerged decode" in markdown
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def record(method: str, decode: list[float], tokens=((1, 2),), batch_size: int = 1) -> dict:
    return {"cell": "s/q+v/4", "shapes": "s", "scope": "q+v", "anchor": "4", "method": method,
            "batch_size": batch_size, "decode_s": sorted(decode)[len(decode) // 2], "decode_times_s": decode,
            "decode_cpu_s": None, "decode_cpu_times_s": None, "prefill_s": 1.0, "peak_mem_mb": 10.0,
            "generated": [list(row) for row in tokens], "threads": 1}


def test_checks_against_the_inference_targets():
    records = add_ratios([
        record("base", [1.00, 1.00, 1.00]), record("lora", [1.10, 1.10, 1.10]),
        record("gfa", [1.30, 1.30, 1.30]), record("gfa-merged", [0.98, 1.02, 1.06], tokens=((1, 3),)),
        record("lora", [1.0, 1.0, 1.0], batch_size=8), record("gfa", [1.05, 1.05, 1.05], batch_size=8),
    ], INFERENCE_RATIOS)
    first, second = inference_checks(records)
    assert (first["decode_vs_lora"], first["decode_vs_lora_met"]) == (pytest.approx(1.3 / 1.1), False)
    assert first["merged_vs_base"] == pytest.approx(1.02) and first["noise"] == pytest.approx(0.04 / 1.02)
    assert first["merged_vs_base_met"] and first["same_tokens"] is False
    assert (second["batch_size"], second["decode_vs_lora_met"], second["merged_vs_base"]) == (8, True, None)
    text = format_summary(records)
    assert "s/q+v/4 batch 1: GFA/LoRA unmerged decode 1.182 (target <= 1.1: MISSED)" in text
    assert "GFA merged/base decode 1.020 (target 1.0 within noise 3.9%: met)" in text
    assert "DIFFERENT tokens" in text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "gfa,dora"], "unknown method 'dora'"),
        (["--batch-sizes", "0"], "batch size must be at least 1"),
        (["--batch-sizes", "1,x"], "give whole numbers"),
        (["--batch-sizes", "8,8"], "batch size '8' given more than once"),
        (["--new-tokens", "1"], "new tokens must be at least 2"),
        (["--prompt-len", "0"], "prompt length must be at least 1"),
        (["--batch-size", "4"], "--batch-size is the training bench's: not with --inference"),
        (["--shapes", "gpt5"], "unknown shapes 'gpt5'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["bench", "--inference", "--quick", "--no-progress", *flags])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("gfa bench: error: ") and message in error and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_inference_flags_without_inference_are_refused(capsys):
    assert main(["bench", "--quick", "--prompt-len", "8", "--new-tokens", "4"]) == 2
    assert "--prompt-len, --new-tokens are for --inference only" in capsys.readouterr().err
