"""The global m x k layout: exact integer arithmetic, orders, records and their comparison."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gfa_peft.layout import Layout, build_layout, grid_shape, order_modules


@given(st.integers(1, 10**40))
def test_grid_shape_is_exact_for_any_d(d):
    m, k = grid_shape(d)
    assert k * k <= d < (k + 1) * (k + 1)  # k = floor(sqrt(d)), no float rounding
    assert (m - 1) * k < d <= m * k  # m = ceil(d / k)
    assert 0 <= m * k - d <= k - 1


def test_grid_shape_near_float_precision_limit():
    root = 2**53 + 1
    assert grid_shape(root * root - 1)[1] == root - 1  # math.sqrt would round up to root
    assert grid_shape(root * root)[1] == root


@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 50)), min_size=1, max_size=20))
def test_offsets_are_contiguous(shapes):
    layout = build_layout([(f"m{i}", s) for i, s in enumerate(shapes)])
    assert layout.offsets == [sum(p * q for p, q in shapes[:i]) for i in range(len(shapes))]
    assert layout.d == sum(p * q for p, q in shapes)
    assert (layout.m, layout.k) == grid_shape(layout.d)
    for piece in layout.modules:
        first_row, n_rows, skip = piece.rows(layout.k)
        assert first_row * layout.k + skip == piece.offset
        assert (first_row + n_rows - 1) * layout.k < piece.end <= (first_row + n_rows) * layout.k


def test_record_round_trip_and_differences():
    layout = build_layout([("a", (3, 4)), ("b", (2, 2, 3))])
    assert Layout.from_dict(layout.to_dict()) == layout
    moved = build_layout([("b", (2, 2, 3)), ("a", (3, 4))])
    assert "module #0 is 'b' in the saved layout but 'a' in the model" in layout.difference(moved)
    reshaped = build_layout([("a", (4, 3)), ("b", (2, 2, 3))])
    assert "'a' has update shape [4, 3] in the saved layout but [3, 4]" in layout.difference(reshaped)
    longer = build_layout([("a", (3, 4)), ("b", (2, 2, 3)), ("c", (1, 1))])
    assert "module 'c' is only in the saved layout" in layout.difference(longer)
    assert layout.difference(build_layout([("a", (3, 4)), ("b", (2, 2, 3))])) is None
    tampered = layout.to_dict()
    tampered["modules"][1][2] = 11
    with pytest.raises(ValueError, match="inconsistent GFA layout record"):
        Layout.from_dict(tampered)


def test_module_orders():
    names = [f"layers.{i}.{p}" for i in range(3) for p in ("q", "v")]
    assert order_modules(names, "model") == names
    assert order_modules(names, "by_name") == [f"layers.{i}.q" for i in range(3)] + [f"layers.{i}.v" for i in range(3)]
    shuffled = order_modules(names, 5)
    assert sorted(shuffled) == sorted(names) and shuffled == order_modules(names, 5)
    assert any(order_modules(names, seed) != names for seed in range(3))
    for bad in ("sorted", True, 1.5):
        with pytest.raises(ValueError, match="module_order"):
            order_modules(names, bad)


def test_empty_or_duplicate_layouts_are_refused():
    with pytest.raises(ValueError, match="at least one target module"):
        build_layout([])
    with pytest.raises(ValueError, match="duplicate module names"):
        build_layout([("a", (2, 2)), ("a", (2, 2))])
    assert math.prod(build_layout([("a", (2, 3, 4))]).modules[0].shape) == 24


def _straddling_rows(layout: Layout) -> list[tuple[str, int]]:
    """(module, weight row) of every weight row that starts in one grid row and ends in the next."""
    return [(piece.name, row) for piece in layout.modules for row in range(piece.shape[0])
            if (piece.offset + row * piece.input_width) // layout.k
            != (piece.offset + (row + 1) * piece.input_width - 1) // layout.k]


@given(st.integers(1, 40), st.lists(st.integers(1, 60), min_size=1, max_size=8))
def test_aligned_grid_takes_the_multiple_of_the_width_nearest_sqrt_d(width, rows):
    layout = build_layout([(f"m{i}", (p, width)) for i, p in enumerate(rows)], "aligned")
    multiples = range(width, layout.d + width + 1, width)
    nearest = min(multiples, key=lambda k: abs(k - math.sqrt(layout.d)))  # the first of a tie: the smaller
    assert (layout.k, layout.m, layout.grid) == (nearest, -(-layout.d // nearest), "aligned")
    for piece in layout.modules:
        skip = piece.rows(layout.k)[2]  # where the module starts inside its first grid row
        assert skip % width == 0 and piece.offset % width == 0
    assert _straddling_rows(layout) == []


def test_square_grid_lets_rows_straddle_and_aligned_does_not():
    shapes = [("a", (12, 12)), ("b", (12, 12)), ("c", (5, 12))]  # d = 348: square k = 18, aligned k = 24
    square, aligned = build_layout(shapes), build_layout(shapes, "aligned")
    assert (square.m, square.k, square.grid) == (20, 18, "square") and square == build_layout(shapes, "square")
    assert (aligned.m, aligned.k) == (15, 24)
    assert ("a", 1) in _straddling_rows(square) and _straddling_rows(aligned) == []
    assert [piece.rows(aligned.k) for piece in aligned.modules] == [(0, 6, 0), (6, 6, 0), (12, 3, 0)]


def test_aligned_grid_refuses_mixed_input_widths_and_unknown_rules():
    with pytest.raises(ValueError, match=r"^the aligned grid needs one input width shared by all target modules, "
                                         r"but they have 4, 12$"):
        build_layout([("a", (3, 4)), ("b", (2, 3, 4)), ("c", (5, 4))], "aligned")
    with pytest.raises(ValueError, match="grid must be one of square, aligned, got 'diagonal'"):
        build_layout([("a", (3, 4))], "diagonal")


def test_aligned_record_round_trip_and_inconsistent_records():
    aligned = build_layout([("a", (12, 12)), ("b", (5, 12))], "aligned")
    record = aligned.to_dict()
    assert record["grid"] == "aligned" and Layout.from_dict(record).grid == "aligned"
    assert Layout.from_dict(record) == aligned
    square_record = {key: value for key, value in build_layout([("a", (3, 4))]).to_dict().items() if key != "grid"}
    assert Layout.from_dict(square_record).grid == "square"  # records from before the grid rule are square
    relabelled = {**record, "grid": "square"}  # an aligned k under the square rule: inconsistent
    with pytest.raises(ValueError, match=r"inconsistent GFA layout record: \(d, m, k\)"):
        Layout.from_dict(relabelled)
    with pytest.raises(ValueError, match="malformed GFA layout record.*grid must be one of"):
        Layout.from_dict({**record, "grid": "diagonal"})
