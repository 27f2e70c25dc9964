"""No command loses a user's files: output folders, merges, concurrent runs, sweeps, failed loads, bad files.

Each test is a way a careful or careless user lost files (or got a half-modified model) before io/files.py's
rule, the load checks and the sweep's settings record; see docs/files.md.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import gfa_peft
from gfa_peft import GfaConfig, GfaLayer
from gfa_peft.cli import main
from gfa_peft.data.cache import build_folder
from gfa_peft.io import files
from gfa_peft.io.files import FolderBusy, OutputRefused, ResultKind, folder_is_busy, folder_lock, output_folder
from gfa_peft.training import run as run_module
from gfa_peft.training import sweep as sweep_module
from gfa_peft.training.run import is_finished
from gfa_peft.training.sweep import ChangedRunsError, SweepSpec, run_sweep
from references import GFA_RULE_SUFFIX
from toy_models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SOME_RESULT = ResultKind("result", is_own=lambda folder: (folder / "result.txt").is_file(),
                         is_finished=lambda folder: (folder / "result.txt").is_file())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its hash."""
    return {str(path.relative_to(folder)): digest(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def train_arguments(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "rt", "--anchor", "1", "--lr", "0.01", "--steps", "2", "--cache", str(cache),
            "--out", str(out), "--no-progress", *extra]


# ---------------------------------------------------------------- 1. gfa train --out

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_train_leaves_a_folder_of_other_files_alone(cache, tmp_path, capsys, overwrite):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("four years of work")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = tree(folder)
    assert main(train_arguments(cache, folder, *overwrite)) == 2
    error = capsys.readouterr().err
    assert "is not a run folder" in error and str(folder) in error and len(error.strip().splitlines()) == 1
    assert tree(folder) == before


def test_train_out_dot_leaves_the_working_directory_alone(cache, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    assert main(train_arguments(cache, Path("."))) == 2
    assert "working directory" in capsys.readouterr().err
    assert os.listdir(work) == ["notes.txt"]


def test_overwrite_keeps_the_finished_run_until_the_new_one_is_complete(cache, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    assert main(train_arguments(cache, folder)) == 0
    before = tree(folder)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "_predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(train_arguments(cache, folder, "--overwrite"))
    assert tree(folder) == before and os.listdir(tmp_path) == ["run"]


# ---------------------------------------------------------------- 4. two runs on one folder

def test_a_second_run_on_a_folder_in_use_is_refused_at_once(cache, tmp_path, capsys):
    folder = tmp_path / "run"
    with folder_lock(folder):  # as a first `gfa train` holding it
        started = time.perf_counter()
        assert main(train_arguments(cache, folder)) == 2
        assert time.perf_counter() - started < 30  # refused before loading the model, not after training
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and str(folder) in error and "another gfa process" in error
    assert not folder.exists()


def test_the_lock_is_exclusive_released_on_exit_and_leaves_no_file(tmp_path):
    folder = tmp_path / "out"
    with folder_lock(folder):
        with pytest.raises(FolderBusy, match=str(folder)):
            with folder_lock(folder):
                pass
    with folder_lock(folder):  # released: taken again
        assert folder_is_busy(folder)
    assert not folder_is_busy(folder)
    assert not folder_is_busy(tmp_path / "absent" / "out")  # no folder to hold its lock: nobody holds it
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the rule itself

def test_a_failed_build_keeps_the_old_result_and_leftovers_of_a_killed_one_are_removed(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "result.txt").write_text("old")
    killed = [tmp_path / ".out.abc123.partial", tmp_path / ".out.def456.old"]
    for leftover in killed:
        leftover.mkdir()
    with pytest.raises(RuntimeError):
        with output_folder(folder, SOME_RESULT, overwrite=True) as building:
            (building / "result.txt").write_text("new, half written")
            raise RuntimeError("killed")
    assert (folder / "result.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the killed run's and this one's temporaries are gone

    with output_folder(folder, SOME_RESULT, overwrite=True) as building:
        (building / "result.txt").write_text("new")
    assert (folder / "result.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_folder_holding_an_input_is_never_replaced(tmp_path):
    (tmp_path / "parent" / "input").mkdir(parents=True)
    (tmp_path / "parent" / "result.txt").write_text("looks like a result")
    with pytest.raises(OutputRefused, match="an input of this command"):
        with output_folder(tmp_path / "parent", SOME_RESULT, overwrite=True, inputs=[tmp_path / "parent" / "input"]):
            pass
    assert (tmp_path / "parent" / "input").is_dir()


def test_atomic_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda handle: synced.append(os.readlink(f"/proc/self/fd/{handle}"))
                        or real_fsync(handle))
    files.write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert any(path.endswith(".tmp") for path in synced) and str(tmp_path) in synced


def test_a_full_or_unwritable_cache_is_one_line_naming_it(tmp_path):
    def disk_full(scratch: Path) -> dict:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(scratch / "model.safetensors"))

    folder = tmp_path / "cache" / "models" / "minilm"
    with pytest.raises(OutputRefused, match=f"cannot write in {folder}: No space left on device"):
        build_folder(folder, disk_full)
    assert os.listdir(folder.parent) == []

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputRefused, match="cannot write in .*file/models"):
        build_folder(tmp_path / "file" / "models" / "minilm", lambda scratch: {})


# ---------------------------------------------------------------- 2, 3. gfa merge

@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory) -> Path:
    """A sharded tiny Llama base and a GFA adapter trained on it (not zero), in one folder."""
    folder = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(folder / "base", max_shard_size="20KB")
    model = get_peft_model(tiny_llama(), GfaConfig(r=2, target_modules=["q_proj"], init_weights=False))
    model.save_pretrained(folder / "adapter")
    return folder


def merge_arguments(folder: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["merge", str(folder / "adapter"), "--base", str(base), "--out", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("escape", ["relative", "absolute"])
def test_merge_refuses_shard_names_that_leave_the_base_folder(merge_inputs, tmp_path, capsys, escape):
    base = tmp_path / "base"
    shutil.copytree(merge_inputs / "base", base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    victim = tmp_path / "victim.safetensors"
    shutil.move(base / shard, victim)  # a real shard, so the old code read it, then wrote its merge over it
    name = "../victim.safetensors" if escape == "relative" else str(victim)
    index["weight_map"] = {key: name if file == shard else file for key, file in index["weight_map"].items()}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    before = digest(victim)

    assert main(merge_arguments(merge_inputs, base, tmp_path / "merged")) == 2
    assert "which is not a file name inside" in capsys.readouterr().err
    assert digest(victim) == before and not (tmp_path / "merged").exists()


def test_merge_overwrite_never_replaces_the_folder_holding_the_base(merge_inputs, tmp_path, capsys):
    parent = tmp_path / "models"
    shutil.copytree(merge_inputs / "base", parent / "base")
    (parent / "neighbour.txt").write_text("another model's notes")
    before = tree(parent)
    assert main(merge_arguments(merge_inputs, parent / "base", parent, "--overwrite")) == 2
    assert "an input of this command" in capsys.readouterr().err
    assert tree(parent) == before


# ---------------------------------------------------------------- 5. failed loads leave the model as it was

def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


@pytest.fixture(scope="module")
def saved_llama_adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    get_peft_model(tiny_llama(), GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
                   ).save_pretrained(folder)
    return folder


def broken_copy(saved: Path, folder: Path, weights_format: str, with_layout: bool, problem: str) -> Path:
    """The saved adapter in `weights_format`, its config with or without a layout, broken by `problem`."""
    folder.mkdir()
    config = json.loads((saved / "adapter_config.json").read_text())
    tensors = load_file(saved / "adapter_model.safetensors")
    if not with_layout:
        config["layout"] = None
    if problem == "rank":  # the config says r = 3, the factors have r = 2
        config["r"] = 3
    elif problem == "dtype":
        tensors["base_model.gfa_B"] = tensors["base_model.gfa_B"] != 0
    elif problem == "shape":  # A one column short of the layout's k
        tensors["base_model.gfa_A"] = tensors["base_model.gfa_A"][:, :-1].contiguous()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if weights_format == "safetensors":
        save_file(tensors, folder / "adapter_model.safetensors")
    else:
        torch.save(tensors, folder / "adapter_model.bin")
    return folder


LOAD_CASES = [(weights_format, with_layout, problem) for weights_format in ("safetensors", "bin")
              for with_layout in (True, False) for problem in ("rank", "dtype", "shape")]


def refusal(with_layout: bool, problem: str) -> str:
    """What a load of `broken_copy`'s adapter is refused for: a config without a layout is refused first."""
    if not with_layout:
        return "records no layout"
    return "floating point" if problem == "dtype" else "gfa_[AB] has shape"


@pytest.mark.parametrize("weights_format, with_layout, problem", LOAD_CASES)
def test_a_refused_from_pretrained_leaves_the_model_as_it_was(saved_llama_adapter, tmp_path, weights_format,
                                                              with_layout, problem):
    broken = broken_copy(saved_llama_adapter, tmp_path / "broken", weights_format, with_layout, problem)
    base = tiny_llama()
    before = state(base)
    with pytest.raises(ValueError, match=refusal(with_layout, problem)):
        PeftModel.from_pretrained(base, broken)
    assert_same_state(base, before)
    assert not hasattr(base, "peft_config") and not any(isinstance(module, GfaLayer) for module in base.modules())


@pytest.mark.parametrize("weights_format, with_layout, problem", LOAD_CASES)
def test_a_refused_load_adapter_leaves_the_peft_model_as_it_was(saved_llama_adapter, tmp_path, weights_format,
                                                                with_layout, problem):
    broken = broken_copy(saved_llama_adapter, tmp_path / "broken", weights_format, with_layout, problem)
    model = get_peft_model(tiny_llama(), GfaConfig(r=2, target_modules=["q_proj"]))
    before, configs = state(model), copy.deepcopy({name: config.to_dict() for name, config in model.peft_config.items()})
    with pytest.raises(ValueError, match=refusal(with_layout, problem)):
        model.load_adapter(str(broken), adapter_name="second")
    assert_same_state(model, before)
    assert {name: config.to_dict() for name, config in model.peft_config.items()} == configs
    assert all(set(layer.gfa_slice) == {"default"} for layer in model.modules() if isinstance(layer, GfaLayer))


def test_a_sound_bin_adapter_loads(saved_llama_adapter, tmp_path):
    folder = broken_copy(saved_llama_adapter, tmp_path / "fine", "bin", with_layout=True, problem="none")
    model = PeftModel.from_pretrained(tiny_llama(), folder)
    assert torch.equal(gfa_peft.factors(model)[0],
                       load_file(saved_llama_adapter / "adapter_model.safetensors")["base_model.gfa_B"])


# ---------------------------------------------------------------- tied weights

def test_targeting_tied_weights_is_refused_naming_both_modules():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them by default
    before = state(model)
    with pytest.raises(ValueError, match="'transformer.wte' and 'lm_head' share one weight"):
        get_peft_model(model, GfaConfig(r=2, target_modules=["wte", "lm_head"]))
    assert_same_state(model, before)
    assert not any(isinstance(module, GfaLayer) for module in model.modules())
    get_peft_model(model, GfaConfig(r=2, target_modules=["lm_head"]))  # one of them is fine


# ---------------------------------------------------------------- 6. sweeps resume only the same runs

def sweep_spec(cache: Path, **settings) -> SweepSpec:
    return SweepSpec(model="minilm", tasks=("rt",), methods=("gfa",), anchors=("1",), seeds=(0,),
                     learning_rates=(1e-2,), settings={"steps": 2, "cache": str(cache), **settings})


@pytest.fixture(scope="module")
def finished_sweep(cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweeps") / "sweep"
    run_sweep(sweep_spec(cache), root, progress=False, log=lambda message: None)
    return root


def test_a_sweep_with_other_settings_names_the_changed_runs_and_stops(cache, finished_sweep, tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    shutil.copytree(finished_sweep, root)
    before = tree(root)
    trained = []
    monkeypatch.setattr(sweep_module, "execute", lambda *args: trained.append(args[1]))
    changed = rf"rt/gfa-1-s0-lr0.01{GFA_RULE_SUFFIX} \(steps: 2 -> 3.*--rerun-changed"
    with pytest.raises(ChangedRunsError, match=changed):
        run_sweep(sweep_spec(cache, steps=3), root, progress=False, log=lambda message: None)
    assert trained == [] and tree(root) == before

    monkeypatch.undo()
    run_sweep(sweep_spec(cache, steps=3), root, progress=False, log=lambda message: None, rerun_changed=True)
    record = json.loads((root / "rt" / f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}" / "config.json").read_text())
    assert record["resolved"]["steps"] == 3
    assert json.loads((root / "rt" / f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}" / "metrics.json").read_text())["steps"] == 3


def test_the_sweep_command_refuses_changed_runs_in_one_line(cache, finished_sweep, tmp_path, capsys):
    root = tmp_path / "sweep"
    shutil.copytree(finished_sweep, root)
    code = main(["sweep", "--methods", "gfa", "--anchors", "1", "--lrs", "0.01", "--steps", "2", "--batch-size", "4",
                 "--cache", str(cache), "--out", str(root), "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "batch_size: 16 -> 4" in error


def test_an_empty_metrics_file_is_not_a_finished_run(cache, finished_sweep, tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    shutil.copytree(finished_sweep, root)
    folder = root / "rt" / f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}"
    (folder / "metrics.json").write_text("")
    assert not is_finished(folder)
    trained = []
    original = sweep_module.execute
    monkeypatch.setattr(sweep_module, "execute", lambda *args: trained.append(args[1].name) or original(*args))
    summary = run_sweep(sweep_spec(cache), root, progress=False, log=lambda message: None)
    assert trained == [f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}"] and is_finished(folder) and summary["cells"][0]["n"] == 1


# ---------------------------------------------------------------- 7. gfa inspect on hostile files

def test_inspect_refuses_a_layout_too_large_to_analyse_before_allocating(tmp_path, capsys):
    side = 10**6  # one module of 10^6 x 10^6: d = 10^12, m = k = 10^6, factors of 10^6 x 1 are only 8 MB
    layout = {"d": side * side, "m": side, "k": side, "modules": [["big", [side, side], 0]]}
    GfaConfig(r=1, target_modules=["big"], layout=layout).save_pretrained(tmp_path)
    save_file({"base_model.gfa_B": torch.ones(side, 1), "base_model.gfa_A": torch.ones(1, side)},
              tmp_path / "adapter_model.safetensors")
    started = time.perf_counter()
    assert main(["inspect", str(tmp_path), "--no-progress"]) == 2
    assert time.perf_counter() - started < 20
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "module 'big' claims an update of shape [1000000, 1000000]" in error


@pytest.mark.parametrize("header, message", [
    (b"[1, 2]", "its header is not a JSON object"),
    (b'{"base_model.gfa_B": {"dtype": "F32", "shape": [2, 1]}}', "has data offsets None"),
    (b'{"base_model.gfa_B": "nope"}', "has no description"),
    (b'{"base_model.gfa_B": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 4]}}', "spans 4 bytes"),
])
def test_inspect_gives_one_line_for_a_malformed_safetensors_header(saved_llama_adapter, tmp_path, capsys, header,
                                                                   message):
    folder = tmp_path / "adapter"
    shutil.copytree(saved_llama_adapter, folder)
    data = header + b" " * (-len(header) % 8)
    (folder / "adapter_model.safetensors").write_bytes(len(data).to_bytes(8, "little") + data + b"\0" * 4)
    assert main(["inspect", str(folder), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error


def test_inspect_gives_one_line_for_a_malformed_layout(saved_llama_adapter, tmp_path, capsys):
    folder = tmp_path / "adapter"
    shutil.copytree(saved_llama_adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["layout"]["modules"] = [["q", "not a shape", 0]]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert main(["inspect", str(folder), "--no-progress"]) == 2
    assert "malformed GFA layout record" in capsys.readouterr().err


def test_lens_gives_one_line_for_a_malformed_deltas_file(tmp_path, capsys):
    header = b'{"layers.0.q": {"dtype": "F32", "shape": [4, 4]}}'
    (tmp_path / "deltas.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert main(["lens", "--deltas", str(tmp_path / "deltas.safetensors"), "--json", "-"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "has data offsets None" in error


# ---------------------------------------------------------------- issue 23: what passed for a command's own result

@pytest.mark.parametrize("with_weights", [False, True])
def test_train_refuses_a_model_folder_that_only_looks_like_an_unfinished_run(cache, tmp_path, capsys, with_weights):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    if with_weights:
        (folder / "model").mkdir()
        (folder / "model" / "model.safetensors").write_bytes(b"weights")
    before = tree(folder)
    assert main(train_arguments(cache, folder)) == 2
    error = capsys.readouterr().err
    assert "is not a run folder" in error and str(folder) in error and len(error.strip().splitlines()) == 1
    assert tree(folder) == before and sorted(os.listdir(tmp_path)) == ["mine"]


def test_merge_overwrite_replaces_its_own_merged_model_but_not_one_holding_other_files(merge_inputs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(merge_arguments(merge_inputs, merge_inputs / "base", out)) == 0
    assert main(merge_arguments(merge_inputs, merge_inputs / "base", out, "--overwrite")) == 0  # its own: replaced
    (out / "thesis.txt").write_text("four years of work")
    before = tree(out)
    assert main(merge_arguments(merge_inputs, merge_inputs / "base", out, "--overwrite")) == 2
    error = capsys.readouterr().err
    assert "is not a merged model folder" in error and len(error.strip().splitlines()) == 1
    assert tree(out) == before

    foreign = tmp_path / "checkpoint"  # a checkpoint that merge did not write: config and weights, and a thesis
    foreign.mkdir()
    for name in ("config.json", "model.safetensors", "thesis.txt"):
        (foreign / name).write_text(name)
    before = tree(foreign)
    assert main(merge_arguments(merge_inputs, merge_inputs / "base", foreign, "--overwrite")) == 2
    assert tree(foreign) == before


@pytest.mark.parametrize("inside", ["base", "adapter"])
def test_merge_refuses_an_out_folder_inside_an_input(merge_inputs, tmp_path, capsys, inside):
    shutil.copytree(merge_inputs, tmp_path / "inputs")
    before = tree(tmp_path / "inputs")
    assert main(merge_arguments(tmp_path / "inputs", tmp_path / "inputs" / "base",
                                tmp_path / "inputs" / inside / "merged")) == 2
    error = capsys.readouterr().err
    assert "lies inside" in error and "an input of this command" in error and len(error.strip().splitlines()) == 1
    assert tree(tmp_path / "inputs") == before and not (tmp_path / "inputs" / inside / "merged").exists()


def test_a_full_disk_during_a_merge_is_one_line_and_leaves_nothing(merge_inputs, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from gfa_peft.adapters import merge as merge_module

    def disk_full(tensors, path, metadata=None):  # what safetensors raises when the disk fills
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                              f'"{path}"')

    monkeypatch.setattr(merge_module, "save_file", disk_full)
    assert main(merge_arguments(merge_inputs, merge_inputs / "base", tmp_path / "merged")) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "No space left on device" in error
    assert f"cannot write in {tmp_path / 'merged'}" in error and os.listdir(tmp_path) == []


def test_merged_files_get_the_umasks_mode_and_no_cache_marker(merge_inputs, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(merge_inputs / "base", base)
    (base / "DONE.json").write_text("{}")  # as in the asset cache
    umask = os.umask(0o022)
    try:
        assert main(merge_arguments(merge_inputs, base, tmp_path / "merged")) == 0
    finally:
        os.umask(umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "merged").iterdir()}
    assert "DONE.json" not in modes and set(modes.values()) == {0o644}, modes


def test_a_publish_killed_between_its_renames_leaves_the_old_result_for_the_next_run(tmp_path):
    """A process killed (os._exit, no clean-up) after moving the old result aside and before renaming the new one
    into place: the next run puts the old result back instead of deleting it."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "result.txt").write_text("old")
    killed = f"""
import os
from pathlib import Path
from gfa_peft.io import files
kind = files.ResultKind("result", is_own=lambda f: (f / "result.txt").is_file(),
                        is_finished=lambda f: (f / "result.txt").is_file())
renames = []
real_rename = os.rename
def rename(source, target):
    renames.append(target)
    if len(renames) == 2:
        os._exit(9)
    real_rename(source, target)
files.os.rename = rename
with files.output_folder(Path({str(folder)!r}), kind, overwrite=True) as building:
    (building / "result.txt").write_text("new")
"""
    environment = {**os.environ, "PYTHONPATH": str(Path(files.__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", killed], env=environment, capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr
    assert not folder.exists() and any(name.endswith(".old") for name in os.listdir(tmp_path))

    with pytest.raises(OutputRefused, match="already holds a finished result"):  # the old one is back, and finished
        with output_folder(folder, SOME_RESULT):
            pass
    assert (folder / "result.txt").read_text() == "old" and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("command", [["count", "--model", "minilm"], ["merge"], ["convert"]])
def test_json_replaces_only_a_report_of_its_own(merge_inputs, tmp_path, capsys, command):
    arguments = (merge_arguments(merge_inputs, merge_inputs / "base", tmp_path / "merged") if command == ["merge"]
                 else ["convert", str(merge_inputs / "adapter"), "--rank", "2", "--base", str(merge_inputs / "base"),
                       "--out", str(tmp_path / "merged")] if command == ["convert"] else command)
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "bert"}')
    assert main([*arguments, "--json", str(config)]) == 2
    error = capsys.readouterr().err
    assert "is not a gfa JSON report" in error and len(error.strip().splitlines()) == 1
    assert config.read_text() == '{"model_type": "bert"}' and not (tmp_path / "merged").exists()

    report = tmp_path / "report.json"
    assert main([*arguments, "--json", str(report)]) == 0
    assert json.loads(report.read_text())["gfa_report"].startswith("gfa-peft ")
    if command != ["count", "--model", "minilm"]:  # their --overwrite also replaces the file
        assert main([*arguments, "--overwrite", "--json", str(config)]) == 0
        assert "gfa_report" in json.loads(config.read_text())
    else:
        assert main([*arguments, "--json", str(report)]) == 0  # a report of its own is replaced


def test_plot_and_saved_deltas_replace_only_files_of_their_own(saved_llama_adapter, tmp_path, capsys):
    import matplotlib.pyplot as plt

    from gfa_peft.analysis.lens.inputs import save_deltas
    from gfa_peft.cli.arguments import is_plot

    figure = plt.figure()
    figure.savefig(tmp_path / "users.png")  # a PNG of the user's: matplotlib's, without gfa's mark
    plt.close(figure)
    users_png = (tmp_path / "users.png").read_bytes()
    assert main(["inspect", str(saved_llama_adapter), "--no-progress", "--plot", str(tmp_path / "users.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is not a gfa figure" in error
    assert (tmp_path / "users.png").read_bytes() == users_png
    ours = tmp_path / "ranks.png"
    for _ in range(2):  # written, then replaced: a figure of its own
        assert main(["inspect", str(saved_llama_adapter), "--no-progress", "--plot", str(ours)]) == 0
        assert is_plot(ours)

    torch.manual_seed(0)
    save_deltas(tmp_path / "deltas.safetensors", {"layers.0.q": torch.randn(8, 8), "layers.0.v": torch.randn(4, 8)})
    save_file({"weight": torch.ones(2)}, tmp_path / "users.safetensors")
    users_tensors = (tmp_path / "users.safetensors").read_bytes()
    lens = ["lens", "--deltas", str(tmp_path / "deltas.safetensors"), "--anchors", "1", "--json", "-", "--save-deltas"]
    assert main([*lens, str(tmp_path / "users.safetensors")]) == 2
    assert "is not a deltas file gfa lens saved" in capsys.readouterr().err
    assert (tmp_path / "users.safetensors").read_bytes() == users_tensors
    for _ in range(2):
        assert main([*lens, str(tmp_path / "copy.safetensors")]) == 0
    assert load_file(tmp_path / "copy.safetensors").keys() == {"layers.0.q", "layers.0.v"}


def test_records_hold_no_absolute_path_and_older_records_with_one_still_resume(cache, finished_sweep, tmp_path,
                                                                               monkeypatch):
    run = finished_sweep / "rt" / f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}"
    assert json.loads((run / "config.json").read_text())["resolved"]["model_dir"] == "models/minilm"
    assert json.loads((finished_sweep / "results.json").read_text())["figure"] == "accuracy_vs_params.png"
    assert str(tmp_path.parent) not in (finished_sweep / "results.json").read_text()

    root = tmp_path / "sweep"
    shutil.copytree(finished_sweep, root)
    record = json.loads((root / run.relative_to(finished_sweep) / "config.json").read_text())
    record["resolved"]["model_dir"] = str(cache / "models" / "minilm")  # as records were written before
    (root / run.relative_to(finished_sweep) / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(sweep_module, "execute", lambda *args: pytest.fail("a finished run was trained again"))
    summary = run_sweep(sweep_spec(cache), root, progress=False, log=lambda message: None)
    assert summary["cells"][0]["n"] == 1 and summary["figure"] == str(root / "accuracy_vs_params.png")


# ---------------------------------------------------------------- issue 23: what a newcomer saw

def test_train_prints_a_table_and_json_on_request_and_no_loading_bar(cache, tmp_path, capsys):
    assert main(train_arguments(cache, tmp_path / "run")) == 0
    shown = capsys.readouterr()
    assert "Loading weights" not in shown.err  # --no-progress hides transformers' bars too
    lines = shown.out.splitlines()
    assert lines[0].startswith("gfa at anchor 1 (r=") and lines[1].split() == ["task", "accuracy", "%", "majority",
                                                                                "baseline", "%"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert lines[2].split() == ["rt", f"{100 * metrics['accuracy']:.1f}", f"{100 * metrics['majority_baseline']:.1f}"]
    assert not shown.out.lstrip().startswith("{")

    assert main(train_arguments(cache, tmp_path / "again", "--json", "-")) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "gfa"


def test_demo_writes_its_summary_as_json(tmp_path, capsys, monkeypatch):
    from gfa_peft.cli import demo

    summary = {"cells": [], "figure": "runs/demo/accuracy_vs_params.png"}
    monkeypatch.setattr(demo, "run_spec", lambda spec, out, progress: summary)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == {"gfa_report": f"gfa-peft {gfa_peft.__version__}", **summary}
