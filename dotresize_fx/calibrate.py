"""Streaming calibration statistics at each group's observation point (DESIGN §5).

Float64 Grams accumulated batch by batch through forward pre-hooks: activations are never stored. Observation
points:
  mlp / heads / channels  the input of the group's consumer (down_proj; o_proj, heads × head_dim; next conv)
  residual                the RMS-normalised stream entering every norm, pooled (what the consumers see;
                          centred first for centring norms)
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import dist
from .errors import DotResizeError
from .groups import Analysis, Member, WidthGroup
from .outputs import model_outputs
from .rules import packet

HOLDOUT_BLOCK, HOLDOUT_EVERY = 64, 5


def holdout_rows(n_rows: int) -> torch.Tensor:
    """Rows held out of least-squares fits: every 5th run of 64 consecutive tokens (neighbours correlate, so
    single held-out tokens would flatter an overfitted fit)."""
    return (torch.arange(n_rows) // HOLDOUT_BLOCK) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of an activation: float64 on the CPU; on an accelerator float32 there (summed in float64 by `_xty`)."""
    x = x.detach().reshape(-1, x.shape[-1])
    return x.to(torch.float64) if x.device.type == "cpu" else x.to(torch.float32)


def _xty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """xᵀy of one batch, as a float64 CPU tensor to add to a running sum."""
    return (x.T @ y).to(device="cpu", dtype=torch.float64)


class Stats:
    """G = XᵀX over all observed rows; `holdout` (kept where a least-squares fit reads the Gram: MLP, heads,
    channels) is the held-out rows' share of G (fits use G − holdout and judge themselves on holdout).

    Such stats keep the rows themselves while there are fewer of them than channels, and form G from them only
    when it is read: n² per row is then the whole cost of a calibration hook (835M: 5632-wide MLPs from 512
    rows), an importance needs only the diagonal, and a selection's fit is solved in the row space
    (`fit.ridge_rows`). From n rows on, G is accumulated as usual."""

    def __init__(self, n: int, holdout: bool = False):
        self.n, self.count, self.has_holdout = n, 0, holdout
        # kept rows: the n×n sums are allocated only once the rows are folded in (5632² float64 is 254 MB)
        self._gram = None if holdout else torch.zeros(n, n, dtype=torch.float64)
        self._holdout = None
        self.kept_rows: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if holdout else None

    @staticmethod
    def zeros(n: int, holdout: bool = False) -> "Stats":
        return Stats(n, holdout)

    @property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(X, held-out mask) over every observed row, or None once there are as many rows as channels."""
        if not self.kept_rows:
            return None
        return torch.cat([x for x, _ in self.kept_rows]), torch.cat([h for _, h in self.kept_rows])

    @property
    def gram(self) -> torch.Tensor:
        rows = self.rows
        return _plus_gram(self._gram, self.n, None if rows is None else rows[0])

    @property
    def holdout(self) -> torch.Tensor | None:
        if not self.has_holdout:
            return None
        rows = self.rows
        return _plus_gram(self._holdout, self.n, None if rows is None else rows[0][rows[1]])

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x_i²] per channel (G_ii / N)."""
        rows = self.rows
        diag = torch.zeros(self.n, dtype=torch.float64) if self._gram is None else self._gram.diagonal()
        return (diag + (0 if rows is None else rows[0].pow(2).sum(0))) / max(self.count, 1)

    def __add__(self, other: "Stats") -> "Stats":
        """The pooled statistics (as Grams: a sum need not keep rows)."""
        out = Stats(self.n)
        out._gram, out.count = self.gram + other.gram, self.count + other.count
        if self.has_holdout and other.has_holdout:
            out.has_holdout, out._holdout = True, self.holdout + other.holdout
        return out

    def reduce(self) -> "Stats":
        """Sum over the ranks of a data-parallel run (`dist`); a no-op in one process. Kept rows are gathered
        (every rank then holds all of them, and fits stay in the row space) while all ranks' rows together are
        fewer than the channels; otherwise the Gram is formed and summed."""
        if dist.world_size() == 1:
            return self
        total = dist.sum_count(self.count)
        if self.kept_rows is not None and total < self.n:
            self.kept_rows = [rows for rank in dist.gather(self.kept_rows) for rows in rank]
        else:
            self._form_gram()
            dist.sum_(self._gram, self._holdout)
        self.count = total
        return self

    def add(self, x: torch.Tensor) -> None:
        x = _rows(x)
        self.count += x.shape[0]
        held = holdout_rows(x.shape[0]).to(x.device)
        if self.kept_rows is not None:
            self.kept_rows.append((x.to(device="cpu", dtype=torch.float64), held.cpu()))
            if self.count >= self.n:
                self._form_gram()
            return
        self._gram += _xty(x, x)
        if self.has_holdout:
            self._holdout += _xty(x[held], x[held])

    def _form_gram(self) -> None:
        """Fold the kept rows into the Gram and stop keeping them."""
        if self.kept_rows is not None:
            self._gram, self._holdout = self.gram, self.holdout
            self.kept_rows = None


def _plus_gram(base: torch.Tensor | None, n: int, X: torch.Tensor | None) -> torch.Tensor:
    """base + XᵀX, either of them possibly absent (a zero n×n sum)."""
    if X is None:
        return torch.zeros(n, n, dtype=torch.float64) if base is None else base
    return X.T @ X if base is None else base + X.T @ X


@dataclass
class CrossStats:
    """A = H'ᵀH' and B = H'ᵀH over paired rows (h' the resized model's consumer input, h the reference's), and
    the held-out rows' shares of both: what a least-squares refit of the consumer reads (`fit.ridge_fit`)."""
    A: torch.Tensor
    B: torch.Tensor
    A_hold: torch.Tensor
    B_hold: torch.Tensor

    @staticmethod
    def zeros(n_new: int, n_ref: int) -> "CrossStats":
        def z(*shape):
            return torch.zeros(*shape, dtype=torch.float64)
        return CrossStats(z(n_new, n_new), z(n_new, n_ref), z(n_new, n_new), z(n_new, n_ref))

    def reduce(self) -> "CrossStats":
        dist.sum_(self.A, self.B, self.A_hold, self.B_hold)
        return self

    def add(self, h_new: torch.Tensor, h_ref: torch.Tensor) -> None:
        h2, h = _rows(h_new), _rows(h_ref).to(h_new.device)
        self.A += _xty(h2, h2)
        self.B += _xty(h2, h)
        hold = holdout_rows(h.shape[0]).to(h2.device)
        self.A_hold += _xty(h2[hold], h2[hold])
        self.B_hold += _xty(h2[hold], h[hold])


@dataclass
class Calibration:
    stats: dict[str, Stats] = field(default_factory=dict)
    norms: dict[str, Stats] = field(default_factory=dict)   # residual: each norm's own share of the pooled Gram
    forward_s: float = 0.0

    def reduce(self) -> "Calibration":
        for s in [*self.stats.values(), *self.norms.values()]:
            s.reduce()
        return self


def collect_stats(model: torch.nn.Module, analysis: Analysis, batches, groups: list[str],
                  progress: bool = True) -> Calibration:
    """Run `batches` (tuples of model inputs) through `model` and accumulate Grams for `groups`."""
    cal = Calibration()
    with observing(model, analysis, groups, cal):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False):
                model_outputs(model, batch)
        cal.forward_s = time.perf_counter() - t0
    return cal.reduce()


@contextlib.contextmanager
def observing(model, analysis: Analysis, groups: list[str], cal: Calibration, per_norm: bool = False):
    """Hooks that accumulate `groups`' statistics into `cal` while the model runs inside the block (`per_norm`:
    also one residual Gram per norm, for per-layer residual maps)."""
    hooks = []
    try:
        for name in groups:
            hooks += _install(model, analysis.group(name), cal, per_norm)
        yield cal
    finally:
        for h in hooks:
            h.remove()


def stream_rows(x: torch.Tensor, centred: bool) -> torch.Tensor:
    """A residual stream's rows as its statistics see them: float64, each RMS-normalised (as the norms that read
    it do), centred first where the rewrite centres the stream."""
    x = x.to(torch.float64)
    if centred:
        x = x - x.mean(-1, keepdim=True)
    return x / x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt()


def _install(model, group: WidthGroup, cal: Calibration, per_norm: bool = False) -> list:
    n_ch = group.size * group.unit
    if group.kind == "residual":
        stats = cal.stats[group.name] = Stats.zeros(n_ch)

        def on_norm(_module, args, name):
            x = stream_rows(args[0], group.centred)
            stats.add(x)
            if per_norm:
                cal.norms[name].add(x)
        hooks = []
        for name in group.norms:
            if per_norm:
                cal.norms[name] = Stats.zeros(n_ch)
            hooks.append(model.get_submodule(name).register_forward_pre_hook(
                lambda mod, args, name=name: on_norm(mod, args, name)))
        return hooks
    stats = cal.stats[group.name] = Stats.zeros(n_ch, holdout=True)
    return [observe_consumer(model, group, stats.add)]


def observation_point(group: WidthGroup) -> Member:
    """The consumer whose input is the group's observation point: one that reads the whole width (a flattened
    one, whose positions become rows, when no other does)."""
    n_ch = group.size * group.unit
    whole = [m for m in group.consumers() if (m.length or n_ch) == n_ch * group.inner(m)]
    if whole:
        return min(whole, key=group.inner)
    raise DotResizeError(f"{group.name} has no consumer that reads its whole width, so it has no observation "
                         "point: keep this width (leave its kind out of the targets)")


def observe_consumer(model, group: WidthGroup, sink):
    """A hook that hands `sink` the group's channels at its observation point, channels last (a conv's
    channels are dim 1, a flattened input's are outer to their positions: positions become rows)."""
    consumer = observation_point(group)
    channel_dim = 1 if consumer.via == "conv" else -1
    n_ch, inner = group.size * group.unit, group.inner(consumer)
    off, length = consumer.offset, consumer.length or n_ch

    def on_input(x):
        x = x.movedim(channel_dim, -1)[..., off:off + length]
        sink(x if inner == 1 else x.unflatten(-1, (n_ch, inner)).transpose(-1, -2))
    module = model.get_submodule(consumer.module)
    if isinstance(getattr(module, "graph", None), torch.fx.Graph):
        return _NodeObserver(module.graph, consumer.node, on_input)
    if consumer.inside:
        raise DotResizeError(f"{group.name}: {consumer.param} is read inside {consumer.module or 'the model'}'s "
                             "forward, not at its input, where a hook cannot observe it: keep this width")
    return module.register_forward_pre_hook(lambda _module, args: on_input(args[0]))


class _NodeObserver:
    """An observation inserted into a graph interpreter's graph, on the data input of one node: on the program
    path a consumer can sit inside a larger module's forward (nn.MultiheadAttention's out projection), where
    the module's own inputs are not the consumer's. `remove()` takes it out again, as a hook handle does."""

    def __init__(self, graph: torch.fx.Graph, node_name: str, fn):
        node = next(n for n in graph.nodes if n.name == node_name)
        data = node.args[1] if packet(node.target) is torch.ops.aten.addmm else node.args[0]
        self.graph = graph
        with graph.inserting_before(node):
            self.node = graph.call_function(fn, (data,))

    def remove(self) -> None:
        self.graph.erase_node(self.node)
