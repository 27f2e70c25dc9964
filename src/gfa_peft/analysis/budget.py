"""Exact trainable-parameter counts, and the rank anchors at which every method of a sweep is compared.

For N target modules with update shapes (p_i, q_i, ...) in GFA's (out, in, ...) orientation, q_i being the
product of the trailing dimensions, d = sum_i p_i q_i, S = sum_i (p_i + q_i) and the m x k global matrix:

    LoRA     r * S                                   (A_i: r x q_i, B_i: p_i x r)
    DoRA     r * S + sum_i p_i                        (plus one magnitude per output row)
    GFA      r * (m + k)                              (B: m x r, A: r x k)
    VeRA     sum_i p_i + N * r                        (lambda_b per output row, lambda_d of length r per module;
                                                       the shared random projections are frozen buffers)
    VB-LoRA  V * (L + R * S / L)                      (a V x L vector bank, and per module R x (q_i / L) x V and
                                                       (p_i / L) x R x V logits)

These are PEFT 0.21's trainable counts (`get_nb_trainable_parameters()`), classifier heads and biases excluded.
Shapes alone cannot tell an embedding from a linear layer, which matters twice: PEFT's DoRA gives an
`nn.Embedding` one magnitude per embedding dimension (its q, not its p), and VeRA and VB-LoRA adapt linear
layers only, while their counts here treat every 2-D shape as linear (shapes with more dims get None).

A rank anchor is one budget at which all methods are placed: LoRA's count at rank r (label "r"), or the
sub-LoRA-rank-1 anchor "1/2" whose budget is 0.3 x LoRA's rank-1 count. GFA, VeRA and VB-LoRA each take the
value of their size knob whose count is nearest the budget, ties going to the smaller value. GFA's rank is clamped to
[1, min(m, k)], so GFA is always placed (the fraction `gfa_params / budget` shows how close it came). A per-module
method whose smallest configuration already exceeds the budget cannot reach it and is reported as None: LoRA and
DoRA below rank 1, VeRA below sum_i p_i + N, VB-LoRA below `VBLORA_TOPK` vectors. LoRA and DoRA sit at the
anchor's LoRA rank, as in the paper, so DoRA carries its magnitude vectors on top of the budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

from gfa_peft.layout import Layout, ModuleOrder, build_layout, order_modules

Shape = tuple[int, ...]

DEFAULT_ANCHORS = ("1/2", "1", "2", "4", "8", "16")
SUB_RANK1_LABEL = "1/2"
SUB_RANK1_FRACTION = Fraction(3, 10)
"""The "1/2" anchor's budget as a fraction of LoRA's rank-1 count (the paper's "roughly 0.3x")."""

VBLORA_RANK = 4
"""VB-LoRA's rank R, fixed so that the bank size `num_vectors` is its one knob (PEFT's and VB-LoRA's default)."""
VBLORA_TOPK = 2
"""PEFT's default top-k mixing; the bank needs at least this many vectors."""
VBLORA_MAX_VECTOR_LENGTH = 256
"""PEFT's default vector length; smaller models get the largest divisor of their widths up to this."""


def _rows_and_columns(shape: Shape) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _check_rank(r: int, what: str = "rank") -> None:
    if r < 1:
        raise ValueError(f"{what} must be a positive integer, got {r}")


def lora_params(shapes: Iterable[Shape], r: int) -> int:
    """LoRA's trainable count r * sum_i (p_i + q_i)."""
    _check_rank(r)
    return r * sum(sum(_rows_and_columns(shape)) for shape in shapes)


def dora_params(shapes: Iterable[Shape], r: int) -> int:
    """DoRA's trainable count: LoRA's plus one magnitude per output row, sum_i p_i."""
    shapes = list(shapes)
    return lora_params(shapes, r) + sum(shape[0] for shape in shapes)


def gfa_params(layout: Layout, r: int, module_gain: bool = False) -> int:
    """GFA's trainable count r * (m + k), plus one gain per module (N) with module gains."""
    _check_rank(r)
    return layout.trainable(r, module_gain)


def vera_params(shapes: Iterable[Shape], r: int) -> int:
    """VeRA's trainable count sum_i p_i + N * r (the shared projections are frozen)."""
    _check_rank(r)
    shapes = list(shapes)
    return sum(shape[0] for shape in shapes) + len(shapes) * r


def vblora_vector_length(shapes: Iterable[Shape]) -> int:
    """The largest length up to `VBLORA_MAX_VECTOR_LENGTH` that divides every module's in and out width."""
    width = math.gcd(*(dim for shape in shapes for dim in _rows_and_columns(shape)))
    return max(length for length in range(1, min(width, VBLORA_MAX_VECTOR_LENGTH) + 1) if width % length == 0)


def vblora_params(shapes: Iterable[Shape], num_vectors: int, vector_length: int, r: int = VBLORA_RANK) -> int:
    """VB-LoRA's trainable count num_vectors * (L + r * S / L): the bank plus every module's logits."""
    _check_rank(num_vectors, "num_vectors")
    _check_rank(r)
    widths = [dim for shape in shapes for dim in _rows_and_columns(shape)]
    if any(dim % vector_length for dim in widths):
        raise ValueError(f"vector_length {vector_length} does not divide every module width {sorted(set(widths))}")
    return num_vectors * (vector_length + r * sum(widths) // vector_length)


@dataclass(frozen=True)
class Anchor:
    """One matched budget and every method's place at it (None: the method cannot reach this budget)."""

    label: str
    lora_rank: int | None
    budget: int
    gfa_rank: int
    gfa_params: int
    lora_params: int | None
    dora_params: int | None
    vera_rank: int | None
    vera_params: int | None
    vblora_num_vectors: int | None
    vblora_params: int | None
    vblora_rank: int | None
    vblora_vector_length: int | None

    @property
    def gfa_fraction(self) -> float:
        """GFA's count as a fraction of the budget."""
        return self.gfa_params / self.budget

    def to_dict(self) -> dict:
        """Plain JSON keys: the counts as `gfa`, `lora`, `dora`, `vera`, `vblora`, each method's knob beside it."""
        names = {"gfa_params": "gfa", "lora_params": "lora", "dora_params": "dora", "vera_params": "vera",
                 "vblora_params": "vblora"}
        record = {names.get(key, key): value for key, value in asdict(self).items()}
        record["gfa_fraction"] = self.gfa_fraction
        return record


def parse_anchor(label: str) -> int | None:
    """The LoRA rank an anchor label stands for: a positive integer "1", "2", ..., or None for "1/2".

    Raises ValueError for anything else.
    """
    if label == SUB_RANK1_LABEL:
        return None
    if re.fullmatch(r"[1-9][0-9]*", label):
        return int(label)
    raise ValueError(f"anchor {label!r} is not '{SUB_RANK1_LABEL}' or a positive integer LoRA rank")


def nearest_multiple(amount: int, unit: int) -> int:
    """The integer n >= 0 whose n * unit is nearest `amount`, ties to the smaller n."""
    whole, rest = divmod(amount, unit)
    return whole + (2 * rest > unit)


def rank_anchors(
    named_shapes: Sequence[tuple[str, Shape]],
    labels: Sequence[str] = DEFAULT_ANCHORS,
    module_order: ModuleOrder = "model",
    grid: str = "square",
    module_gain: bool = False,
) -> list[Anchor]:
    """Every method's size at each anchor, for the target modules `named_shapes` (in the model's order).

    GFA's rank is the one whose count r * (m + k) is nearest the budget, ties to the smaller rank, clamped
    to [1, min(m, k)]. The budget of "1/2" is the integer nearest 0.3 x LoRA's rank-1 count (halves down).
    The module order sets the layout (and is validated) but no count depends on it; the grid rule
    (`layout.GRIDS`) sets m and k, so GFA's count. With `module_gain` GFA's count adds its N gains and its
    rank stays the anchor's, as training places it.
    Raises ValueError for a bad or repeated label, or an anchor whose LoRA rank exceeds min(m, k).
    """
    labels = list(labels)
    ranks = [parse_anchor(label) for label in labels]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"anchor(s) {', '.join(repeated)} given more than once")
    layout = ordered_layout(named_shapes, module_order, grid)
    for rank in ranks:
        if rank is not None:
            layout.check_rank(rank, "anchor rank")
    shapes = [piece.shape for piece in layout.modules]
    return [_place(label, rank, shapes, layout, module_gain) for label, rank in zip(labels, ranks, strict=True)]


def ordered_layout(named_shapes: Sequence[tuple[str, Shape]], module_order: ModuleOrder = "model",
                   grid: str = "square") -> Layout:
    """The GFA layout of `named_shapes` (given in the model's order) concatenated in `module_order`, on the
    grid rule `grid`."""
    in_model_order = build_layout(named_shapes)
    order = order_modules(in_model_order.names, module_order)
    return build_layout([(name, in_model_order[name].shape) for name in order], grid)


def _place(label: str, lora_rank: int | None, shapes: list[Shape], layout: Layout, module_gain: bool) -> Anchor:
    lora_rank1 = lora_params(shapes, 1)
    budget = lora_rank * lora_rank1 if lora_rank else nearest_multiple(
        lora_rank1 * SUB_RANK1_FRACTION.numerator, SUB_RANK1_FRACTION.denominator
    )
    gfa_rank = min(max(nearest_multiple(budget, layout.m + layout.k), 1), layout.max_rank())
    vera_rank = _vera_rank(shapes, budget)
    vector_length = vblora_vector_length(shapes) if _all_linear(shapes) else None
    num_vectors = _vblora_num_vectors(shapes, budget, vector_length) if vector_length else None
    return Anchor(
        label=label,
        lora_rank=lora_rank,
        budget=budget,
        gfa_rank=gfa_rank,
        gfa_params=gfa_params(layout, gfa_rank, module_gain),
        lora_params=lora_params(shapes, lora_rank) if lora_rank else None,
        dora_params=dora_params(shapes, lora_rank) if lora_rank else None,
        vera_rank=vera_rank,
        vera_params=vera_params(shapes, vera_rank) if vera_rank else None,
        vblora_num_vectors=num_vectors,
        vblora_params=vblora_params(shapes, num_vectors, vector_length) if num_vectors else None,
        vblora_rank=VBLORA_RANK if num_vectors else None,
        vblora_vector_length=vector_length if num_vectors else None,
    )


def _all_linear(shapes: list[Shape]) -> bool:
    return all(len(shape) == 2 for shape in shapes)


def _vera_rank(shapes: list[Shape], budget: int) -> int | None:
    """VeRA's r nearest the budget; None when even r = 1 exceeds it (or a module is not linear)."""
    if not _all_linear(shapes) or vera_params(shapes, 1) > budget:
        return None
    output_rows = sum(shape[0] for shape in shapes)
    return nearest_multiple(budget - output_rows, len(shapes))


def _vblora_num_vectors(shapes: list[Shape], budget: int, vector_length: int) -> int | None:
    """VB-LoRA's bank size nearest the budget; None when even `VBLORA_TOPK` vectors exceed it."""
    per_vector = vblora_params(shapes, 1, vector_length)
    if VBLORA_TOPK * per_vector > budget:
        return None
    return nearest_multiple(budget, per_vector)


def budget_report(
    named_shapes: Sequence[tuple[str, Shape]],
    labels: Sequence[str] = DEFAULT_ANCHORS,
    module_order: ModuleOrder = "model",
    grid: str = "square",
    module_gain: bool = False,
) -> dict:
    """Everything `gfa count` reports, as plain JSON: the layout (on the `grid` rule's m x k), the equal-rank
    LoRA/GFA ratio (exact and the equal-module estimate sqrt(N)), each method's smallest count, and the anchors
    (GFA's counts with its N gains under `module_gain`)."""
    anchors = rank_anchors(named_shapes, labels, module_order, grid, module_gain)
    layout = ordered_layout(named_shapes, module_order, grid)
    shapes = [piece.shape for piece in layout.modules]
    lora_rank1 = lora_params(shapes, 1)
    vector_length = vblora_vector_length(shapes) if _all_linear(shapes) else None
    return {
        "N": len(shapes),
        "grid": layout.grid,
        "module_gain": module_gain,
        "d": layout.d,
        "m": layout.m,
        "k": layout.k,
        "padding": layout.padding,
        "max_gfa_rank": layout.max_rank(),
        "lora_per_rank": lora_rank1,
        "gfa_per_rank": gfa_params(layout, 1),
        "ratio_exact": lora_rank1 / gfa_params(layout, 1),
        "ratio_sqrt_n": math.sqrt(len(shapes)),
        "smallest": {
            "lora": lora_rank1,
            "dora": dora_params(shapes, 1),
            "gfa": gfa_params(layout, 1, module_gain),
            "vera": vera_params(shapes, 1) if _all_linear(shapes) else None,
            "vblora": vblora_params(shapes, VBLORA_TOPK, vector_length) if vector_length else None,
        },
        "vblora": {"r": VBLORA_RANK, "vector_length": vector_length, "topk": VBLORA_TOPK},
        "anchors": [
            {**anchor.to_dict(), "gfa_vs_lora_r1": anchor.gfa_params / lora_rank1} for anchor in anchors
        ],
        "modules": [
            {"name": piece.name, "shape": list(piece.shape), "offset": piece.offset} for piece in layout.modules
        ],
    }
