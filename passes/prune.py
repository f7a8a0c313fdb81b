"""The prune pass: keep the most important channels or heads of each group (selection maps, DESIGN §5).

Importance per channel (`dotresize_fx.fit.IMPORTANCES`): `weight` ‖W_c[:, i]‖, `activation` sqrt(G_ii / N),
`act_weight` their product (default; the best of the three in REFERENCE.md), `cholesky` greedy column-subset
selection on D·G·D, `transport` the targets that make moving every neuron onto its nearest one cheapest
(`fit.transport_targets`; both MLP / channels, heads rank by act_weight). Heads score as the norm of their channels'
scores; GQA heads go by whole kv groups or evenly within groups.
`unmerge="ls"` compensates the consumers by least squares: U = (SᵀGS + λI)⁻¹(SᵀG + λSᵀ), a ridge toward
plain selection whose λ is picked on held-out calibration rows (`fit.ridge_fit`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from dotresize_fx import fit
from dotresize_fx.calibrate import Stats
from dotresize_fx.groups import WidthGroup
from dotresize_fx.maps import WidthMap
from dotresize_fx.pipeline import WidthPass
from dotresize_fx.sites import consumer_norms, expand_index
from dotresize_fx.targets import Targets

Importance = Literal[tuple(fit.IMPORTANCES)]


@dataclass(frozen=True)
class PruneConfig:
    targets: Targets = field(default_factory=Targets)
    importance: Importance = "act_weight"
    unmerge: Literal["select", "ls"] = "select"
    ls_reg: float = 1e-4
    ls_target: Literal["current", "dense"] = "current"   # "dense": refit consumers to the dense model's activations
    refine: bool = True        # with ls_target=dense: refit on real activations (otherwise the Gram solution)


def keep_units(model, g: WidthGroup, stats: Stats | None, importance: str, m: int,
               kv_after: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The units a selection keeps: (q heads or channels, kv heads or None)."""
    mean_sq = stats.mean_sq if stats is not None else None
    # the Gram only for an importance that selects from it (forming it costs n² per row when rows are kept)
    gram = stats.gram if stats is not None and fit.IMPORTANCES[importance].select is not None else None
    norms = consumer_norms(model, g)
    if g.kind == "heads" and g.kv_heads != g.size:
        return fit.keep_heads(fit.scores(importance, mean_sq, norms, g.unit), g.kv_heads, m, kv_after)
    return fit.select(importance, mean_sq, norms, gram, g.unit, m), None


class PrunePass(WidthPass):
    name = "prune"
    Config = PruneConfig

    def refits(self, g: WidthGroup) -> bool:
        # on the current inputs a selection's h' is h·S, so the refit equals the Gram solution: only a
        # dense target is new information, and anything else would run every block twice for nothing
        return (g.kind in ("mlp", "heads") and self.config.unmerge == "ls" and self.config.refine
                and self.config.ls_target == "dense")

    def group_map(self, model, g: WidthGroup, m: int, kv_after: int | None, stats: Stats | None) -> WidthMap:
        keep, kv_keep = keep_units(model, g, stats, self.config.importance, m, kv_after)
        w = WidthMap.selection(g.name, g.size, keep, g.kv_heads if kv_keep is not None else None, kv_keep)
        if self.config.unmerge == "ls" and not self.refits(g):
            rows = stats.rows
            fill, lam = fit.selection_fill(expand_index(w.keep, g.unit), g.size * g.unit,
                                           stats.gram if rows is None else None, self.config.ls_reg,
                                           holdout=None if rows is not None else stats.holdout, rows=rows)
            self.record_ls(g, lam)
            w.set_channel_unmerge(fill, g.unit)
        return w
