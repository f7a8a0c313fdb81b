"""The prune pass: keep the most important channels or heads of each group (selection maps, DESIGN §5).

Importance per channel i of a group, from the group's observation-point Gram G and consumers W_c:
  weight      ‖W_c[:, i]‖
  activation  sqrt(G_ii / N)
  act_weight  sqrt(G_ii / N) · ‖W_c[:, i]‖          (default; the best of the three in REFERENCE.md)
Heads score as the norm of their channels' scores; GQA heads go by whole kv groups or evenly within groups.
`unmerge="ls"` compensates the consumers by least squares: U = (SᵀGS + λI)⁻¹ SᵀG.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from dotresize_fx.analyze import WidthGroup
from dotresize_fx.calibrate import Stats
from dotresize_fx.pipeline import Targets, WidthPass, consumer_column_norms, keep_heads, ls_unmerge, unit_scores
from dotresize_fx.rewrite import WidthMap, selection_matrix

Importance = Literal["weight", "activation", "act_weight"]


@dataclass(frozen=True)
class PruneConfig:
    targets: Targets = field(default_factory=Targets)
    importance: Importance = "act_weight"
    unmerge: Literal["select", "ls"] = "select"
    ls_reg: float = 1e-4
    refine: bool = True        # layerwise `ls`: fit consumers to the dense model's activations (see pipeline)
    select_only: bool = False  # choose the kept set for a following DOTResize pass, change nothing


def importance(model, g: WidthGroup, stats: Stats | None, kind: Importance) -> torch.Tensor:
    """Channel importance (n·unit) by the given kind."""
    if kind != "weight" and stats is None:
        raise ValueError(f"importance {kind!r} needs calibration statistics for {g.name}")
    act = stats.mean_sq.sqrt() if kind != "weight" else 1.0
    weight = consumer_column_norms(model, g) if kind != "activation" else 1.0
    return act * weight


class PrunePass(WidthPass):
    name = "prune"

    def __init__(self, config: PruneConfig, analysis, calibration, probe, batches=None, progress=None):
        super().__init__(analysis, calibration, probe, batches, progress)
        self.config, self.targets, self.ls_reg = config, config.targets, config.ls_reg
        self.kept: dict[str, torch.Tensor] = {}   # group → kept units, for DOTResize as an add-on

    def refines(self, g: WidthGroup) -> bool:
        return (g.kind in ("mlp", "heads") and self.config.unmerge == "ls" and self.config.refine
                and not self.config.select_only)

    def emit(self, maps):
        return {} if self.config.select_only else maps

    def group_map(self, model, g: WidthGroup, m: int, kv_after: int | None, stats: Stats | None) -> WidthMap:
        scores = unit_scores(importance(model, g, stats, self.config.importance), g.unit)
        if g.kind == "heads" and g.kv_heads != g.size:
            q_keep, kv_keep = keep_heads(g, scores, m, kv_after)
            w = WidthMap.selection(g.name, g.size, q_keep, g.kv_heads, kv_keep)
        else:
            w = WidthMap.selection(g.name, g.size, scores.topk(m).indices.sort().values)
        self.kept[g.name] = w.keep
        if self.config.unmerge == "ls":
            S = torch.kron(selection_matrix(g.size, w.keep), torch.eye(g.unit, dtype=torch.float64))
            U = ls_unmerge(S, stats.gram, self.config.ls_reg)
            if g.unit == 1:
                w.unmerge = U
            else:
                w.unmerge_channels = U
        return w
