"""Passes over a model's widths (shape of torch.fx.passes.infra: PassBase → PassResult) and the pipeline.

A width pass turns calibration statistics into one WidthMap per group (`maps`), then `rewrite.apply` does
the rest; `ensures` measures the output change on a fixed probe batch and records it in the report.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .analyze import Analysis, WidthGroup
from .calibrate import BlockRunner, Calibration, Stats, block_list, block_of, collect_stats, holdout_rows
from .errors import DotResizeError
from .load import model_outputs
from .rewrite import WidthMap, apply, expand_units, finalize, restored, stage_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Targets:
    """Fraction of each kind's width to remove (keep_ratio = 1 − fraction), rounded as reported."""
    mlp: float = 0.0
    heads: float = 0.0
    residual: float = 0.0
    round_to: int = 8
    residual_maps: str = "global"   # "per_layer": a basis per block, adapters on the skips (not stock)

    def __post_init__(self):
        for kind in ("mlp", "heads", "residual"):
            f = getattr(self, kind)
            if not 0.0 <= f < 1.0:
                raise DotResizeError(f"--{kind} {f}: a fraction to remove must be in [0, 1)")
        if self.residual_maps not in ("global", "per_layer"):
            raise DotResizeError(f"residual_maps={self.residual_maps}: use global or per_layer")

    def fraction(self, kind: str) -> float:
        return getattr(self, kind, 0.0)


@dataclass
class WidthPlan:
    """The widths a pass will produce: group → (q heads or channels, kv heads or None)."""
    widths: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    rounding: list[str] = field(default_factory=list)


def plan_widths(analysis: Analysis, targets: Targets, residual_multiple: int = 1) -> WidthPlan:
    """Widths per group. `residual_multiple`: the residual also rounds to it (HF configs require
    hidden_size % num_attention_heads == 0 even with an explicit head_dim)."""
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
            if g.kind == "residual":
                step = math.lcm(step, residual_multiple)
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
    """Base of prune / dotresize / pca: `group_map()` is the method; planning, order and rewriting are shared.

    With calibration `batches`, groups inside the model's blocks are calibrated and resized layer by layer:
    block l's statistics come from inputs produced by the already resized blocks < l (DESIGN §5.6), and only
    one block's statistics are in memory. Groups that span blocks (the residual stream) go first, from
    statistics of the whole model (`calibration`).
    """

    name = "width"

    def __init__(self, analysis: Analysis, calibration: Calibration | None, probe: tuple, batches=None,
                 progress=None):
        super().__init__()
        self.analysis, self.calibration, self.probe, self.batches = analysis, calibration, probe, batches
        self.progress = progress
        self.report: dict = {}

    targets: Targets

    def group_map(self, model: torch.nn.Module, g: WidthGroup, m: int, kv_after: int | None,
                  stats: Stats | None) -> WidthMap:
        raise NotImplementedError

    def refines(self, g: WidthGroup) -> bool:
        """Whether the group's consumers are refitted on real activations (layerwise `ls`)."""
        return False

    ls_reg: float = 1e-4
    ls_target: str = "current"   # "dense": fit to the dense model's activations (measured worse on SmolLM2)

    def refine(self, model, g: WidthGroup, w: WidthMap, runner: BlockRunner, block: int,
               target: list[torch.Tensor] | None) -> WidthMap:
        if not self.refines(g):
            return w
        w, lam = refine_unmerge(model, self.analysis, g, w, runner, block, self.ls_reg, target)
        self.record_ls(g, lam)
        return w

    def record_ls(self, g: WidthGroup, lam: float) -> None:
        """The ridge λ each least-squares fit chose (relative; ∞: the fit kept the pass's own map)."""
        self.report.setdefault("ls_reg", {})[g.name] = lam if math.isfinite(lam) else "prior"

    def call(self, model: torch.nn.Module) -> PassResult:
        heads = {g.size for g in self.analysis.by_kind("heads")}
        stock_multiple = heads.pop() if hasattr(model, "config") and len(heads) == 1 else 1
        plan = plan_widths(self.analysis, self.targets, stock_multiple)
        self.report["rounding"] = plan.rounding
        if not plan.widths:
            return PassResult(model, False)
        stats = self.calibration.stats if self.calibration is not None else {}
        new = copy.deepcopy(model)
        blocks = block_list(new, self.analysis, self.batches) if self.batches is not None else None
        if blocks is None:
            if self.targets.residual_maps == "per_layer" and self.targets.residual:
                raise DotResizeError("per_layer residual maps need blocks that chain (hidden = block(hidden)) "
                                     "and calibration batches; use residual_maps=global")
            missing = [n for n in plan.widths if n not in stats and self.analysis.group(n).kind != "channels"]
            if missing and self.batches is not None:  # blocks that do not chain: calibrate the whole model once
                stats = {**stats, **collect_stats(model, self.analysis, self.batches, missing, progress=False).stats}
                self.report["layerwise_skipped"] = "the model's blocks do not chain (residual added outside them)"
            maps = {name: self.group_map(new, self.analysis.group(name), m, kv, stats.get(name))
                    for name, (m, kv) in plan.widths.items()}
            _, rewrite = apply(new, self.analysis, maps, inplace=True)
        else:
            _, rewrite = self._layerwise(model, new, plan, stats, blocks)
        self.report.update(widths=rewrite.widths, untied=rewrite.untied, config=rewrite.config,
                           stock=rewrite.stock, notes=rewrite.notes, layerwise=blocks is not None,
                           probe_max_abs_diff=probe_diff(model, new, self.probe))  # measured, not asserted: lossy
        return PassResult(new, True)

    def _spanning_map(self, model, g: WidthGroup, m, kv, stats, blocks) -> WidthMap:
        """A group that spans the blocks: one map, or for a per_layer residual one per block plus the last."""
        if g.kind != "residual" or self.targets.residual_maps == "global":
            return self.group_map(model, g, m, kv, stats)
        prefix, n_blocks = blocks[0], len(blocks[1])
        per_norm = self.calibration.norms if self.calibration is not None else {}
        if not per_norm:
            raise DotResizeError("per_layer residual maps need per-norm statistics (collect_stats per_norm=True)")
        stages = [None] * (n_blocks + 1)
        for norm in g.norms:
            i = stage_of(norm, prefix, n_blocks)
            stages[i] = per_norm[norm] if stages[i] is None else stages[i] + per_norm[norm]
        if any(st is None for st in stages):
            raise DotResizeError(f"per_layer residual maps: a stage of {g.name} has no norm to calibrate it")
        w = self.group_map(model, g, m, kv, stats)
        w.stages = [self.group_map(model, g, m, kv, st) for st in stages]
        w.stage_prefix = prefix
        return w

    def _layerwise(self, model, new, plan: WidthPlan, stats, blocks):
        prefix, modules = blocks
        inside = {name: block_of(self.analysis.group(name), prefix) for name in plan.widths}
        maps = {name: self._spanning_map(new, self.analysis.group(name), m, kv, stats.get(name), blocks)
                for name, (m, kv) in plan.widths.items() if inside[name] is None}
        untied, notes = [], []
        if maps:
            _, first = apply(new, self.analysis, maps, inplace=True, finalize=False)
            untied, notes = first.untied, first.notes
        runner = BlockRunner(new, modules, self.batches)
        refined = [n for n in plan.widths if inside[n] is not None and self.refines(self.analysis.group(n))]
        dense = BlockRunner(model, model.get_submodule(prefix), self.batches) \
            if refined and self.ls_target == "dense" else None
        for b in range(len(modules)):
            names = [n for n in plan.widths if inside[n] == b]
            targets = dense_targets(model, self.analysis, [n for n in refined if inside[n] == b], dense, b) \
                if dense else {}
            if names:
                block_stats = runner.collect(self.analysis, names, b)
                block_maps = {}
                for n in names:
                    g = self.analysis.group(n)
                    m, kv = plan.widths[n]
                    block_maps[n] = self.refine(new, g, self.group_map(new, g, m, kv, block_stats[n]), runner, b,
                                                targets.get(n))
                apply(new, self.analysis, block_maps, inplace=True, finalize=False)
                maps.update(block_maps)
            runner.advance(b)
            if self.progress:
                self.progress(b + 1, len(modules))
        self.report["calib_forward_s"] = runner.forward_s + (dense.forward_s if dense else 0.0)
        rewrite = finalize(new, self.analysis, maps)
        rewrite.untied, rewrite.notes = untied, notes + rewrite.notes
        return maps, rewrite


def dense_targets(model, analysis: Analysis, names: list[str], dense: BlockRunner, b: int) -> dict:
    """Consumer inputs of the dense model's block b for each group (per batch), and advance the dense runner."""
    from .calibrate import _observed_consumer
    found = {n: [] for n in names}
    hooks = []
    for n in names:
        mod = model.get_submodule(_observed_consumer(analysis.group(n)).module)
        hooks.append(mod.register_forward_pre_hook(
            lambda _m, args, n=n: found[n].append(args[0].reshape(-1, args[0].shape[-1]))))
    try:
        dense.advance(b)
    finally:
        for h in hooks:
            h.remove()
    return found


LS_REGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)   # λ tried against held-out rows, after the pass's own


def ridge_fit(A: torch.Tensor, B: torch.Tensor, reg: float, prior: torch.Tensor | None = None,
              A_hold: torch.Tensor | None = None,
              B_hold: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """U = argmin ‖H − H'U‖² + λ‖U − U₀‖² = (A + λI)⁻¹(B + λU₀); A = H'ᵀH', B = H'ᵀH, U₀ = `prior` (or 0).

    λ is relative to the mean of diag(A). With held-out Grams (A_hold, B_hold: the held-out rows' share of A
    and B) λ is the one among `reg` and LS_REGS whose fit on the other rows best predicts the held-out rows
    (∞ = U₀ itself); then U is refitted on all rows. Without them λ = `reg`. A calibration set too small for
    the width would otherwise turn the fit into noise (SmolLM2, prune+ls MLP 1536→1152 from 4×256 tokens:
    perplexity 514 with λ = 1e-4, 50.9 picked on held-out rows; plain selection 53.4).
    Returns U and the relative λ used.
    """
    U0 = torch.zeros_like(B) if prior is None else prior.to(B.dtype)
    if A_hold is not None and A_hold.abs().sum() > 0 and (A - A_hold).abs().sum() > 0:
        A_fit, B_fit = A - A_hold, B - B_hold
        errors = {lam: _holdout_error(_ridge(A_fit, B_fit, lam, U0), A_hold, B_hold) for lam in (reg, *LS_REGS)}
        reg = min(errors, key=errors.get)
    return _ridge(A, B, reg, U0), reg


def _ridge(A, B, reg, U0):
    if math.isinf(reg):
        return U0.clone()
    lam = reg * A.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype), B + lam * U0)


def _holdout_error(U, A_hold, B_hold) -> float:
    """‖H − H'U‖² on the held-out rows, up to the constant ‖H‖²."""
    return float((U * (A_hold @ U)).sum() - 2 * (U * B_hold).sum())


def ls_unmerge(merge: torch.Tensor, gram: torch.Tensor, reg: float = 1e-4, prior: torch.Tensor | None = None,
               holdout: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """U ≈ (MᵀGM + λI)⁻¹ (MᵀG + λU₀): the least-squares reconstruction of X from XM (`ridge_fit`; `holdout`:
    the held-out rows' share of G, to pick λ)."""
    hold = (None, None) if holdout is None else (merge.T @ holdout @ merge, merge.T @ holdout)
    return ridge_fit(merge.T @ gram @ merge, merge.T @ gram, reg, prior, *hold)


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


def refine_unmerge(model, analysis: Analysis, g: WidthGroup, w: WidthMap, runner: BlockRunner, block: int,
                   reg: float, target: list[torch.Tensor] | None = None) -> tuple[WidthMap, float]:
    """U = (h'ᵀh' + λI)⁻¹(h'ᵀh + λU₀) from the block's real activations (streamed per batch), U₀ the map's
    own unmerge, λ picked on held-out rows (`ridge_fit`). Returns the map and λ.

    h' is the consumer's input once the producers are merged (for an MLP, through the nonlinearity); h is
    the dense model's consumer input on the dense model's own hidden states (`target`), so the fit also
    corrects the error that earlier resized blocks left, or, without a target, the original producers'
    output on the current inputs.
    """
    from .calibrate import _observed_consumer
    consumer = _observed_consumer(g)
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(consumer.module).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        if target is None:
            runner.run(block)                               # h: original producers, current inputs
            target = captured[:]
            captured.clear()
        with restored(runner.blocks[block]):                # a trial: the pass applies the refined map
            apply(model, analysis, {g.name: w}, inplace=True, finalize=False)
            runner.run(block)                               # h': merged producers
    finally:
        hook.remove()
    n_out = captured[0].shape[-1]
    A, A_hold = (torch.zeros(n_out, n_out, dtype=torch.float64) for _ in range(2))
    B, B_hold = (torch.zeros(n_out, target[0].shape[-1], dtype=torch.float64) for _ in range(2))
    for h, h2 in zip(target, captured):
        h, h2 = h.double(), h2.double()
        A += h2.T @ h2
        B += h2.T @ h
        hold = holdout_rows(h.shape[0])
        A_hold += h2[hold].T @ h2[hold]
        B_hold += h2[hold].T @ h[hold]
    prior = w.unmerge_channels if w.unmerge_channels is not None else expand_units(w.unmerge, g.unit)
    U, lam = ridge_fit(A, B, reg, prior, A_hold, B_hold)
    if g.unit == 1:
        w.unmerge = U
    else:
        w.unmerge_channels = U
    return w, lam


