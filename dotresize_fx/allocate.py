"""One budget spread over the layers by measurement: each MLP group's width from calibrated sensitivity.

A uniform plan (`Targets`) says how many units the pass keeps in all; an allocation rule decides where. Both
rules read the dense model block by block (each block's statistics on the dense blocks' outputs, one extra
calibration forward per block, one block's Grams in memory at a time) and keep the uniform plan's parameters.

`curve` — least-squares error curves. With G the Gram at the group's observation point (N rows), W_c its
consumers (n × d, row convention) and π the pass's importance order, keeping the first k units of π and refitting
the consumers leaves the output error

    e(k) = tr(W_cᵀ G W_c) − ‖Z_{:k}‖²_F,   Z = L⁻¹ (G W_c)_π,   L Lᵀ = G_ππ + λI,

because the leading k×k block of a Cholesky factor is the factor of the leading k×k block: one factorisation
gives the whole curve. Each row of G is divided by the squared norm of the stream entering the block at that token,
so e(k) is the mean over tokens of ‖error‖²/‖stream‖² (a model that is one block: relative to e(0)). Every group starts at its floor (1 − 2f of its width, f the uniform fraction,
at least `round_to`), then `round_to` units at a time go to the group whose error falls most per parameter.

`importance` — FLAP-like: each group's importance scores divided by their mean, one global threshold, units
above it kept (rounded to `round_to`, the same floor).
"""
from __future__ import annotations

import contextlib
import heapq

import torch

from . import fit
from .blocks import BlockRunner, Blocks, hidden_in
from .calibrate import Calibration, Stats, observe_consumer, observing
from .groups import Analysis, WidthGroup
from .sites import consumer_norms, owner, site_tensor
from .targets import WidthPlan

RIDGE = 1e-6   # λ relative to mean diag(G): keeps the factorisation defined on a rank-deficient Gram


def error_curve(gram: torch.Tensor, consumer: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """e(k) for k = 0..n (see the module docstring): the least-squares output error of keeping order[:k]."""
    G = gram[order][:, order]
    lam = RIDGE * G.diagonal().mean().clamp_min(1e-30)
    L = torch.linalg.cholesky(G + lam * torch.eye(G.shape[0], dtype=G.dtype))
    Z = torch.linalg.solve_triangular(L, gram[order] @ consumer, upper=False)
    total = (consumer * (gram @ consumer)).sum()
    explained = torch.cat([torch.zeros(1, dtype=G.dtype), Z.pow(2).sum(1).cumsum(0)])
    return (total - explained).clamp_min(0.0)


def unit_params(model, g: WidthGroup) -> int:
    """Parameters one unit of the group carries (an MLP neuron: its gate and up rows, its down column)."""
    params, total = dict(model.named_parameters()), 0
    for m in g.members:
        p = params.get(m.param)
        if p is not None and m.role in ("producer", "consumer", "passthrough"):
            total += p.numel() // p.shape[m.dim] * (m.length or g.size * g.unit) // g.size
    return total


def _consumers(model, g: WidthGroup) -> torch.Tensor:
    """Every consumer reading the whole width, as one n × d matrix (row convention)."""
    n = g.size * g.unit
    mats = [site_tensor(model, *owner(model, m)).cpu().movedim(m.dim, 0).reshape(n, -1)
            for m in g.consumers() if (m.length or n) == n]
    return torch.cat(mats, dim=1)


def _measure(model, analysis: Analysis, names: list[str], batches, order: Blocks, importance: str,
             device: str, need_curve: bool) -> tuple[dict[str, dict], float]:
    """Per group: importance scores, and (`need_curve`) its relative error curve, from the dense model; and
    the seconds of calibration forwards that took."""
    runner = BlockRunner(model, order, batches, device)
    out: dict[str, dict] = {}
    for b in range(len(order.modules)):
        here = [n for n in names if order.index(analysis.group(n)) == b]
        if not here:
            continue
        cal, relative = Calibration(), {n: Stats.zeros(analysis.group(n).size) for n in here}
        with runner.onloaded(b), observing(model, analysis, here, cal), \
                _per_token_relative(model, analysis, order.modules[b], relative, not order.whole):
            runner.advance(b) if not order.whole else runner.run(b)
        cal.reduce()
        for n in here:
            g, stats = analysis.group(n), cal.stats[n]
            scores = fit.scores(importance, stats.mean_sq, consumer_norms(model, g), g.unit)
            entry = {"scores": scores}
            if need_curve:
                weighted = relative[n].reduce() if not order.whole else None
                curve = error_curve(weighted.gram if weighted else stats.gram, _consumers(model, g),
                                    scores.argsort(descending=True))
                entry["curve"] = curve / (weighted.count if weighted else curve[0])
            out[n] = entry
    return out, runner.forward_s


@contextlib.contextmanager
def _per_token_relative(model, analysis: Analysis, block, sinks: dict[str, Stats], active: bool):
    """Grams of the groups' observation rows, each row divided by the norm of the stream entering the block at
    that token: the curve is then the mean over tokens of ‖error‖² / ‖stream‖², which is what the next norm
    sees (a few tokens with huge activations, such as BOS, would otherwise set the scale of a whole layer)."""
    if not active:
        yield
        return
    scale: list[torch.Tensor] = []

    def on_block(_module, args, kwargs):
        x = hidden_in(args, kwargs).detach().to(torch.float64)
        scale[:] = [x.pow(2).sum(-1).clamp_min(1e-30).rsqrt().reshape(-1, 1)]
    hooks = [block.register_forward_pre_hook(on_block, with_kwargs=True)]
    for n, sink in sinks.items():
        hooks.append(observe_consumer(model, analysis.group(n), lambda h, sink=sink: sink.add(
            h.reshape(-1, h.shape[-1]).to(torch.float64) * scale[0])))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def allocate(model, analysis: Analysis, plan: WidthPlan, rule: str, batches, order: Blocks, importance: str,
             round_to: int, device: str = "cpu") -> dict:
    """Rewrite `plan`'s MLP widths by `rule` (same kept parameters as the uniform plan); returns the report."""
    names = [n for n, (m, _) in plan.widths.items() if analysis.group(n).kind == "mlp"
             and order.index(analysis.group(n)) is not None]
    if len(names) < 2:
        return {"rule": rule, "note": "fewer than two MLP groups in chaining blocks: nothing to spread"}
    groups = {n: analysis.group(n) for n in names}
    cost = {n: unit_params(model, g) for n, g in groups.items()}
    budget = sum(cost[n] * plan.widths[n][0] for n in names)
    floor = {n: _floor(g.size, plan.widths[n][0], round_to) for n, g in groups.items()}
    measured, forward_s = _measure(model, analysis, names, batches, order, importance, device, rule == "curve")
    widths = (_greedy if rule == "curve" else _threshold)(measured, groups, cost, floor, budget, round_to)
    for n, m in widths.items():
        plan.widths[n] = (m, None)
    report = {"rule": rule, "widths": widths, "forward_s": forward_s, "params_kept": sum(cost[n] * widths[n] for n in names),
              "params_uniform": budget}
    if rule == "curve":
        report["relative_error"] = {n: float(measured[n]["curve"][widths[n]]) for n in names}
    return report


def _floor(size: int, uniform: int, round_to: int) -> int:
    f = 1 - uniform / size
    return max(round_to, int(round(size * max(0.0, 1 - 2 * f) / round_to)) * round_to)


def _greedy(measured, groups, cost, floor, budget, step) -> dict[str, int]:
    """Grow from the floors, `step` units at a time, where the error falls most per parameter."""
    widths = dict(floor)
    spent = sum(cost[n] * widths[n] for n in widths)

    def gain(n):
        w = widths[n]
        nxt = min(w + step, groups[n].size)
        curve = measured[n]["curve"]
        return float(curve[w] - curve[nxt]) / (cost[n] * (nxt - w)), nxt
    heap = [(-gain(n)[0], n) for n in widths if widths[n] < groups[n].size]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        _, nxt = gain(n)
        extra = cost[n] * (nxt - widths[n])
        if spent + extra > budget:
            continue
        widths[n], spent = nxt, spent + extra
        if widths[n] < groups[n].size:
            heapq.heappush(heap, (-gain(n)[0], n))
    return widths


def _threshold(measured, groups, cost, floor, budget, step) -> dict[str, int]:
    """FLAP-like: one threshold on per-group normalised importance, scanned from the most important unit."""
    ranked = []
    for n in groups:
        s = measured[n]["scores"]
        ranked += [(float(v), n) for v in (s / s.mean().clamp_min(1e-30)).tolist()]
    ranked.sort(reverse=True)
    counts = {n: 0 for n in groups}
    spent = sum(cost[n] * floor[n] for n in groups)
    for _, n in ranked:
        counts[n] += 1
        if counts[n] > floor[n]:
            if spent + cost[n] > budget:
                break
            spent += cost[n]
    # rounded down to multiples of `step`, never below the floor or above the width
    return {n: min(groups[n].size, max(floor[n], counts[n] // step * step)) for n in groups}
