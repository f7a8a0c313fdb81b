"""The prune pass: keep the most important channels or heads of each group (selection maps, DESIGN §5).

Importance per channel i of a group, from the group's observation-point Gram G and consumers W_c:
  weight      ‖W_c[:, i]‖
  activation  sqrt(G_ii / N)
  act_weight  sqrt(G_ii / N) · ‖W_c[:, i]‖          (default; the best of the three in REFERENCE.md)
  cholesky    not a score: greedy column-subset selection (pivoted Cholesky on D·G·D, D = diag ‖W_c[:, i]‖),
              the neurons whose consumer contributions best span the others (MLP / channels only)
Heads score as the norm of their channels' scores; GQA heads go by whole kv groups or evenly within groups.
`unmerge="ls"` compensates the consumers by least squares: U = (SᵀGS + λI)⁻¹(SᵀG + λSᵀ), a ridge toward
plain selection whose λ is picked on held-out calibration rows (pipeline.ridge_fit)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from dotresize_fx.analyze import WidthGroup
from dotresize_fx.calibrate import Stats
from dotresize_fx.pipeline import Targets, WidthPass, consumer_column_norms, keep_heads, ls_unmerge, unit_scores
from dotresize_fx.rewrite import WidthMap, expand_units, selection_matrix

Importance = Literal["weight", "activation", "act_weight", "cholesky"]


@dataclass(frozen=True)
class PruneConfig:
    targets: Targets = field(default_factory=Targets)
    importance: Importance = "act_weight"
    unmerge: Literal["select", "ls"] = "select"
    ls_reg: float = 1e-4
    ls_target: Literal["current", "dense"] = "current"   # what layerwise `ls` fits (see WidthPass.refine)
    refine: bool = True        # layerwise `ls`: fit consumers to the dense model's activations (see pipeline)


def pivoted_cholesky(gram: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of m columns chosen greedily to span the others best (largest residual variance first)."""
    n = gram.shape[0]
    d = gram.diagonal().clone()
    L = torch.zeros(n, m, dtype=gram.dtype)
    chosen = []
    for k in range(m):
        i = int(torch.argmax(d))
        chosen.append(i)
        col = (gram[:, i] - L[:, :k] @ L[i, :k]) / d[i].clamp_min(1e-30).sqrt()
        L[:, k] = col
        d -= col ** 2
        d[chosen] = -float("inf")
    return torch.tensor(sorted(chosen))


def select(model, g: WidthGroup, stats: Stats | None, kind: Importance, m: int) -> torch.Tensor:
    """The m units to keep (sorted) for a group without GQA structure."""
    if kind == "cholesky" and g.unit == 1:
        D = consumer_column_norms(model, g)
        return pivoted_cholesky(stats.gram * D[:, None] * D[None, :], m)
    return unit_scores(importance(model, g, stats, kind), g.unit).topk(m).indices.sort().values


def importance(model, g: WidthGroup, stats: Stats | None, kind: Importance) -> torch.Tensor:
    """Channel importance (n·unit) by the given kind (cholesky ranks heads by act_weight)."""
    kind = "act_weight" if kind == "cholesky" else kind
    if kind != "weight" and stats is None:
        raise ValueError(f"importance {kind!r} needs calibration statistics for {g.name}")
    act = stats.mean_sq.sqrt() if kind != "weight" else 1.0
    weight = consumer_column_norms(model, g) if kind != "activation" else 1.0
    return act * weight


class PrunePass(WidthPass):
    name = "prune"

    def __init__(self, config: PruneConfig, analysis, calibration, probe, batches=None, progress=None):
        super().__init__(analysis, calibration, probe, batches, progress)
        self.config, self.targets, self.ls_reg, self.ls_target = (config, config.targets, config.ls_reg,
                                                                       config.ls_target)

    def refines(self, g: WidthGroup) -> bool:
        # on the current inputs a selection's h' is h·S, so the refit equals the Gram solution: only a
        # dense target is new information, and anything else would run every block twice for nothing
        return (g.kind in ("mlp", "heads") and self.config.unmerge == "ls" and self.config.refine
                and self.config.ls_target == "dense")

    def group_map(self, model, g: WidthGroup, m: int, kv_after: int | None, stats: Stats | None) -> WidthMap:
        if g.kind == "heads" and g.kv_heads != g.size:
            scores = unit_scores(importance(model, g, stats, self.config.importance), g.unit)
            q_keep, kv_keep = keep_heads(g, scores, m, kv_after)
            w = WidthMap.selection(g.name, g.size, q_keep, g.kv_heads, kv_keep)
        else:
            w = WidthMap.selection(g.name, g.size, select(model, g, stats, self.config.importance, m))
        if self.config.unmerge == "ls":
            S = expand_units(selection_matrix(g.size, w.keep), g.unit)
            U, lam = ls_unmerge(S, stats.gram, self.config.ls_reg, prior=S.T, holdout=stats.holdout)
            self.record_ls(g, lam)
            if g.unit == 1:
                w.unmerge = U
            else:
                w.unmerge_channels = U
        return w
