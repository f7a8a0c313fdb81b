"""SliceGPT-style baseline: the residual stream keeps its top-m principal directions (DESIGN §5, baselines).

Q = the top-m eigenvectors of the pooled Gram of the RMS-normalised stream; M = Q, U = Qᵀ, applied by the same
residual rewrite as DOTResize (gain folding, constant gain sqrt(n/m)).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dotresize_fx.errors import DotResizeError
from dotresize_fx.pipeline import Targets, WidthPass
from dotresize_fx.rewrite import WidthMap


@dataclass(frozen=True)
class PCAConfig:
    targets: Targets = field(default_factory=Targets)


class PCAPass(WidthPass):
    name = "pca"

    def __init__(self, config: PCAConfig, analysis, calibration, probe, batches=None, progress=None):
        super().__init__(analysis, calibration, probe, batches, progress)
        self.config, self.targets = config, config.targets

    def group_map(self, model, g, m, kv_after, stats) -> WidthMap:
        if g.kind != "residual":
            raise DotResizeError(f"pca reduces the residual stream only; {g.name} is {g.kind}: use prune or "
                                 "dotresize for it")
        eigvals, eigvecs = torch.linalg.eigh(stats.gram)
        Q = eigvecs[:, eigvals.argsort(descending=True)[:m]].contiguous()
        return WidthMap(g.name, Q, Q.T.contiguous())
