"""SliceGPT-style baseline: the residual stream keeps its top-m principal directions (DESIGN §5, baselines).

Q = the top-m eigenvectors of the pooled Gram of the RMS-normalised stream; M = Q, U = Qᵀ, applied by the same
residual rewrite as DOTResize (gain folding, constant gain sqrt(n/m)).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dotresize_fx.errors import DotResizeError
from dotresize_fx.maps import WidthMap
from dotresize_fx.pipeline import WidthPass
from dotresize_fx.targets import Targets


@dataclass(frozen=True)
class PCAConfig:
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self):
        other = sorted(self.targets.kinds() - {"residual"})
        if other:
            raise DotResizeError(f"pca reduces the residual stream only; {', '.join(other)} given: use prune or "
                                 "dotresize for those")


class PCAPass(WidthPass):
    name = "pca"
    Config = PCAConfig

    def group_map(self, model, g, m, kv_after, stats) -> WidthMap:
        eigvals, eigvecs = torch.linalg.eigh(stats.gram)
        Q = eigvecs[:, eigvals.argsort(descending=True)[:m]].contiguous()
        return WidthMap(g.name, Q, Q.T.contiguous())
