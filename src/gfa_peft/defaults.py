"""Names and default settings that the `gfa` help texts show, in a module that imports nothing.

`gfa SUB --help` builds its help from these without loading torch, transformers or PEFT, so it answers at once.
The modules that use them import them from here (`targets`, `analysis.ranks`, `analysis.lens`, `training.sweep`).
"""

ALL_LINEAR = "all-linear"
"""PEFT's shorthand for every linear layer but the output layer."""

DEFAULT_RANK_TOL = 1e-6
"""Relative tolerance of the numerical rank: singular values at or below tol * sigma_1 count as zero.

The slices are computed and decomposed in float64 from the stored float32 factors, so the decomposition itself
resolves singular values down to about 1e-15 * sigma_1; the tolerance says instead which directions matter. The
update is applied in float32 (or coarser), whose rounding is about 1.2e-7 of an entry, so a direction weaker than
1e-6 * sigma_1 (about 8 float32 ulps of the strongest) cannot be told from rounding of the update as applied.
A fixed relative tolerance, unlike matrix_rank's max(p, q) * eps, treats modules of every width alike, so their
ranks compare."""

DEFAULT_RTOL = 1e-4
"""The lens: target bound on the randomized head-energy error, as a fraction of ||M||_F^2."""

DEFAULT_TIE_TOLERANCE = 1e-3
"""The lens: errors closer than this fraction of ||Delta*||^2 are a tie (the band widens to the spectrum's error
bound)."""

DEFAULT_GRID_POINTS = 40
"""The lens: points of the default log-spaced budget grid."""


SCALE_RULES = ("constant", "rsqrt")
"""How a factor product is scaled: s = scale (GFA's paper setting; LoRA's lora_alpha = r), or s = scale / sqrt(r)
(rsLoRA's rule), under which an Adam step moves the update by an amount that does not grow with the rank."""

GFA_SCALE_RULE = "constant"
"""GfaConfig's default scale rule, and so the rule `gfa train` trains GFA under unless told (LoRA and DoRA train
under constant, lora_alpha = r, unless told)."""

LR_CHOICE_RULES = ("dev", "loss")
"""How `gfa tune` picks a rate: the best dev accuracy, or the lowest final training loss among the rates whose dev
accuracy is within the tie band of the best (docs/study.md: 100 dev questions a task cannot rank two close rates)."""
