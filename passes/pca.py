"""SliceGPT-style baseline: the residual stream keeps its top-m principal directions (DESIGN §5, baselines).

Q = the top-m eigenvectors of the pooled Gram of the RMS-normalised stream; M = Q, U = Qᵀ, applied by the same
residual rewrite as DOTResize (gain folding, constant gain sqrt(n/m)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dotresize_fx.errors import DotResizeError
from dotresize_fx.pipeline import Targets, WidthPass, plan_widths
from dotresize_fx.rewrite import WidthMap


@dataclass(frozen=True)
class PCAConfig:
    targets: Targets = Targets()


class PCAPass(WidthPass):
    name = "pca"

    def __init__(self, config: PCAConfig, analysis, calibration, probe):
        super().__init__(analysis, calibration, probe)
        self.config = config

    def maps(self, model) -> dict[str, WidthMap]:
        plan = plan_widths(self.analysis, self.config.targets)
        self.report["rounding"] = plan.rounding
        maps = {}
        for name, (m, _) in plan.widths.items():
            g = self.analysis.group(name)
            if g.kind != "residual":
                raise DotResizeError(f"pca reduces the residual stream only; {name} is {g.kind}: use prune or "
                                     "dotresize for it")
            eigvals, eigvecs = torch.linalg.eigh(self.calibration.stats[name].gram)
            Q = eigvecs[:, eigvals.argsort(descending=True)[:m]].contiguous()
            maps[name] = WidthMap(name, Q, Q.T.contiguous())
        return maps
