"""Passes over a model's widths (shape of torch.fx.passes.infra: PassBase → PassResult) and the pipeline.

A width pass turns calibration statistics into one WidthMap per group (`maps`), then `rewrite.apply` does
the rest; `ensures` measures the output change on a fixed probe batch and records it in the report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .analyze import Analysis, WidthGroup
from .calibrate import Calibration
from .errors import DotResizeError
from .load import model_outputs
from .rewrite import WidthMap, apply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Targets:
    """Fraction of each kind's width to remove (keep_ratio = 1 − fraction), rounded as reported."""
    mlp: float = 0.0
    heads: float = 0.0
    residual: float = 0.0
    round_to: int = 8

    def __post_init__(self):
        for kind in ("mlp", "heads", "residual"):
            f = getattr(self, kind)
            if not 0.0 <= f < 1.0:
                raise DotResizeError(f"--{kind} {f}: a fraction to remove must be in [0, 1)")

    def fraction(self, kind: str) -> float:
        return getattr(self, kind, 0.0)


@dataclass
class WidthPlan:
    """The widths a pass will produce: group → (q heads or channels, kv heads or None)."""
    widths: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    rounding: list[str] = field(default_factory=list)


def plan_widths(analysis: Analysis, targets: Targets) -> WidthPlan:
    plan = WidthPlan()
    for g in analysis.groups:
        f = targets.fraction(g.kind)
        if f == 0.0:
            continue
        if not g.resizable:
            raise DotResizeError(f"--{g.kind} {f}: group {g.name} is not resizable ({g.reason})")
        if g.kind == "heads":
            m, kv = _head_width(g, f)
            want = g.size * (1 - f)
        else:
            step = targets.round_to if g.size >= 2 * targets.round_to else 1
            want = g.size * (1 - f)
            m, kv = max(step, int(round(want / step)) * step), None
        if m >= g.size:
            continue
        plan.widths[g.name] = (m, kv)
        if abs(m - want) > 1e-9:
            plan.rounding.append(f"{g.name}: {g.size}→{m} (asked {want:.1f})")
    return plan


def _head_width(g: WidthGroup, f: float) -> tuple[int, int]:
    """Whole GQA groups, or the same number of q heads in every group, so num_heads % num_kv_heads == 0."""
    kv, rep = g.kv_heads, g.size // g.kv_heads
    target = g.size * (1 - f)
    options = [(k * rep, k) for k in range(1, kv + 1)] + [(kv * r, kv) for r in range(1, rep + 1)]
    return min(options, key=lambda o: (abs(o[0] - target), -o[0]))


def probe_diff(before: torch.nn.Module, after: torch.nn.Module, probe: tuple) -> float:
    with torch.no_grad():
        a, b = model_outputs(before, probe), model_outputs(after, probe)
    return (a - b).abs().max().item()


class WidthPass(PassBase):
    """Base of prune / dotresize / pca: `maps()` is the method; rewriting and checking are shared."""

    name = "width"

    def __init__(self, analysis: Analysis, calibration: Calibration | None, probe: tuple):
        super().__init__()
        self.analysis, self.calibration, self.probe = analysis, calibration, probe
        self.report: dict = {}

    def maps(self, model: torch.nn.Module) -> dict[str, WidthMap]:
        raise NotImplementedError

    def call(self, model: torch.nn.Module) -> PassResult:
        maps = self.maps(model)
        if not maps:
            return PassResult(model, False)
        new, rewrite = apply(model, self.analysis, maps)
        self.report.update(widths=rewrite.widths, untied=rewrite.untied, config=rewrite.config,
                           stock=rewrite.stock, notes=rewrite.notes,
                           probe_max_abs_diff=probe_diff(model, new, self.probe))  # measured, not asserted: lossy
        return PassResult(new, True)


def ls_unmerge(merge: torch.Tensor, gram: torch.Tensor, reg: float = 1e-4) -> torch.Tensor:
    """U = (MᵀGM + λI)⁻¹ MᵀG: the least-squares best reconstruction of X from XM (λ relative to tr/m)."""
    A = merge.T @ gram @ merge
    lam = reg * A.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype), merge.T @ gram)


def consumer_column_norms(model: torch.nn.Module, group: WidthGroup) -> torch.Tensor:
    """‖W_c[:, i]‖ over all consumers, per channel of the group (n × unit)."""
    n_ch = group.size * group.unit
    total = torch.zeros(n_ch, dtype=torch.float64)
    for m in group.consumers():
        if (m.length or n_ch) != n_ch:
            continue
        owner, _, attr = m.param.rpartition(".")
        mod = model.get_submodule(m.module if m.module and hasattr(model.get_submodule(m.module), attr) else owner)
        W = getattr(mod, attr).detach().to(torch.float64).movedim(m.dim, -1)
        total += W.reshape(-1, n_ch).pow(2).sum(0)
    return total.sqrt()


def unit_scores(channel_scores: torch.Tensor, unit: int) -> torch.Tensor:
    return channel_scores.view(-1, unit).pow(2).sum(1).sqrt() if unit > 1 else channel_scores


def keep_heads(g: WidthGroup, scores: torch.Tensor, m: int, kv_after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q heads to keep (sorted) and kv heads to keep, respecting GQA groups."""
    kv, rep = g.kv_heads, g.size // g.kv_heads
    per = scores.view(kv, rep)
    if kv_after < kv:
        kv_keep = per.sum(1).topk(kv_after).indices.sort().values
        q_keep = torch.cat([k * rep + torch.arange(rep) for k in kv_keep.tolist()])
    else:
        kv_keep = torch.arange(kv)
        r = m // kv
        q_keep = torch.cat([k * rep + per[k].topk(r).indices.sort().values for k in range(kv)])
    return q_keep, kv_keep
