"""Channel spaces and their union (DESIGN §4): one atom per dimension of every graph value.

Atoms that must keep the same indexing are unioned (networkx's union-find). A root may be *factored*
(a width = heads × head_dim, outer to inner) or *segmented* (a fused qkv = q ‖ k ‖ v at offsets), and may be
*pinned* with the reasons it cannot change.
"""
from __future__ import annotations

from collections import defaultdict

import networkx as nx


class SizeMismatch(ValueError):
    """Two static dimensions of different sizes were declared the same channel space."""


class ChannelSpaces:
    def __init__(self):
        self.uf = nx.utils.UnionFind()
        self.size: dict[int, int | None] = {}
        self.factors: dict[int, tuple[int, ...]] = {}
        self.segments: dict[int, list[tuple[int, int, int]]] = {}
        self.pins: dict[int, list[str]] = defaultdict(list)
        self._next = 0

    def new(self, size: int | None) -> int:
        a = self._next
        self._next += 1
        self.size[a] = size
        self.uf[a]  # register
        return a

    def find(self, a: int) -> int:
        return self.uf[a]

    def static(self, a: int) -> bool:
        """A dimension that can carry width: fixed and larger than 1 (not batch, sequence or a broadcast)."""
        s = self.size[a]
        return s is not None and s > 1

    def size_of(self, a: int) -> int | None:
        return self.size[self.find(a)]

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb or not (self.static(ra) and self.static(rb)):
            return  # broadcast dims and symbolic (batch/sequence) dims carry no width
        if self.size[ra] != self.size[rb]:
            raise SizeMismatch(f"dimensions of size {self.size[ra]} and {self.size[rb]}")
        fa, fb = self.factors.pop(ra, None), self.factors.pop(rb, None)
        sa, sb = self.segments.pop(ra, []), self.segments.pop(rb, [])
        pins = self.pins.pop(ra, []) + self.pins.pop(rb, [])
        self.uf.union(ra, rb)
        r = self.find(ra)
        self.size[r] = self.size[ra]
        self.pins[r].extend(pins)
        for seg in sa + sb:
            self.add_segment(r, *seg)
        if fa and fb:
            self.factors[r] = fa
            self.align(list(fa), list(fb))
        elif fa or fb:
            self.factors[r] = fa or fb

    def leaves(self, a: int) -> list[int]:
        r = self.find(a)
        if r in self.factors:
            return [leaf for f in self.factors[r] for leaf in self.leaves(f)]
        return [r]

    def factor(self, a: int, parts: list[int]) -> None:
        """Declare a = parts[0] × parts[1] × … (outer to inner)."""
        r = self.find(a)
        parts = [p for p in parts if self.static(p)]
        if len(parts) < 2:
            if len(parts) == 1:
                self.join(r, parts[0])
            return
        if r in self.factors:
            self.align(list(self.factors[r]), parts)
        else:
            self.factors[r] = tuple(parts)

    def align(self, xs: list[int], ys: list[int]) -> None:
        """Unify two factorisations of the same width, splitting factors where one is finer."""
        xs, ys = [l for x in xs for l in self.leaves(x)], [l for y in ys for l in self.leaves(y)]
        while xs and ys:
            x, y = xs.pop(0), ys.pop(0)
            sx, sy = self.size_of(x), self.size_of(y)
            if sx == sy:
                self.join(x, y)
            elif sx and sy and sx < sy and sy % sx == 0:
                rest = self.new(sy // sx)
                self.factor(y, [x, rest])
                ys.insert(0, rest)
            elif sx and sy and sy < sx and sx % sy == 0:
                rest = self.new(sx // sy)
                self.factor(x, [y, rest])
                xs.insert(0, rest)
            else:
                for z in (x, y, *xs, *ys):
                    self.pin(z, "incompatible factorisations of one width")
                return

    def add_segment(self, a: int, offset: int, length: int, child: int) -> None:
        r = self.find(a)
        for off, ln, other in self.segments.get(r, []):
            if (off, ln) == (offset, length):
                self.join(other, child)
                return
        self.segments.setdefault(r, []).append((offset, length, child))

    def pin(self, a: int, reason: str) -> None:
        if self.static(a):
            r = self.find(a)
            if reason not in self.pins[r]:
                self.pins[r].append(reason)
