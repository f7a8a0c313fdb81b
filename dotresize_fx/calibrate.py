"""Streaming calibration statistics at each group's observation point (DESIGN §5).

Float64 Gram G = XᵀX, column sums and token count per group, accumulated batch by batch through forward
pre-hooks: activations are never stored. Observation points:
  mlp / heads / channels  the input of the group's consumer (down_proj; o_proj, heads × head_dim; next conv)
  residual                the RMS-normalised stream entering every norm, pooled (what the consumers see;
                          centred first for LayerNorm)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .analyze import Analysis, WidthGroup
from .load import model_outputs


HOLDOUT_BLOCK, HOLDOUT_EVERY = 64, 5


def holdout_rows(n_rows: int) -> torch.Tensor:
    """Rows held out of least-squares fits: every 5th run of 64 consecutive tokens (neighbours correlate, so
    single held-out tokens would flatter an overfitted fit)."""
    return (torch.arange(n_rows) // HOLDOUT_BLOCK) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


@dataclass
class Stats:
    """G = XᵀX over all observed rows; `holdout` (kept where a least-squares fit reads the Gram: MLP, heads,
    channels) is the held-out rows' share of G (fits use G − holdout and judge themselves on holdout)."""
    gram: torch.Tensor
    sum: torch.Tensor
    count: int = 0
    holdout: torch.Tensor | None = None

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x_i²] per channel (G_ii / N)."""
        return self.gram.diagonal() / max(self.count, 1)

    def __add__(self, other: "Stats") -> "Stats":
        hold = None if self.holdout is None or other.holdout is None else self.holdout + other.holdout
        return Stats(self.gram + other.gram, self.sum + other.sum, self.count + other.count, hold)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.gram += x.T @ x
        self.sum += x.sum(0)
        self.count += x.shape[0]
        if self.holdout is not None:
            h = x[holdout_rows(x.shape[0])]
            self.holdout += h.T @ h


@dataclass
class Calibration:
    stats: dict[str, Stats] = field(default_factory=dict)
    norms: dict[str, Stats] = field(default_factory=dict)   # residual: each norm's own share of the pooled Gram
    forward_s: float = 0.0
    tokens: int = 0


def collect_stats(model: torch.nn.Module, analysis: Analysis, batches, groups: list[str],
                  progress: bool = True, per_norm: bool = False) -> Calibration:
    """Run `batches` (tuples of model inputs) through `model` and accumulate Grams for `groups`
    (`per_norm`: also one residual Gram per norm, for per-layer residual maps)."""
    cal = Calibration()
    hooks = []
    try:
        for name in groups:
            hooks += _install(model, analysis.group(name), cal, per_norm)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False):
                model_outputs(model, batch)
                cal.tokens += batch[0].numel()
        cal.forward_s = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return cal


def _install(model, group: WidthGroup, cal: Calibration, per_norm: bool = False) -> list:
    n_ch = group.size * group.unit
    stats = cal.stats[group.name] = Stats(torch.zeros(n_ch, n_ch, dtype=torch.float64),
                                          torch.zeros(n_ch, dtype=torch.float64))
    if group.kind == "residual":
        def on_norm(module, args, name):
            x = args[0].to(torch.float64)
            if isinstance(module, torch.nn.LayerNorm):  # the rewrite centres LayerNorm streams: see them so
                x = x - x.mean(-1, keepdim=True)
            x = x / x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt()
            stats.add(x)
            if per_norm:
                cal.norms[name].add(x)
        hooks = []
        for name in group.norms:
            if per_norm:
                cal.norms[name] = Stats(torch.zeros_like(stats.gram), torch.zeros_like(stats.sum))
            hooks.append(model.get_submodule(name).register_forward_pre_hook(
                lambda mod, args, name=name: on_norm(mod, args, name)))
        return hooks
    stats.holdout = torch.zeros_like(stats.gram)
    consumer = _observed_consumer(group)
    channel_dim = 1 if consumer.op.startswith("conv") else -1
    off, length = consumer.offset, consumer.length or n_ch

    def on_input(_module, args):
        x = args[0].movedim(channel_dim, -1)
        stats.add(x[..., off:off + length])
    return [model.get_submodule(consumer.module).register_forward_pre_hook(on_input)]


def _observed_consumer(group: WidthGroup):
    n_ch = group.size * group.unit
    for m in group.consumers():
        if (m.length or n_ch) == n_ch:
            return m
    raise ValueError(f"{group.name} has no consumer that reads the whole width")


# ----------------------------------------------------------------------------------------------------------
# Layer by layer: the model's repeated blocks, and a runner that feeds calibration inputs through them.


class _Stop(Exception):
    """Raised by a hook to end a forward once the block inputs it needs are recorded."""


def block_list(model: torch.nn.Module, analysis: Analysis, batches) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList whose entries hold the most width groups, if its blocks chain (output l = input l+1).

    Models that add the residual outside their blocks (`x = x + block(x)`) do not chain; they are calibrated
    in one pass instead (None).
    """
    best, count = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) >= 2:
            n = sum(block_of(g, name) is not None for g in analysis.groups)
            if n > count:
                best, count = (name, mod), n
    if best is None or not _chains(model, best[1], batches[0]):
        return None
    return best


def block_of(group: WidthGroup, prefix: str) -> int | None:
    """Index of the block (in ModuleList `prefix`) that holds every member of the group, else None."""
    found = set()
    for m in group.members:
        rest = (m.module or m.param).removeprefix(prefix + ".") if prefix else m.module or m.param
        if rest == (m.module or m.param) and prefix:
            return None
        head = rest.split(".", 1)[0]
        if not head.isdigit():
            return None
        found.add(int(head))
    return found.pop() if len(found) == 1 else None


def _chains(model, blocks, batch) -> bool:
    seen = []

    def grab(_m, args, kwargs):
        seen.append((args, kwargs))
        if len(seen) == 2:
            raise _Stop
    hooks = [blocks[i].register_forward_pre_hook(grab, with_kwargs=True) for i in (0, 1)]
    try:
        with torch.inference_mode():
            model_outputs(model, batch)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if len(seen) < 2:
        return False
    with torch.inference_mode():
        out = _hidden(blocks[0](*seen[0][0], **seen[0][1]))
        nxt = _hidden_in(*seen[1])
    return isinstance(out, torch.Tensor) and out.shape == nxt.shape and torch.allclose(out, nxt, atol=1e-5)


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _hidden_in(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class BlockRunner:
    """Holds the inputs of one block for every calibration batch and moves them through the blocks."""

    def __init__(self, model: torch.nn.Module, blocks: torch.nn.ModuleList, batches):
        self.model, self.blocks = model, blocks
        self.inputs: list[tuple[tuple, dict]] = []
        self.forward_s = 0.0

        def grab(_m, args, kwargs):
            self.inputs.append((args, kwargs))
            raise _Stop
        hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for batch in batches:
                    try:
                        model_outputs(model, batch)
                    except _Stop:
                        pass
        finally:
            hook.remove()
        self.forward_s += time.perf_counter() - t0

    def run(self, b: int, on_output=None) -> None:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i, (args, kwargs) in enumerate(self.inputs):
                out = _hidden(self.blocks[b](*args, **kwargs))
                if on_output is not None:
                    on_output(i, out)
        self.forward_s += time.perf_counter() - t0

    def collect(self, analysis: Analysis, names: list[str], b: int) -> dict[str, Stats]:
        """Statistics of `names` (groups inside block b) on the current inputs of that block."""
        cal = Calibration()
        hooks = []
        try:
            for name in names:
                hooks += _install(self.model, analysis.group(name), cal)
            self.run(b)
        finally:
            for h in hooks:
                h.remove()
        return cal.stats

    def advance(self, b: int) -> None:
        """Replace the stored inputs by block b's outputs: the inputs of block b+1."""
        def store(i, out):
            args, kwargs = self.inputs[i]
            if args:
                self.inputs[i] = ((out, *args[1:]), kwargs)
            else:
                self.inputs[i] = (args, {**kwargs, "hidden_states": out})
        self.run(b, store)
