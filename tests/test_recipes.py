"""Tuned learning rates: shipped with the package, overridden by the user's own saved ones, never written into it."""

from __future__ import annotations

import hashlib

import pytest

from gfa_peft.training import recipes


def test_saved_rates_go_to_the_cache_and_override_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("GFA_CACHE", str(tmp_path / "cache"))
    shipped_bytes = recipes.SHIPPED_LEARNING_RATES.read_bytes()
    shipped = recipes.learning_rates()
    key, methods = next(iter(shipped.items()))
    method = next(iter(methods))

    written = recipes.save_learning_rates(key, {method: 0.123, "newmethod": 4e-4})

    assert written == tmp_path / "cache" / "default_lrs.json"
    assert recipes.default_learning_rate(key, method) == 0.123
    assert recipes.default_learning_rate(key, "newmethod") == 4e-4
    others = {name: rate for name, rate in methods.items() if name != method}
    assert all(recipes.default_learning_rate(key, name) == rate for name, rate in others.items())
    assert hashlib.sha256(recipes.SHIPPED_LEARNING_RATES.read_bytes()).digest() == \
        hashlib.sha256(shipped_bytes).digest()


def test_a_method_without_a_tuned_rate_asks_for_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GFA_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="no tuned learning rate for nothing under the minilm recipe"):
        recipes.default_learning_rate("minilm", "nothing")
