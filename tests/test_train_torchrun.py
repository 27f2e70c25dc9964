"""`gfa train` under `torchrun --nproc_per_node 2` (gloo, CPU, loopback) equals one process on the same global batch."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from gfa_peft.cli import main
from gfa_peft.data.tasks import load_user_task
from tiny_assets import FILLER, NEGATIVE, POSITIVE, save_tiny_bert

TIMEOUT_S = 150


def save_classifier_without_dropout(folder):
    """The tiny BERT of the training tests with dropout off: dropout masks would differ between 1 and 2 processes."""
    save_tiny_bert(folder)
    config = AutoConfig.from_pretrained(folder)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(folder)


def write_reviews(path, count, seed):
    """Reviews of 3 to 9 words (varied lengths, so length grouping reorders them), labelled by their sentiment words."""
    generator = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for _ in range(count):
            label = generator.choice(["pos", "neg"])
            words = (POSITIVE if label == "pos" else NEGATIVE) + FILLER[:4]
            writer.writerow([" ".join(generator.choice(words) for _ in range(generator.randint(3, 9))), label])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun")
    save_classifier_without_dropout(folder / "model")
    write_reviews(folder / "train.csv", 100, seed=0)
    write_reviews(folder / "test.csv", 9, seed=1)  # odd: the two processes evaluate 5 and 4 examples
    train_size = load_user_task(folder / "train.csv", folder / "test.csv")[1]["train"].num_rows
    # transformers sizes its length groups by the batch it is given: with this many examples, groups sized by
    # the per-process batch (2) would order the examples differently than groups sized by the global one (4).
    assert min(train_size // 8, 50) * 2 != min(train_size // 16, 50) * 4
    return folder


def train_arguments(folder, out, batch_size=4):
    return ["train", "--model", str(folder / "model"), "--train-file", str(folder / "train.csv"),
            "--eval-file", str(folder / "test.csv"), "--method", "gfa", "--rank", "2", "--steps", "5",
            "--batch-size", str(batch_size), "--lr", "0.02", "--out", str(out), "--no-progress"]


def torchrun(arguments, timeout=TIMEOUT_S):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        environment["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "gfa_peft.cli", *arguments]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


def test_two_processes_train_the_same_adapter_as_one_and_write_it_once(setup, capsys):
    single, double = setup / "single", setup / "double"
    assert main(train_arguments(setup, single)) == 0
    capsys.readouterr()
    result = torchrun(train_arguments(setup, double))
    assert result.returncode == 0, result.stderr[-3000:]

    expected, got = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (single, double))
    assert set(got) == set(expected) and {"base_model.gfa_A", "base_model.gfa_B"} <= set(got)
    for key in expected:
        assert not torch.equal(expected[key], torch.zeros_like(expected[key]))
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)

    assert sorted(os.listdir(double)) == sorted(os.listdir(single))
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (single, double)]
    assert metrics[1]["eval_examples"] == metrics[0]["eval_examples"] == 9  # all of it, gathered from both shares
    assert metrics[1]["accuracy"] == metrics[0]["accuracy"]
    assert result.stdout.count("run folder:") == 1  # one process reports


def test_world_size_that_does_not_divide_the_batch_is_refused_before_anything_starts(setup, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun tells each of its processes; no process group is needed
    assert main(train_arguments(setup, setup / "odd", batch_size=5)) == 2
    assert "a global batch of 5 does not split evenly over 2 processes" in capsys.readouterr().err
    assert not (setup / "odd").exists()


@pytest.mark.slow
def test_world_size_that_does_not_divide_the_batch_stops_every_rank(setup):
    result = torchrun(train_arguments(setup, setup / "odd", batch_size=5))
    assert result.returncode != 0
    message = "gfa train: error: a global batch of 5 does not split evenly over 2 processes"
    assert result.stderr.count(message) == 2  # both ranks
    assert not (setup / "odd").exists()
