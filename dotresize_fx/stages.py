"""Per-layer residual bases calibrated on the resized prefix (`residual_maps=per_layer`), as SliceGPT computes
its bases (one per block here, where SliceGPT has one before attention and one before the MLP).

A per-layer map carries the stream of block l in the span of its own basis Q_l (n×m, orthonormal): the resized
model computes what the dense one computes with the stream projected, x ↦ x·Q_l·Q_lᵀ, where it enters block l
and wherever block l writes into it (its producers' outputs); the skip adapter Q_{l−1}ᵀQ_l is that projection
in m coordinates. So the blocks run in order on the projected stream: block l runs once as it is on what the
projected blocks before it produce, its map is computed from the stream entering, crossing (its norms'
inputs) and leaving it, and it then advances with its own projection in place. Bases from the dense model's
statistics describe a stream the resized model never carries, and without the leaving stream each block's
last write is projected onto a basis that never saw it (SmolLM2, PCA 576→432, README's reduced protocol: bases
from dense statistics 789.14 perplexity, on the prefix 138.04, one global basis 132.86). The stream after the
last block lies in the last block's span, so the last stage reuses the last block's map.

The simulation is exact (up to the norms' ε) when a map's readers rebuild the projection (M·U = Q·Qᵀ: PCA,
`unmerge=pinv`); for other unmerges only the stream's projection is simulated, not the readers' own
reconstruction.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .blocks import BlockRunner, Blocks, with_hidden, without_hidden, hidden_in
from .calibrate import Calibration, Stats, observing, stream_rows
from .errors import DotResizeError
from .groups import Analysis, WidthGroup
from .maps import WidthMap
from .residual import stage_basis, stage_of


def prefix_stages(model: torch.nn.Module, analysis: Analysis, g: WidthGroup, order: Blocks, batches,
                  stage_map: Callable[[Stats], WidthMap], device: str = "cpu") -> tuple[list[WidthMap], float]:
    """One map per block of `order` (each from `stage_map` on the statistics of the block's stream, taken on
    the projected prefix) plus the last stage's; and the seconds spent in block forwards."""
    writers = _writers(model, g, order)
    norms = [{n for n in g.norms if stage_of(n, order.prefix, len(order.modules)) == b}
             for b in range(len(order.modules))]
    if not all(norms):
        raise DotResizeError(f"per_layer residual maps: block {norms.index(set())} of {order.prefix} has no norm "
                             f"of {g.name} to calibrate its basis; use residual_maps=global")
    runner = BlockRunner(model, order, batches, device)
    stages: list[WidthMap] = []
    hooks: list = []
    try:
        for b, block in enumerate(order.modules):
            with runner.onloaded(b):
                cal, leaving = Calibration(), Stats.zeros(g.size * g.unit)
                with observing(model, analysis, [g.name], cal, per_norm=True):
                    runner.run(b, lambda _i, out: leaving.add(stream_rows(out, g.centred)))
                cal.reduce()
                stages.append(stage_map(sum((cal.norms[n] for n in norms[b]), leaving.reduce())))
                Q = stage_basis(stages[-1], g.centred)
                hooks += _project(block, writers[b], Q, g.centred)
                runner.advance(b)
    finally:
        for h in hooks:
            h.remove()
    return stages + [stages[-1]], runner.forward_s


def _writers(model, g: WidthGroup, order: Blocks) -> list[list[torch.nn.Module]]:
    """Per block, the modules whose outputs write into the stream (producers outside the blocks write before
    block 0, whose input is projected)."""
    n = g.size * g.unit
    if g.scales:
        raise DotResizeError(f"{g.name}: a layer scale on a branch sits between its producer and the stream, so "
                             "the resized prefix cannot be simulated; use residual_maps=global")
    out: list[list[torch.nn.Module]] = [[] for _ in order.modules]
    for mem in g.members:
        if mem.role != "producer" or not mem.module.startswith(order.prefix + "."):
            continue
        if mem.inside or (mem.length or n) != n or mem.offset:
            raise DotResizeError(f"{g.name}: {mem.param} writes into the stream from inside {mem.module}'s forward "
                                 "or through part of its output, where a hook cannot project it; use "
                                 "residual_maps=global")
        out[stage_of(mem.module, order.prefix, len(order.modules))].append(model.get_submodule(mem.module))
    return out


def _project(block: torch.nn.Module, writers: list[torch.nn.Module], Q: torch.Tensor, centred: bool) -> list:
    """Hooks that project block's input stream and its writers' outputs onto span(Q)."""
    cache: dict = {}

    def proj(x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in cache:
            cache[key] = Q.to(dtype=x.dtype, device=x.device)
        q = cache[key]
        if centred:
            x = x - x.mean(-1, keepdim=True)
        return (x @ q) @ q.T

    def on_entry(_module, args, kwargs):
        return with_hidden(without_hidden(args, kwargs), proj(hidden_in(args, kwargs)))
    hooks = [block.register_forward_pre_hook(on_entry, with_kwargs=True)]
    hooks += [w.register_forward_hook(lambda _m, _a, out: proj(out)) for w in writers]
    return hooks


@contextlib.contextmanager
def projected(model, g: WidthGroup, order: Blocks, stages: list[WidthMap]):
    """The dense model with every block's stream projected as the per-layer maps `stages` carry it: what the
    rewritten model computes, up to the norms' ε, for maps whose readers rebuild the projection."""
    writers = _writers(model, g, order)
    hooks = [h for b, block in enumerate(order.modules)
             for h in _project(block, writers[b], stage_basis(stages[b], g.centred), g.centred)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
