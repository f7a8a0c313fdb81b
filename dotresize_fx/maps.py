"""WidthMaps: the linear algebra a pass chooses for one group (DESIGN §3), in float64."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WidthMap:
    """`merge` M ∈ R^{n×m} and `unmerge` U ∈ R^{m×n}, in the group's units (neurons; q heads for a heads group).

    Pruning is the special case M = column selection S, U = Sᵀ.
    `keep`: the target units whose own identity survives (a merged head keeps its target's Q/K).
    `kv_merge`/`kv_keep`: a heads group's map on kv heads (GQA); identity when only q heads within groups change.
    `unmerge_channels`: an optional channel-level U (m·unit × n·unit) that overrides kron(U, I_unit), e.g. `ls`.
    `stages`: a residual map per block (the stream entering block l, then the stream after the last block); the
    rewrite puts an adapter Q_lᵀQ_{l+1} on each block's output, so blocks need not share a basis.
    """
    group: str
    merge: torch.Tensor
    unmerge: torch.Tensor
    keep: torch.Tensor | None = None
    kv_merge: torch.Tensor | None = None
    kv_keep: torch.Tensor | None = None
    unmerge_channels: torch.Tensor | None = None
    stages: list["WidthMap"] | None = None   # residual per_layer: one map per block of `stage_prefix`, + final
    stage_prefix: str = ""

    @property
    def n(self) -> int:
        return self.merge.shape[0]

    @property
    def m(self) -> int:
        return self.merge.shape[1]

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
        S = selection_matrix(n, keep)
        w = WidthMap(group, S, S.T.contiguous(), keep=keep)
        if kv:
            w.kv_merge, w.kv_keep = selection_matrix(kv, kv_keep), kv_keep
        return w

    def channel_unmerge(self, unit: int) -> torch.Tensor:
        """U on channels: `unmerge_channels`, or kron(U, I_unit)."""
        return self.unmerge_channels if self.unmerge_channels is not None else expand_units(self.unmerge, unit)

    def set_channel_unmerge(self, U: torch.Tensor, unit: int) -> None:
        if unit == 1:
            self.unmerge = U
        else:
            self.unmerge_channels = U


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


def is_selection(M: torch.Tensor) -> bool:
    return bool(((M == 0) | (M == 1)).all() and (M.sum(0) == 1).all() and (M.sum(1) <= 1).all())
