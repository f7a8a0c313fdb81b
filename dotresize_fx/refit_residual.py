"""Least-squares refit of the residual stream's readers on the resized model's own stream (`residual_refit`).

SliceGPT computes each block's basis on the already-sliced prefix, so that a block sees the stream the blocks
before it really produce. Here the readers take that role: once a residual map is applied, block by block and,
within a block, norm by norm in the order the forward reaches them, each norm's readers (the consumers of its
output) are refitted,

    U = argmin ‖X − Z·U‖² + λ‖U − U₀‖²,   W ← W_dense·Uᵀ,

Z the norm's output in the resized model on the resized prefix's stream (m wide), X the dense model's on its
own stream (n wide), U₀ the reader the map gave (from the readers' weights: W_now = W_dense·U₀ᵀ), λ picked on
held-out rows (`fit.ridge_fit`). Every block so corrects what the blocks before it lost. A norm after the
blocks (the final norm, read by the LM head) is refitted on the streams that leave the last block, when it
reads them directly (checked on the first batch).
"""
from __future__ import annotations

import time

import torch

from .blocks import BlockRunner, Blocks
from .calibrate import CrossStats
from .errors import DotResizeError
from .fit import ridge_fit
from .groups import WidthGroup
from .residual import stage_of
from .sites import owner, site_tensor, transform


def refit_readers(new: torch.nn.Module, dense: torch.nn.Module, g: WidthGroup, order: Blocks, batches,
                  reg: float, device: str = "cpu", offload=None) -> tuple[dict[str, float], float]:
    """Refit every norm's readers of residual group `g` in `new` (in place); the λ chosen per norm, and the
    seconds spent in block forwards."""
    if order.whole:
        raise DotResizeError("residual_refit needs blocks that chain (hidden = block(hidden)): this model's "
                             "blocks do not; leave it off")
    readers = {norm: [m for m in g.members if m.role == "consumer" and m.reads == norm] for norm in g.norms}
    readers = {norm: mems for norm, mems in readers.items() if mems}
    if isinstance(new, torch.fx.GraphModule):
        raise DotResizeError("residual_refit observes the norms as modules, which a captured program does not "
                             "have: leave it off for this model (it resizes through the program path)")
    runner = BlockRunner(new, order, batches, device, offload)
    dense_runner = BlockRunner(dense, Blocks(order.prefix, list(dense.get_submodule(order.prefix))), batches, device)
    n_blocks, lams, forward_s = len(order.modules), {}, 0.0
    for b in range(n_blocks):
        inside = [n for n in readers if stage_of(n, order.prefix, n_blocks) == b]
        with runner.onloaded(b), dense_runner.onloaded(b):
            for norm in _forward_order(runner, b, inside):
                lams[norm], seconds = _refit(new, dense, norm, readers[norm], reg, len(runner),
                                             lambda i: (runner.run_one(b, i), dense_runner.run_one(b, i)))
                forward_s += seconds
            runner.advance(b)
            dense_runner.advance(b)
    for norm in (n for n in readers if stage_of(n, order.prefix, n_blocks) == n_blocks):
        if _reads_last_block(new, norm, runner, batches[0]):   # norms outside the blocks run on the CPU
            lams[norm], seconds = _refit(new, dense, norm, readers[norm], reg, len(runner), lambda i: (
                new.get_submodule(norm)(runner.hidden(i).cpu()),
                dense.get_submodule(norm)(dense_runner.hidden(i).cpu())))
            forward_s += seconds
    return lams, forward_s + runner.forward_s + dense_runner.forward_s


def _refit(new, dense, norm: str, members, reg: float, n_batches: int, run) -> tuple[float, float]:
    """Fit U for one norm from paired outputs (each `run(i)` makes both norms fire) and rewrite its readers;
    the λ chosen and the seconds spent running."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(norm).register_forward_hook(
        lambda _m, _a, out, key=key: seen.__setitem__(key, out)) for key, model in (("z", new), ("x", dense))]
    cross, t0 = None, time.perf_counter()
    try:
        with torch.inference_mode():
            for i in range(n_batches):
                run(i)
                cross = cross or CrossStats.zeros(seen["z"].shape[-1], seen["x"].shape[-1])
                cross.add(seen["z"], seen["x"])
    finally:
        for h in hooks:
            h.remove()
    seconds = time.perf_counter() - t0
    cross.reduce()
    sites = [owner(dense, m) for m in members]
    dense_t = [site_tensor(dense, *s) for s in sites]
    others = [W.shape[m.dim] - (m.length or W.shape[m.dim]) for W, m in zip(dense_t, members)]
    prior = torch.linalg.lstsq(   # n × m: W_now = W_dense·prior
        torch.cat([_reader_rows(W, m, o) for W, m, o in zip(dense_t, members, others)]),
        torch.cat([_reader_rows(site_tensor(new, *s), m, o) for s, m, o in zip(sites, members, others)])).solution
    U, lam = ridge_fit(cross.A, cross.B, reg, prior.T, cross.A_hold, cross.B_hold)
    for (module, attr), m, W, o in zip(sites, members, dense_t, others):
        out = transform(W, [(m.dim, m.offset, W.shape[m.dim] - o, U.T)])
        mod = new.get_submodule(module)
        setattr(mod, attr, torch.nn.Parameter(out.to(getattr(mod, attr).dtype), requires_grad=False))
    return lam, seconds


def _reader_rows(W: torch.Tensor, m, others: int) -> torch.Tensor:
    """The reader's segment of the stream as rows (one per output coordinate), channels last; `others`: the
    width of the dim outside the segment, the same before and after the resize."""
    length = W.shape[m.dim] - others
    return W.narrow(m.dim, m.offset, length).movedim(m.dim, -1).reshape(-1, length)


def _forward_order(runner: BlockRunner, b: int, norms: list[str]) -> list[str]:
    """The norms of block b in the order its forward calls them (first batch)."""
    if len(norms) < 2:
        return norms
    called: list[str] = []
    hooks = [runner.model.get_submodule(n).register_forward_hook(
        lambda *_a, n=n: called.append(n) if n not in called else None) for n in norms]
    try:
        with torch.inference_mode():
            runner.run_one(b, 0)
    finally:
        for h in hooks:
            h.remove()
    return called + [n for n in norms if n not in called]


def _reads_last_block(model, norm: str, runner: BlockRunner, batch) -> bool:
    """Whether the norm's input is the last block's output (the runner's hidden states after every block)."""
    got = []
    hook = model.get_submodule(norm).register_forward_pre_hook(lambda _m, args: got.append(args[0]))
    try:
        with torch.inference_mode():
            model(*batch)
    finally:
        hook.remove()
    last = runner.hidden(0).cpu()
    return bool(got) and got[0].shape == last.shape and torch.allclose(got[0], last)
