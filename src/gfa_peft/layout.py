"""Where each target module's update lives inside the global GFA matrix.

GFA concatenates the flattened updates of N target matrices into one vector of length
d = sum_i numel(W_i) and views it row-major as an m x k matrix with k = floor(sqrt(d)) and
m = ceil(d / k). The last m*k - d entries (at most k - 1) are padding that no module reads.
A `Layout` records that arrangement: the module order, each module's update shape and its
offset into the concatenated vector. It is pure bookkeeping; no tensors live here.

The grid rule picks k. "square" is the paper's k = floor(sqrt(d)). "aligned" takes for k the multiple of the
modules' common input width q (the product of an update shape's trailing dimensions: a linear layer's in
features) nearest sqrt(d), at least q: every module's offset and every row of its weight then start at a
multiple of q inside a grid row, so a module's rows never straddle two grid rows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Union

ModuleOrder = Union[str, int]
""""model" (the model's own order), "by_name" (grouped by the module's last name) or an int seed."""
GRIDS = ("square", "aligned")
"""The rules choosing the grid's k: see the module docstring."""


@dataclass(frozen=True)
class ModuleSlice:
    """One module's window [offset, offset + numel) of the concatenated update vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel

    @property
    def input_width(self) -> int:
        """q: the length of one row of the module's update reshaped (p, q)."""
        return math.prod(self.shape[1:])

    def rows(self, k: int) -> tuple[int, int, int]:
        """(first_row, n_rows, skip): the rows of the m x k matrix this slice touches, and how
        many leading entries of the first row belong to earlier modules."""
        first_row, skip = divmod(self.offset, k)
        n_rows = -(-(skip + self.numel) // k)
        return first_row, n_rows, skip


@dataclass(frozen=True)
class Layout:
    """The global m x k view of N concatenated module updates."""

    modules: tuple[ModuleSlice, ...]
    d: int
    m: int
    k: int
    grid: str = field(default="square", compare=False)
    """The rule that chose k (`GRIDS`); layouts of one geometry are equal whichever rule gave it."""

    @property
    def padding(self) -> int:
        return self.m * self.k - self.d

    @property
    def offsets(self) -> list[int]:
        return [piece.offset for piece in self.modules]

    @property
    def names(self) -> list[str]:
        return [piece.name for piece in self.modules]

    @cached_property
    def position(self) -> dict[str, int]:
        """Each module's place in the concatenation order, by name (looked up once per module when adapting)."""
        return {piece.name: index for index, piece in enumerate(self.modules)}

    def __getitem__(self, name: str) -> ModuleSlice:
        if name not in self.position:
            raise KeyError(f"module {name!r} is not part of this GFA layout")
        return self.modules[self.position[name]]

    def trainable(self, r: int, module_gain: bool = False) -> int:
        """A GFA adapter's trainable count on this grid: r (m + k), plus one gain per module with module gains."""
        return r * (self.m + self.k) + (len(self.modules) if module_gain else 0)

    def max_rank(self) -> int:
        return min(self.m, self.k)

    def check_rank(self, rank: int, name: str = "rank") -> None:
        """Raise ValueError unless 1 <= rank <= min(m, k), the ranks an m x k matrix can have."""
        if not 1 <= rank <= self.max_rank():
            raise ValueError(
                f"{name} {rank} is out of range: the global matrix is {self.m} x {self.k} (d={self.d}), "
                f"so ranks go from 1 to {self.max_rank()}"
            )

    def to_dict(self) -> dict:
        return {
            "d": self.d,
            "m": self.m,
            "k": self.k,
            "grid": self.grid,
            "modules": [[piece.name, list(piece.shape), piece.offset] for piece in self.modules],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        """The layout a `to_dict` record describes; ValueError when the record is malformed or inconsistent
        (its modules, laid out on its grid rule, do not give its offsets, d, m and k). A record written before
        the grid rule existed has none and is square."""
        try:
            modules = [(str(name), tuple(int(size) for size in shape), int(offset))
                       for name, shape, offset in data["modules"]]
            saved = cls(modules=tuple(ModuleSlice(*module) for module in modules),
                        d=int(data["d"]), m=int(data["m"]), k=int(data["k"]))
            grid = data.get("grid", "square")
            check_grid(grid)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed GFA layout record ({type(error).__name__}: {error})") from None
        if any(size < 1 for _, shape, _ in modules for size in shape):
            raise ValueError("malformed GFA layout record: a module has a size below 1")
        layout = build_layout([(name, shape) for name, shape, _ in modules], grid)
        problem = layout.difference(saved)
        if problem:
            raise ValueError(f"inconsistent GFA layout record: {problem}")
        return layout

    def difference(self, other: Layout) -> str | None:
        """A sentence naming the first way `other` differs from this layout, or None if equal."""
        for index, (mine, theirs) in enumerate(zip(self.modules, other.modules)):
            if mine.name != theirs.name:
                return f"module #{index} is {theirs.name!r} in the saved layout but {mine.name!r} in the model"
            if mine.shape != theirs.shape:
                return (
                    f"module {mine.name!r} has update shape {list(theirs.shape)} in the saved layout "
                    f"but {list(mine.shape)} in the model"
                )
            if mine.offset != theirs.offset:
                return f"module {mine.name!r} starts at {theirs.offset} in the saved layout but at {mine.offset}"
        if len(self.modules) != len(other.modules):
            longer, where = (other, "saved layout") if len(other.modules) > len(self.modules) else (self, "model")
            extra = longer.modules[min(len(self.modules), len(other.modules))].name
            return (
                f"the saved layout has {len(other.modules)} modules and the model {len(self.modules)}; "
                f"module {extra!r} is only in the {where}"
            )
        if (self.d, self.m, self.k) != (other.d, other.m, other.k):
            return f"(d, m, k) is {(other.d, other.m, other.k)} in the saved layout but {(self.d, self.m, self.k)}"
        return None


def grid_shape(d: int) -> tuple[int, int]:
    """(m, k) with k = floor(sqrt(d)) computed exactly (no float rounding) and m = ceil(d / k)."""
    if d < 1:
        raise ValueError(f"GFA needs at least one adapted entry, got d={d}")
    k = math.isqrt(d)
    return -(-d // k), k


def aligned_grid_shape(d: int, width: int) -> tuple[int, int]:
    """(m, k) with k the multiple of `width` nearest sqrt(d) (ties to the smaller, at least `width`), computed
    exactly, and m = ceil(d / k)."""
    below = max(math.isqrt(d) // width, 1)  # floor(sqrt(d) / width), as floor(floor(sqrt(d)) / width)
    # (below + 1) * width is nearer exactly when its midpoint with below * width lies under sqrt(d)
    multiple = below + 1 if ((2 * below + 1) * width) ** 2 < 4 * d else below
    k = multiple * width
    return -(-d // k), k


def check_grid(grid: str) -> None:
    """Raise ValueError unless `grid` is one of `GRIDS`."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")


def build_layout(named_shapes: Sequence[tuple[str, tuple[int, ...]]], grid: str = "square") -> Layout:
    """Lay out modules back to back in the given order, on the grid rule `grid` (`GRIDS`).

    The aligned grid needs one input width shared by every module and refuses modules that have several."""
    check_grid(grid)
    if not named_shapes:
        raise ValueError("GFA needs at least one target module")
    names = [name for name, _ in named_shapes]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate module names in GFA layout: {sorted({n for n in names if names.count(n) > 1})}")
    pieces, offset = [], 0
    for name, shape in named_shapes:
        piece = ModuleSlice(name, tuple(int(s) for s in shape), offset)
        if piece.numel < 1:
            raise ValueError(f"module {name!r} has an empty weight {list(shape)}")
        pieces.append(piece)
        offset = piece.end
    if grid == "square":
        m, k = grid_shape(offset)
    else:
        widths = sorted({piece.input_width for piece in pieces})
        if len(widths) > 1:
            raise ValueError(f"the aligned grid needs one input width shared by all target modules, but they have "
                             f"{', '.join(map(str, widths))}")
        m, k = aligned_grid_shape(offset, widths[0])
    return Layout(modules=tuple(pieces), d=offset, m=m, k=k, grid=grid)


def parse_module_order(text: str) -> ModuleOrder:
    """A module order written as text (a flag, a config file): an integer is a permutation seed."""
    try:
        return int(text)
    except ValueError:
        return text


def order_modules(names: Sequence[str], module_order: ModuleOrder = "model") -> list[str]:
    """Reorder module names (given in the model's own order) for the concatenation.

    "model" keeps them; "by_name" groups modules by their last name component (all `q_proj`, then
    all `v_proj`, groups in order of first appearance); an int is the seed of a random permutation
    that is the same on every platform and Python version.
    """
    names = list(names)
    if isinstance(module_order, bool):
        raise ValueError(f"module_order must be 'model', 'by_name' or an int seed, got {module_order!r}")
    if isinstance(module_order, int):
        random.Random(module_order).shuffle(names)
        return names
    if module_order == "model":
        return names
    if module_order == "by_name":
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(name.rsplit(".", 1)[-1], []).append(name)
        return [name for group in groups.values() for name in group]
    raise ValueError(f"module_order must be 'model', 'by_name' or an int seed, got {module_order!r}")
