"""What a width pass is asked to remove (Targets) and the widths that follow for each group (plan_widths)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from .errors import DotResizeError
from .evaluate import parameter_counts
from .groups import Analysis, WidthGroup

TARGET_KINDS = ("mlp", "heads", "residual", "channels")
ResidualMaps = Literal["global", "per_layer"]
Allocation = Literal["uniform", "curve", "fisher", "importance"]


@dataclass(frozen=True)
class Targets:
    """Fraction of each kind's width to remove (keep_ratio = 1 − fraction; None: leave that kind alone),
    rounded to multiples of `round_to` as reported."""
    mlp: float | None = None
    heads: float | None = None
    residual: float | None = None
    channels: float | None = None
    budget: float | None = None   # fraction of the non-embedding parameters: an MLP cut (`budget_targets`)
    round_to: int = 8
    residual_maps: ResidualMaps = "global"   # "per_layer": a basis per block, adapters on the skips (not stock)
    # how the MLP and heads units kept are spread (`allocate`); unset: fisher for a budget (the best measured on
    # SmolLM2), uniform for fractions given per kind
    allocation: Allocation | None = None
    fold_bn: bool = False                    # channels: BatchNorm scales folded into their convs first (`foldbn`)
    residual_refit: bool = False             # the stream's readers refitted block by block (`refit_residual`)

    def __post_init__(self):
        if self.allocation is None:
            object.__setattr__(self, "allocation", "fisher" if self.budget is not None else "uniform")
        for kind in TARGET_KINDS:
            f = getattr(self, kind)
            if f is not None and not (isinstance(f, (int, float)) and 0.0 < f < 1.0):
                raise DotResizeError(f"{kind}={f}: a fraction to remove must be in (0, 1), e.g. {kind}=0.25")
        if self.budget is not None:
            if not (isinstance(self.budget, (int, float)) and 0.0 < self.budget < 1.0):
                raise DotResizeError(f"budget={self.budget}: the fraction of non-embedding parameters to remove "
                                     "must be in (0, 1), e.g. budget=0.2")
            if self.mlp is not None or self.heads is not None:
                raise DotResizeError("budget spreads one reduction over the MLP (and, with allocation=curve or "
                                     "fisher, the heads) widths: give it instead of mlp/heads fractions")
        if self.residual_refit and self.residual is None:
            raise DotResizeError("residual_refit refits the readers of a resized residual stream: give residual=F")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise DotResizeError(f"round_to={self.round_to}: give a positive whole number (default 8)")

    def fraction(self, kind: str) -> float:
        return getattr(self, kind, None) or 0.0

    def budget_targets(self, model, analysis: Analysis) -> "Targets":
        """The budget as the MLP fraction that removes it: every MLP neuron carries its share of the MLP's
        parameters (2 or 3 weights per residual channel), so that fraction of the MLP width."""
        if self.budget is None:
            return self
        mlp = sum(model.get_parameter(m.param).numel() for g in analysis.by_kind("mlp") for m in g.members
                  if m.role != "index")
        if not mlp:
            raise DotResizeError(f"budget={self.budget}: this model has no MLP group to spread it over")
        fraction = self.budget * parameter_counts(model)["non_embedding"] / mlp
        if fraction >= 1:
            raise DotResizeError(f"budget={self.budget} is more than all MLP parameters ({mlp}): lower it, or add "
                                 "heads/residual fractions instead")
        return dataclasses.replace(self, mlp=fraction, budget=None)

    def kinds(self) -> set[str]:
        """The kinds this pass may resize (a budget: the MLP, and with curve or fisher allocation the heads)."""
        spread = {"mlp", "heads"} if self.allocation in ("curve", "fisher") else {"mlp"}
        return set(self.asked()) | (spread if self.budget is not None else set())

    def asked(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in TARGET_KINDS if getattr(self, k) is not None}


@dataclass
class WidthPlan:
    """The widths a pass will produce: group → (q heads or channels, kv heads or None)."""
    widths: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    rounding: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # channel groups left alone, with the reason


def plan_widths(analysis: Analysis, targets: Targets, residual_multiple: int = 1, where: str = "pass") -> WidthPlan:
    """Widths per group. `residual_multiple`: the residual also rounds to it (HF configs require
    hidden_size % num_attention_heads == 0 even with an explicit head_dim). Targets that match no group, and
    targets that round to no change anywhere, are errors."""
    asked = targets.asked()
    if not asked:
        raise DotResizeError(f"{where}: no targets; give a fraction for one of {', '.join(TARGET_KINDS)} "
                             "(e.g. mlp=0.25 or --mlp 0.25)")
    counts = ", ".join(f"{len(analysis.by_kind(k))} {k}" for k in analysis.kinds()) or "no width groups"
    plan = WidthPlan()
    for kind, f in asked.items():
        groups = analysis.by_kind(kind)
        if not groups:
            raise DotResizeError(f"{where}: {kind}={f} matches no group: this model has {counts}; target one "
                                 "of those kinds ('dotresize-fx analyze MODEL' lists them)")
        # the groups of a kind that cannot change (an image's 3 channels, a stage's stream read by a norm) are
        # left as they are and listed; a kind none of whose groups can change is an error
        pinned = [g for g in groups if not g.resizable]
        groups = [g for g in groups if g.resizable]
        if not groups:
            raise DotResizeError(f"{where}: {kind}={f}: no {kind} group is resizable ({pinned[0].name}: "
                                 f"{pinned[0].reason})")
        plan.skipped += [f"{g.name}: {g.reason}" for g in pinned]
        for g in groups:
            m, kv, want = _width(g, f, targets.round_to, residual_multiple)
            if m < g.size:
                plan.widths[g.name] = (m, kv)
            if abs(m - want) > 1e-9:
                plan.rounding.append(f"{g.name}: {g.size}→{m} (asked {want:.1f})")
        if not any(g.name in plan.widths for g in groups):
            raise DotResizeError(f"{where}: {kind}={f} rounds to no change on any {kind} group (sizes "
                                 f"{sorted({g.size for g in groups})}, multiples of {targets.round_to}): "
                                 "raise the fraction or lower round_to")
    return plan


def _width(g: WidthGroup, f: float, round_to: int, residual_multiple: int) -> tuple[int, int | None, float]:
    want = g.size * (1 - f)
    if g.kind == "heads":
        m, kv = _head_width(g, f)
        return m, kv, want
    step = round_to if g.size >= 2 * round_to else 1
    if g.kind == "residual":
        step = math.lcm(step, residual_multiple)
    m = int(round(want / step)) * step
    if m < 1:
        raise DotResizeError(f"{g.kind}={f} would remove every channel of {g.name} ({g.size} → {want:.1f}, "
                             f"rounded to multiples of {step}): lower the fraction")
    return m, None, want


def _head_width(g: WidthGroup, f: float) -> tuple[int, int]:
    """Whole GQA groups, or the same number of q heads in every group, so num_heads % num_kv_heads == 0."""
    target = g.size * (1 - f)
    if target < 0.5:
        raise DotResizeError(f"heads={f} would remove every head of {g.name} ({g.size} heads → {target:.2f}): "
                             "lower the fraction")
    return min(head_options(g), key=lambda o: (abs(o[0] - target), -o[0]))


def head_options(g: WidthGroup) -> list[tuple[int, int]]:
    """Every (q heads, kv heads) a heads group can keep: k whole GQA groups, or r q heads in every group."""
    kv, rep = g.kv_heads, g.size // g.kv_heads
    return [(k * rep, k) for k in range(1, kv + 1)] + [(kv * r, kv) for r in range(1, rep + 1)]
