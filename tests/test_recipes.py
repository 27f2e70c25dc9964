"""Tuned learning rates: shipped with the package, overridden by the user's own saved ones, never written into it."""

from __future__ import annotations

import hashlib
import json

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


def test_a_rate_per_anchor_serves_its_anchors_and_the_rest_take_its_other_anchors_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("GFA_CACHE", str(tmp_path))
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"minilm": {"gfa": {"*": 0.01, "16": 0.003}, "lora": 0.003,
                                              "dora": {"1": 0.01}}}))
    monkeypatch.setattr(recipes, "SHIPPED_LEARNING_RATES", shipped)
    assert [recipes.default_learning_rate("minilm", "gfa", anchor) for anchor in ("1/2", "4", "16", None)] == \
        [0.01, 0.01, 0.003, 0.01]
    assert recipes.default_learning_rate("minilm", "lora", "16") == 0.003
    with pytest.raises(ValueError, match="no tuned learning rate for dora at anchor 4 under the minilm recipe"):
        recipes.default_learning_rate("minilm", "dora", "4")
    with pytest.raises(ValueError, match="for dora at an explicit rank \\(its per-anchor rates have no '\\*' entry\\)"):
        recipes.default_learning_rate("minilm", "dora")

    recipes.save_learning_rates("minilm", {"gfa": {"4": 0.03}, "lora": {"16": 0.001}, "dora": 0.002})
    rates = recipes.learning_rates()["minilm"]
    assert rates == {"gfa": {"*": 0.01, "4": 0.03, "16": 0.003},  # a saved anchor replaces that anchor only
                     "lora": {"*": 0.003, "16": 0.001},  # a single shipped rate serves the anchors not saved
                     "dora": 0.002}  # one saved rate replaces the whole entry
    recipes.save_learning_rates("minilm", {"gfa": 0.005})
    assert recipes.learning_rates()["minilm"]["gfa"] == 0.005
    assert recipes.default_learning_rate("minilm", "gfa", "16") == 0.005


def test_a_scale_rule_has_its_own_rates_and_never_borrows_the_constant_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("GFA_CACHE", str(tmp_path))
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"minilm": {"gfa": 0.003, "gfa:rsqrt": {"*": 0.01, "16": 0.003}, "dora": 0.003}}))
    monkeypatch.setattr(recipes, "SHIPPED_LEARNING_RATES", shipped)
    assert recipes.default_learning_rate("minilm", "gfa", "16") == 0.003
    assert [recipes.default_learning_rate("minilm", "gfa", anchor, "rsqrt") for anchor in ("1", "16")] == [0.01, 0.003]
    # DoRA was tuned under the constant rule only: under rsqrt its rate would step 1/sqrt(r) as far
    with pytest.raises(ValueError, match="no tuned learning rate for dora with --scale-rule rsqrt at anchor 4"):
        recipes.default_learning_rate("minilm", "dora", "4", "rsqrt")
    recipes.save_learning_rates("minilm", {recipes.rate_entry("dora", "rsqrt"): 0.02})
    assert recipes.default_learning_rate("minilm", "dora", "4", "rsqrt") == 0.02
    assert recipes.default_learning_rate("minilm", "dora", "4") == 0.003
