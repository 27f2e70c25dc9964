"""Fixtures shared by the training and sweep tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_assets import fake_cache


@pytest.fixture
def one_thread():
    """Tiny matrices run fastest on one thread (and do not fight other jobs for the cores).

    Modules of such tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A fake asset cache with tiny models and tasks, built once per test module."""
    return fake_cache(tmp_path_factory.mktemp("cache"))
