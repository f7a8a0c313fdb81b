"""Least-squares refit of a group's consumers on real activations, streamed batch by batch (DESIGN §5, `ls`).

U = (h'ᵀh' + λI)⁻¹(h'ᵀh + λU₀), U₀ the map's own unmerge, λ picked on held-out rows (`fit.ridge_fit`).
h' is the consumer's input once the producers are merged (for an MLP, through the nonlinearity); h is, by
default, the original producers' output on the same (current) inputs, or the dense model's consumer input on
the dense model's own hidden states (`dense`), so that the fit also corrects what earlier resized blocks left.
For every batch the block runs once as it was and once with the trial map; only the Grams are kept.
"""
from __future__ import annotations

import copy
import time

import torch

from .blocks import BlockRunner
from .calibrate import CrossStats, observe_consumer
from .fit import ridge_fit
from .groups import Analysis, WidthGroup
from .maps import WidthMap
from .program import graphs
from .rewrite import apply


def refit_consumer(model, analysis: Analysis, g: WidthGroup, w: WidthMap, runner: BlockRunner, b: int, reg: float,
                   dense: tuple[torch.nn.Module, BlockRunner] | None = None) -> tuple[WidthMap, float]:
    """The map with its consumers refitted, and the relative λ chosen (∞: the map's own unmerge kept)."""
    block = runner.blocks.modules[b]
    before = _state(block)
    apply(model, analysis, {g.name: w}, inplace=True, finalize=False)
    trial = _state(block)
    _load(block, before)
    seen: list[torch.Tensor] = []
    hooks = [observe_consumer(model, g, seen.append)]
    if dense is not None:
        hooks.append(observe_consumer(dense[0], g, seen.append))
    cross, t0 = None, time.perf_counter()
    try:
        with torch.inference_mode():
            for i in range(len(runner)):
                if dense is not None:
                    dense[1].run_one(b, i)
                else:
                    runner.run_one(b, i)
                _load(block, trial)
                runner.run_one(b, i)
                _load(block, before)
                h, h_new = seen
                seen.clear()
                cross = cross or CrossStats.zeros(h_new.shape[-1], h.shape[-1])
                cross.add(h_new, h)
    finally:
        for hook in hooks:
            hook.remove()
        _load(block, before)
        runner.forward_s += time.perf_counter() - t0
    cross.reduce()
    U, lam = ridge_fit(cross.A, cross.B, reg, w.channel_unmerge(g.unit), cross.A_hold, cross.B_hold)
    w.set_channel_unmerge(U, g.unit)
    return w, lam


_OWNED = ("_parameters", "_buffers", "_modules")   # dicts a trial `apply` changes in place; hooks stay shared


def _state(block: torch.nn.Module):
    """Every module's attributes, with its parameter, buffer and submodule dicts copied, and the arguments of
    every node of a program's graphs (a trial patches their literals)."""
    modules = [(m, {k: copy.copy(v) if k in _OWNED else v for k, v in vars(m).items()}) for m in block.modules()]
    return modules, [(n, n.args) for graph in graphs(block) for n in graph.nodes]


def _load(block, state) -> None:
    modules, args = state
    for m, attrs in modules:
        vars(m).clear()
        vars(m).update({k: copy.copy(v) if k in _OWNED else v for k, v in attrs.items()})
    for node, a in args:
        node.args = a
