"""The prune pass: keep the most important channels or heads of each group (selection maps, DESIGN §5).

Importance per channel i of a group, from the group's observation-point Gram G and consumers W_c:
  weight      ‖W_c[:, i]‖
  activation  sqrt(G_ii / N)
  act_weight  sqrt(G_ii / N) · ‖W_c[:, i]‖          (default; the best of the three in REFERENCE.md)
Heads score as the norm of their channels' scores; GQA heads go by whole kv groups or evenly within groups.
`unmerge="ls"` compensates the consumers by least squares: U = (SᵀGS + λI)⁻¹ SᵀG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dotresize_fx.analyze import WidthGroup
from dotresize_fx.pipeline import (Targets, WidthPass, consumer_column_norms, keep_heads, ls_unmerge, plan_widths,
                                   unit_scores)
from dotresize_fx.rewrite import WidthMap, selection_matrix

Importance = Literal["weight", "activation", "act_weight"]


@dataclass(frozen=True)
class PruneConfig:
    targets: Targets = Targets()
    importance: Importance = "act_weight"
    unmerge: Literal["select", "ls"] = "select"
    ls_reg: float = 1e-4
    select_only: bool = False  # choose the kept set for a following DOTResize pass, change nothing


class PrunePass(WidthPass):
    name = "prune"

    def __init__(self, config: PruneConfig, analysis, calibration, probe):
        super().__init__(analysis, calibration, probe)
        self.config = config
        self.kept: dict[str, torch.Tensor] = {}   # group → kept units, for DOTResize as an add-on

    def maps(self, model) -> dict[str, WidthMap]:
        plan = plan_widths(self.analysis, self.config.targets)
        self.report["rounding"] = plan.rounding
        maps = {}
        for name, (m, kv_after) in plan.widths.items():
            g = self.analysis.group(name)
            maps[name] = self.group_map(model, g, m, kv_after)
        return {} if self.config.select_only else maps

    def scores(self, model, g: WidthGroup) -> torch.Tensor:
        """Channel importance (n·unit)."""
        imp = self.config.importance
        if imp != "weight" and self.calibration is None:
            raise ValueError(f"importance {imp!r} needs calibration statistics")
        act = self.calibration.stats[g.name].mean_sq.sqrt() if imp != "weight" else 1.0
        weight = consumer_column_norms(model, g) if imp != "activation" else 1.0
        return act * weight

    def group_map(self, model, g: WidthGroup, m: int, kv_after: int | None) -> WidthMap:
        scores = unit_scores(self.scores(model, g), g.unit)
        if g.kind == "heads" and g.kv_heads != g.size:
            q_keep, kv_keep = keep_heads(g, scores, m, kv_after)
            w = WidthMap.selection(g.name, g.size, q_keep, g.kv_heads, kv_keep)
        else:
            keep = scores.topk(m).indices.sort().values
            w = WidthMap.selection(g.name, g.size, keep)
        self.kept[g.name] = w.keep
        if self.config.unmerge == "ls":
            gram = self.calibration.stats[g.name].gram
            S = torch.kron(selection_matrix(g.size, w.keep), torch.eye(g.unit, dtype=torch.float64))
            U = ls_unmerge(S, gram, self.config.ls_reg)
            if g.unit == 1:
                w.unmerge = U
            else:
                w.unmerge_channels = U
        return w
