"""What the tests hold the package to, written from the method's definition rather than taken from the package."""

from __future__ import annotations

import math

from gfa_peft.defaults import GFA_SCALE_RULE

GFA_RULE_SUFFIX = "" if GFA_SCALE_RULE == "constant" else f"-{GFA_SCALE_RULE}"
"""How the name of a GFA run under GFA's default scale rule ends: a run's name says its rule unless it is constant."""


def reference_scale(config) -> float:
    """The s a GfaConfig's modules multiply their slice of B A by: `scale`, over sqrt(r) under the rsqrt rule."""
    return config.scale / math.sqrt(config.r) if config.scale_rule == "rsqrt" else config.scale
