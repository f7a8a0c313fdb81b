"""WidthMaps: the linear algebra a pass chooses for one group (DESIGN §3), in float64."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Fill:
    """A selection's unmerge on channels, Sᵀ except on the removed channels, whose columns are R
    (m × n_removed): prune's least-squares unmerge, kept as indices and R instead of a dense m×n matrix
    (Llama-3-8B's MLP: 14336 × 10752 in float64 is 1.2 GB per group). R = `A` or, for a fit solved in the row
    space of N calibration rows, R = `A`·`B` (m × N, N × n_removed): applied as two products, N·(m + n_removed)
    per consumer row instead of m·n_removed."""
    kept: torch.Tensor
    removed: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor | None = None

    @property
    def R(self) -> torch.Tensor:
        return self.A if self.B is None else self.A @ self.B

    def fill_removed(self, P_removed: torch.Tensor) -> torch.Tensor:
        """P_removed·Rᵀ (P's removed channels last), in P's dtype."""
        def t(x):
            return x.T.to(device=P_removed.device, dtype=P_removed.dtype)
        return P_removed @ t(self.A) if self.B is None else (P_removed @ t(self.B)) @ t(self.A)

    def dense(self) -> torch.Tensor:
        U = torch.zeros(len(self.kept), len(self.kept) + len(self.removed), dtype=self.A.dtype)
        U[torch.arange(len(self.kept)), self.kept] = 1.0
        U[:, self.removed] = self.R
        return U


class WidthMap:
    """`merge` M ∈ R^{n×m} and `unmerge` U ∈ R^{m×n}, in the group's units (neurons; q heads for a heads group).

    Pruning is the special case M = column selection S, U = Sᵀ: `WidthMap.selection` stores only the kept
    units and builds the dense matrices when someone reads them (the rewrite indexes instead).
    `keep`: the target units whose own identity survives (a merged head keeps its target's Q/K).
    `kv_merge`/`kv_keep`: a heads group's map on kv heads (GQA); identity when only q heads within groups change.
    `unmerge_channels`: an optional channel-level U (m·unit × n·unit) that overrides kron(U, I_unit), e.g. `ls`;
    `fill`: the same for a selection, in `Fill`'s structured form.
    `stages`: a residual map per block (the stream entering block l, then the stream after the last block); the
    rewrite puts an adapter Q_lᵀQ_{l+1} on each block's output, so blocks need not share a basis.
    """

    def __init__(self, group: str, merge: torch.Tensor | None, unmerge: torch.Tensor | None, *,
                 keep: torch.Tensor | None = None, kv_merge: torch.Tensor | None = None,
                 kv_keep: torch.Tensor | None = None, unmerge_channels: torch.Tensor | None = None,
                 stages: list[WidthMap] | None = None, stage_prefix: str = "", size: int | None = None):
        if merge is None and (keep is None or size is None):
            raise ValueError("a WidthMap without a merge matrix is a selection: give keep and size")
        self.group, self.keep, self.kv_merge, self.kv_keep = group, keep, kv_merge, kv_keep
        self.unmerge_channels, self.stages, self.stage_prefix = unmerge_channels, stages, stage_prefix
        self._merge, self._unmerge, self._size = merge, unmerge, size
        self.fill: Fill | None = None

    def __repr__(self) -> str:
        return f"WidthMap({self.group}: {self.n} → {self.m}{', selection' if self.is_selection else ''})"

    @property
    def is_selection(self) -> bool:
        """Known without looking at a matrix: built by `selection` and not replaced since."""
        return self._merge is None

    @property
    def merge(self) -> torch.Tensor:
        return selection_matrix(self._size, self.keep) if self._merge is None else self._merge

    @merge.setter
    def merge(self, M: torch.Tensor) -> None:
        if self._unmerge is None:
            self._unmerge = self.merge.T
        self._merge = M

    @property
    def unmerge(self) -> torch.Tensor:
        return self.merge.T if self._unmerge is None else self._unmerge

    @unmerge.setter
    def unmerge(self, U: torch.Tensor) -> None:
        if self._merge is None:
            self._merge = self.merge
        self._unmerge, self.fill = U, None

    @property
    def n(self) -> int:
        return self._size if self._merge is None else self._merge.shape[0]

    @property
    def m(self) -> int:
        return len(self.keep) if self._merge is None else self._merge.shape[1]

    @property
    def kv_after(self) -> int | None:
        return None if self.kv_merge is None else self.kv_merge.shape[1]

    @staticmethod
    def identity(group: str, n: int, kv: int | None = None) -> "WidthMap":
        return WidthMap.selection(group, n, torch.arange(n), kv, torch.arange(kv) if kv else None)

    @staticmethod
    def selection(group: str, n: int, keep: torch.Tensor, kv: int | None = None,
                  kv_keep: torch.Tensor | None = None) -> "WidthMap":
        """Pruning: M = column selection, U = Mᵀ (and the same on kv heads)."""
        w = WidthMap(group, None, None, keep=torch.as_tensor(keep), size=n)
        if kv:
            w.kv_merge, w.kv_keep = selection_matrix(kv, kv_keep), kv_keep
        return w

    def channel_unmerge(self, unit: int) -> torch.Tensor:
        """U on channels: `unmerge_channels`, the dense `fill`, or kron(U, I_unit)."""
        if self.fill is not None:
            return self.fill.dense()
        return self.unmerge_channels if self.unmerge_channels is not None else expand_units(self.unmerge, unit)

    def set_channel_unmerge(self, U: torch.Tensor | Fill, unit: int) -> None:
        if isinstance(U, Fill):
            self.fill, self.unmerge_channels = U, None
        elif unit == 1:
            self.unmerge = U
        else:
            self.unmerge_channels, self.fill = U, None

    def applied(self) -> "Applied":
        return Applied(self.group, self.m, self.kv_after)


@dataclass(frozen=True)
class Applied:
    """What a pass keeps of a WidthMap once the map is in the weights: its widths, all that `finalize` reads
    (the matrices of a 5632-wide MLP map are ~0.5 GB per block in float64)."""
    group: str
    m: int
    kv_after: int | None


def selection_matrix(n: int, keep: torch.Tensor) -> torch.Tensor:
    S = torch.zeros(n, len(keep), dtype=torch.float64)
    S[keep, torch.arange(len(keep))] = 1.0
    return S


def expand_units(A: torch.Tensor, unit: int) -> torch.Tensor:
    """kron(A, I_unit): a map on units (heads) as a map on their channels."""
    return A if unit == 1 else torch.kron(A.contiguous(), torch.eye(unit, dtype=A.dtype))


def selected_rows(M: torch.Tensor) -> torch.Tensor | None:
    """The rows a column-selection matrix keeps, in column order (one 1 in every column, at most one nonzero in
    every row), or None if `M` is not one. Two passes over M: at 5632 × 4224 the elementwise tests were seconds."""
    m = M.shape[1]
    if int(torch.count_nonzero(M)) != m:   # before listing the nonzeros of a dense map
        return None
    rows, cols = M.nonzero(as_tuple=True)
    if not bool((M[rows, cols] == 1).all()) or not bool((rows.diff() > 0).all()):
        return None
    if not bool((torch.bincount(cols, minlength=m) == 1).all()):
        return None
    kept = torch.empty(m, dtype=torch.long)
    kept[cols] = rows
    return kept


def is_selection(M: torch.Tensor) -> bool:
    return selected_rows(M) is not None
