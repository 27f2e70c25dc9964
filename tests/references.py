"""What the tests hold the package to, written from the method's definition rather than taken from the package."""

from __future__ import annotations

import math


def reference_scale(config) -> float:
    """The s a GfaConfig's modules multiply their slice of B A by: `scale`, over sqrt(r) under the rsqrt rule."""
    return config.scale / math.sqrt(config.r) if config.scale_rule == "rsqrt" else config.scale
