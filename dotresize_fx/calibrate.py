"""Streaming calibration statistics at each group's observation point (DESIGN §5).

Float64 Gram G = XᵀX, column sums and token count per group, accumulated batch by batch through forward
pre-hooks: activations are never stored. Observation points:
  mlp / heads / channels  the input of the group's consumer (down_proj; o_proj, heads × head_dim; next conv)
  residual                the RMS-normalised stream entering every norm, pooled (what the consumers see)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .analyze import Analysis, WidthGroup
from .load import model_outputs


@dataclass
class Stats:
    gram: torch.Tensor
    sum: torch.Tensor
    count: int = 0

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x_i²] per channel (G_ii / N)."""
        return self.gram.diagonal() / max(self.count, 1)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.gram += x.T @ x
        self.sum += x.sum(0)
        self.count += x.shape[0]


@dataclass
class Calibration:
    stats: dict[str, Stats] = field(default_factory=dict)
    forward_s: float = 0.0
    tokens: int = 0


def collect_stats(model: torch.nn.Module, analysis: Analysis, batches, groups: list[str],
                  progress: bool = True) -> Calibration:
    """Run `batches` (tuples of model inputs) through `model` and accumulate Grams for `groups`."""
    cal = Calibration()
    hooks = []
    try:
        for name in groups:
            hooks += _install(model, analysis.group(name), cal)
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


def _install(model, group: WidthGroup, cal: Calibration) -> list:
    n_ch = group.size * group.unit
    stats = cal.stats[group.name] = Stats(torch.zeros(n_ch, n_ch, dtype=torch.float64),
                                          torch.zeros(n_ch, dtype=torch.float64))
    if group.kind == "residual":
        def on_norm(_module, args):
            x = args[0].to(torch.float64)
            stats.add(x / x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt())
        return [model.get_submodule(n).register_forward_pre_hook(on_norm) for n in group.norms]
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
