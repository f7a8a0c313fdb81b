"""DOTResize: make a group narrower by merging its neurons with discrete optimal transport (DESIGN §5).

Per group: pick m targets (top-m by importance: the prune pass's choice), build the cost from
the observation-point Gram, solve the transport plan, turn it into a merge map M and an unmerge map U, and let
the rewrite apply them by group kind (linear path, MLP hidden, residual via QR, heads with their targets' Q/K).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from dotresize_fx.analyze import WidthGroup
from dotresize_fx.calibrate import Stats
from dotresize_fx.errors import DotResizeError
from dotresize_fx.pipeline import Targets, WidthPass, keep_heads, ls_unmerge, unit_scores
from dotresize_fx.rewrite import WidthMap, selection_matrix

from . import ot as dot
from .prune import importance, select


@dataclass(frozen=True)
class DotResizeConfig:
    targets: Targets = field(default_factory=Targets)
    cost: dot.Cost = "l2"
    marginals: dot.Marginals = "semi"
    solver: Literal["sinkhorn", "emd"] = "sinkhorn"
    reg: float = 0.01                  # measured on SmolLM2 MLP 1536→1152: 0.01 → 44.7, 0.05 → 47.3 (seq 256)
    mass: float = 1.0                  # semi: share of a merged neuron's mass that is transported (0 = prune)
    unmerge: dot.Unmerge = "ls"
    refine: bool = True                # ls on an MLP: fit the consumer to the merged producers' real outputs
    pure_producers: bool = False       # True: producers keep their target rows; only consumers take the merge
    importance: str = "act_weight"     # how targets are chosen when no prune pass chose them (prune.select)
    ls_reg: float = 1e-4
    ls_target: Literal["current", "dense"] = "current"   # what layerwise `ls` fits (see WidthPass.refine)

    def __post_init__(self):
        if not 0.0 <= self.mass <= 1.0:
            raise DotResizeError(f"dotresize mass={self.mass}: the transported share must be in [0, 1]")
        if self.mass != 1.0 and self.marginals != "semi":
            raise DotResizeError("dotresize mass applies to marginals=semi only")


class DotResizePass(WidthPass):
    name = "dotresize"

    def __init__(self, config: DotResizeConfig, analysis, calibration, probe, batches=None, progress=None):
        super().__init__(analysis, calibration, probe, batches, progress)
        self.config, self.targets, self.ls_reg, self.ls_target = (config, config.targets, config.ls_reg,
                                                                       config.ls_target)

    def group_map(self, model, g: WidthGroup, m: int, kv_after: int | None, stats: Stats) -> WidthMap:
        scores = unit_scores(importance(model, g, stats, self.config.importance), g.unit)
        if g.kind == "heads" and g.kv_heads != g.size:
            q_keep, kv_keep = keep_heads(g, scores, m, kv_after)
            w = self._merge(stats, q_keep, g)
            if kv_after < g.kv_heads:  # whole GQA groups: kv heads follow their q heads' plan, block by block
                rep = g.size // g.kv_heads
                Mkv = w.merge.view(g.kv_heads, rep, -1, rep).sum((1, 3)) / rep
                w.kv_merge, w.kv_keep = Mkv / Mkv.sum(0, keepdim=True), kv_keep
                w.kv_unmerge = torch.linalg.pinv(w.kv_merge)
            else:
                K = torch.eye(g.kv_heads, dtype=torch.float64)
                w.kv_merge, w.kv_unmerge, w.kv_keep = K, K, torch.arange(g.kv_heads)
            return w
        return self._merge(stats, select(model, g, stats, self.config.importance, m), g)

    def _merge(self, stats: Stats, targets, g: WidthGroup) -> WidthMap:
        c = self.config
        gram = _unit_gram(stats.gram, g.unit)
        C = dot.cost_matrix(gram, stats.count, targets, c.cost)
        a, b = dot.marginals(gram, targets, "energy" if c.marginals == "semi" else c.marginals)
        if c.marginals == "semi":
            T = dot.semi_plan(C, a, targets, reg=c.reg, mass=c.mass)
        else:
            T = dot.transport_plan(C, a, b, reg=c.reg, solver=c.solver)
        # ls starts from the plan's own unmerge and stays near it unless held-out rows say otherwise
        M, U = dot.width_map_from_plan(T, unmerge="ot" if c.unmerge == "ls" else c.unmerge)
        w = WidthMap(g.name, M, U, keep=targets)
        if c.pure_producers and g.kind != "residual":
            w.merge = selection_matrix(g.size, targets)
        if c.unmerge == "ls" and not self.refines(g):  # refined groups fit U on real activations instead
            hold = None if stats.holdout is None else _unit_gram(stats.holdout, g.unit)
            w.unmerge, lam = ls_unmerge(w.merge, gram, c.ls_reg, prior=U, holdout=hold)
            self.record_ls(g, lam)
        return w

    def refines(self, g: WidthGroup) -> bool:
        """`ls` on MLP and heads: consumers fitted to the merged producers' real outputs (pipeline.refine_unmerge).
        Pure producers output their targets' own activations, whose Gram the pass already has: only a dense
        target is new information (as for prune)."""
        return (g.kind in ("mlp", "heads") and self.config.unmerge == "ls" and self.config.refine
                and (not self.config.pure_producers or self.config.ls_target == "dense"))


def _unit_gram(gram: torch.Tensor, unit: int) -> torch.Tensor:
    """Per-unit Gram (heads: the sum of each head block's trace products) from the channel Gram."""
    if unit == 1:
        return gram
    n = gram.shape[0] // unit
    return gram.view(n, unit, n, unit).diagonal(dim1=1, dim2=3).sum(-1)
