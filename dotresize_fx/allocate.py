"""One budget spread by measurement: the width of every MLP and heads group from calibrated sensitivity.

A uniform plan (`Targets`) says how many parameters the pass keeps in the groups it resizes; an allocation rule
decides where, across layers and across the two kinds, and keeps the uniform plan's parameters (or fewer).

Each group gets a ladder of widths it may keep, from a floor (1 − 2f of its width, f its uniform fraction) to
whole: MLP widths in steps of `round_to`; heads the (q, kv) options the pass can produce (whole GQA groups, or
the same number of q heads in every group). Each rung has its exact parameter count and an error. Groups start
at their floor; then the move, to any higher rung, that lowers the summed error most per parameter is taken
while the budget allows it.

The error of keeping units S (the pass's own importance order, or its GQA choice) and refitting the consumers
W_c (n × d, row convention) by least squares, with G the Gram at the group's observation point, is

    e(S) = tr(W_cᵀ G W_c) − ‖Z_{:|S|}‖²_F,   Z = L⁻¹ (G W_c)_π,   L Lᵀ = G_ππ + λI,   π = S first,

and for an importance order the leading k×k block of one Cholesky factor is the factor of the leading k×k
block: one factorisation gives the whole MLP curve. The rules differ in how rows of G are weighted:

`curve` — each row divided by the squared norm of the stream entering the block at that token, so e is the mean
over tokens of ‖error‖²/‖stream‖² (a model that is one block: relative to e(∅)). Blocks are read one at a time
on the dense blocks' outputs; one block's Grams in memory at a time.

`fisher` — each row weighted by how sensitive the model's loss is at the group's consumer output y: w_t =
‖∂ℓ/∂y_t‖², ℓ the cross-entropy of labels sampled from the model's own output distribution (the Fisher
information, label-free: the output is read as logits over its last dimension), so e ≈ 2·E[Δℓ] per token with
the Fisher taken isotropic per token — the loss, one unit for every layer and both kinds. First one forward and backward of the whole dense model per calibration batch (activation
gradients only, no weight gradients) gives w; the Grams are then taken block by block as for `curve`.

`importance` — FLAP-like, MLP groups only: each group's importance scores divided by their mean, one global
threshold, units above it kept (rounded to `round_to`, the same floor).
"""
from __future__ import annotations

import contextlib
import functools
import heapq
import time
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from . import fit
from .blocks import BlockRunner, Blocks, hidden_in
from .calibrate import Calibration, Stats, observation_point, observe_consumer, observing
from .errors import DotResizeError
from .groups import Analysis, WidthGroup
from .outputs import model_outputs
from .sites import consumer_norms, expand_index, owner, site_tensor
from .targets import WidthPlan, head_options

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


def subset_error(gram: torch.Tensor, consumer: torch.Tensor, keep: torch.Tensor) -> float:
    """e(S) for the channels `keep`: the curve of the order that puts them first, read at |S|."""
    rest = torch.ones(gram.shape[0], dtype=torch.bool)
    rest[keep] = False
    order = torch.cat([keep, rest.nonzero().squeeze(1)])
    return float(error_curve(gram, consumer, order)[keep.numel()])


@dataclass
class Ladder:
    """The widths a group may keep (q heads or channels, kv heads or None), their parameters and errors,
    in increasing parameters."""
    widths: list[tuple[int, int | None]]
    params: list[int]
    error: list[float]


def rung_params(params: dict, g: WidthGroup, m: int, kv: int | None) -> int:
    """Parameters the group's members carry at width m (kv heads for the members that are kv-wide);
    `params`: the model's named parameters."""
    total, n = 0, g.size * g.unit
    for mem in g.members:
        p = params.get(mem.param)
        if p is None or mem.role not in ("producer", "consumer", "passthrough"):
            continue
        per_channel, length = p.numel() // p.shape[mem.dim], mem.length or n
        kv_wide = g.kind == "heads" and kv is not None and length == g.kv_heads * g.unit != n
        total += per_channel * (kv * g.unit if kv_wide else length * m // g.size)
    return total


def _ladder(params: dict, g: WidthGroup, floor: int, step: int, gram: torch.Tensor, consumer: torch.Tensor,
            scores: torch.Tensor, scale: float) -> Ladder:
    if g.kind == "mlp":
        curve = error_curve(gram, consumer, scores.argsort(descending=True)) / scale
        widths = [(m, None) for m in sorted({*range(floor, g.size, step), g.size})]
        errors = [float(curve[m]) for m, _ in widths]
    else:
        widths = sorted({o for o in head_options(g) if o[0] >= floor} | {(g.size, g.kv_heads)},
                        key=lambda o: rung_params(params, g, *o))
        errors = [subset_error(gram, consumer, expand_index(fit.keep_heads(scores, g.kv_heads, m, kv)[0], g.unit)) / scale
                  for m, kv in widths]
    return Ladder(widths, [rung_params(params, g, m, kv) for m, kv in widths], errors)


def _consumers(model, g: WidthGroup) -> torch.Tensor:
    """Every consumer reading the whole width, as one n × d matrix (row convention)."""
    n = g.size * g.unit
    mats = [site_tensor(model, *owner(model, m)).cpu().movedim(m.dim, 0).reshape(n, -1)
            for m in g.consumers() if (m.length or n) == n]
    return torch.cat(mats, dim=1)


def _scores(model, g: WidthGroup, stats: Stats, importance: str) -> torch.Tensor:
    return fit.scores(importance, stats.mean_sq, consumer_norms(model, g), g.unit)


def _measure(model, analysis: Analysis, names: list[str], batches, order: Blocks, importance: str, device: str,
             rule: str, floors: dict, step: int, weights: dict | None = None) -> tuple[dict, dict, float]:
    """Per group: importance scores and (rules `curve`, `fisher`) its ladder, from the dense model block by
    block (each row weighted by `weights[n][batch]`, or by the entering stream's inverse norm); and the seconds
    of calibration forwards that took."""
    runner = BlockRunner(model, order, batches, device)
    scores, ladders, params = {}, {}, dict(model.named_parameters())
    for b in range(len(order.modules)):
        here = [n for n in names if order.index(analysis.group(n)) == b]
        if not here:
            continue
        cal = Calibration()
        weighted = {n: Stats.zeros(analysis.group(n).size * analysis.group(n).unit) for n in here}
        with runner.onloaded(b), observing(model, analysis, here, cal), \
                _weighted_rows(model, analysis, order.modules[b], weighted, weights, rule != "importance"):
            runner.advance(b) if not order.whole else runner.run(b)
        cal.reduce()
        for n in here:
            g, stats = analysis.group(n), cal.stats[n]
            scores[n] = _scores(model, g, stats, importance)
            if rule == "importance":
                continue
            consumer = _consumers(model, g)
            if order.whole and weights is None:   # one block: relative to the error of keeping nothing
                gram = stats.gram
                scale = subset_error(gram, consumer, torch.zeros(0, dtype=torch.long))
            else:
                gram, scale = weighted[n].reduce().gram, stats.count
            ladders[n] = _ladder(params, g, floors[n], step, gram, consumer, scores[n], max(scale, 1e-30))
    return scores, ladders, runner.forward_s


def fisher_weights(model, analysis: Analysis, names: list[str], batches, blocks: list[torch.nn.Module]
                   ) -> tuple[dict[str, list[torch.Tensor]], float]:
    """Per group and batch, each row's ‖∂ℓ/∂y_t‖ at the group's consumer output (see the module docstring):
    one forward and backward of the whole dense model per batch, each of `blocks` checkpointed (its
    activations recomputed in the backward, so one block's are held at a time); and the seconds that took."""
    rows = {n: [] for n in names}
    outputs = {}
    generator = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with _consumer_outputs(model, analysis, names, outputs), _activation_grads(model), _checkpointed(blocks):
        for batch in batches:
            with torch.enable_grad():
                logits = model_outputs(model, batch)
                grads = torch.autograd.grad(_sampled_nll(logits, generator), [outputs[n] for n in names])
            for n, g in zip(names, grads):
                rows[n].append(g.detach().reshape(-1, g.shape[-1]).to(torch.float64).pow(2).sum(-1).sqrt())
            outputs.clear()
    return rows, time.perf_counter() - t0


def _sampled_nll(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Σ −log p(y) over every position, y drawn from the model's own softmax: its gradient's outer product is
    an unbiased estimate of the Fisher information (no labels needed)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    y = torch.multinomial(flat.detach().softmax(-1), 1, generator=generator).squeeze(1)
    return torch.nn.functional.cross_entropy(flat, y, reduction="sum")


@contextlib.contextmanager
def _consumer_outputs(model, analysis: Analysis, names: list[str], outputs: dict):
    """Each group's consumer output (in the autograd graph), by group."""
    hooks = []
    try:
        for n in names:
            module = model.get_submodule(observation_point(analysis.group(n)).module)
            hooks.append(module.register_forward_hook(
                lambda _m, _a, out, n=n: outputs.__setitem__(n, out[0] if isinstance(out, tuple) else out)))
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _checkpointed(blocks: list[torch.nn.Module]):
    """Each block's forward under torch.utils.checkpoint while the Fisher pass runs (restored after)."""
    own = [block.__dict__.get("forward") for block in blocks]   # a forward set on the instance (accelerate's)
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@contextlib.contextmanager
def _activation_grads(model):
    """Parameters flagged as requiring grad while the graph is built, so that activations carry one (only
    gradients toward activations are asked for: no weight gradient is formed); the flags are restored."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@contextlib.contextmanager
def _weighted_rows(model, analysis: Analysis, block, sinks: dict[str, Stats], weights: dict | None,
                   active: bool):
    """Grams of the groups' observation rows, each row weighted: by `weights[n][i]` for the i-th batch through
    the block, or by the inverse norm of the stream entering the block at that token (the curve is then the
    mean over tokens of ‖error‖² / ‖stream‖², what the next norm sees: a few tokens with huge activations, such
    as BOS, would otherwise set the scale of a whole layer)."""
    if not active or (weights is None and block is model):
        yield
        return
    scale: list[torch.Tensor] = []
    seen = [-1]

    def on_block(_module, args, kwargs):
        seen[0] += 1
        if weights is None:
            x = hidden_in(args, kwargs).detach().to(torch.float64)
            scale[:] = [x.pow(2).sum(-1).clamp_min(1e-30).rsqrt().reshape(-1, 1)]

    def add(n, sink, h):
        rows = h.reshape(-1, h.shape[-1]).to(torch.float64)
        w = scale[0] if weights is None else weights[n][seen[0]].reshape(-1, 1).to(rows.device)
        if w.shape[0] != rows.shape[0]:
            raise DotResizeError(f"allocation=fisher: {n}'s consumer output has {w.shape[0]} rows for "
                                 f"{rows.shape[0]} input rows (a strided or pooling consumer): use allocation=curve")
        sink.add(rows * w)
    hooks = [block.register_forward_pre_hook(on_block, with_kwargs=True)]
    for n, sink in sinks.items():
        hooks.append(observe_consumer(model, analysis.group(n), lambda h, n=n, sink=sink: add(n, sink, h)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def allocate(model, analysis: Analysis, plan: WidthPlan, rule: str, batches, order: Blocks, importance: str,
             round_to: int, device: str = "cpu", budget_fraction: float | None = None) -> dict:
    """Rewrite `plan`'s MLP and heads widths by `rule` (no more kept parameters than the uniform plan);
    returns the report. `budget_fraction`: the plan is a budget's MLP cut, and the heads groups may be cut too
    (floors from that fraction)."""
    kinds = ("mlp",) if rule == "importance" else ("mlp", "heads")

    def free(g: WidthGroup) -> bool:
        return g.kind in kinds and g.resizable and order.index(g) is not None
    start = {n: w for n, w in plan.widths.items() if free(analysis.group(n))}
    floors = {n: _floor(analysis.group(n), 1 - m / analysis.group(n).size, round_to) for n, (m, _) in start.items()}
    if budget_fraction is not None and rule != "importance":   # whole heads groups the budget may cut
        for g in analysis.by_kind("heads"):
            if g.name not in plan.widths and free(g):
                start[g.name], floors[g.name] = (g.size, g.kv_heads), _floor(g, budget_fraction, round_to)
    if len(start) < 2:
        return {"rule": rule, "note": f"fewer than two {'/'.join(kinds)} groups in chaining blocks: nothing to spread"}
    plan.widths.update(start)
    names = list(start)
    groups, params = {n: analysis.group(n) for n in names}, dict(model.named_parameters())
    uniform = sum(rung_params(params, g, *plan.widths[n]) for n, g in groups.items())
    weights, forward_s = (fisher_weights(model, analysis, names, batches, [] if order.whole else order.modules)
                          if rule == "fisher" else (None, 0.0))
    scores, ladders, block_s = _measure(model, analysis, names, batches, order, importance, device, rule, floors,
                                        round_to, weights)
    if rule == "importance":
        cost = {n: rung_params(params, g, 1, None) for n, g in groups.items()}
        chosen = {n: (m, None) for n, m in _threshold(scores, groups, cost, floors, uniform, round_to).items()}
        errors = {}
    else:
        at = _greedy(ladders, uniform)
        chosen = {n: ladders[n].widths[i] for n, i in at.items()}
        errors = {n: ladders[n].error[i] for n, i in at.items()}
    for n, w in chosen.items():   # a group left whole leaves the plan
        plan.widths[n] = w
        if w[0] == groups[n].size:
            del plan.widths[n]
    report = {"rule": rule, "widths": {n: m for n, (m, _) in chosen.items()}, "forward_s": forward_s + block_s,
              "params_kept": sum(rung_params(params, groups[n], *w) for n, w in chosen.items()),
              "params_uniform": uniform}
    if any(groups[n].kind == "heads" for n in chosen):
        report["kv_heads"] = {n: kv for n, (_, kv) in chosen.items() if groups[n].kind == "heads"}
    if errors:
        report["relative_error" if rule == "curve" else "fisher_error"] = errors
    return report


def _floor(g: WidthGroup, f: float, round_to: int) -> int:
    """The narrowest width a group may be given: 1 − 2f of it (f its uniform fraction), at least one step."""
    step = round_to if g.kind == "mlp" else 1
    return max(step, int(round(g.size * max(0.0, 1 - 2 * f) / step)) * step)


def _greedy(ladders: dict[str, Ladder], budget: int) -> dict[str, int]:
    """Rung per group: from the floors, the affordable move to a higher rung that lowers the error most per
    parameter, until none is affordable. Spending only grows, so a move's best gain only falls: a popped entry
    whose gain still holds is the best move (lazy re-evaluation)."""
    at = {n: 0 for n in ladders}
    spent = sum(lad.params[0] for lad in ladders.values())

    def best(n):
        lad, i = ladders[n], at[n]
        moves = [((lad.error[i] - lad.error[j]) / (lad.params[j] - lad.params[i]), j)
                 for j in range(i + 1, len(lad.params)) if spent + lad.params[j] - lad.params[i] <= budget]
        return max(moves, default=None)
    heap = [(-m[0], n, m[1]) for n in ladders if (m := best(n)) is not None]
    heapq.heapify(heap)
    while heap:
        gain, n, j = heapq.heappop(heap)
        now = best(n)
        if now is None:
            continue
        if (-now[0], now[1]) != (gain, j):
            heapq.heappush(heap, (-now[0], n, now[1]))
            continue
        spent += ladders[n].params[j] - ladders[n].params[at[n]]
        at[n] = j
        if (m := best(n)) is not None:
            heapq.heappush(heap, (-m[0], n, m[1]))
    return at


def _threshold(scores, groups, cost, floor, budget, step) -> dict[str, int]:
    """FLAP-like: one threshold on per-group normalised importance, scanned from the most important unit."""
    ranked = []
    for n in groups:
        s = scores[n]
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
