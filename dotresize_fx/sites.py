"""Parameter sites: where a WidthMap's matrices land, and how a slice of a parameter dim is transformed.

Row-vector convention: a consumer computes x·W with W ∈ R^{n×out}; a group of width n becomes m.
  producers    W_p ← W_p·M         (biases b ← b·M)
  consumers    W_c ← U·W_c
  passthrough  g ← g·M              (exact for selections and permutations: M's columns sum to 1)
A site is (module FQN, attribute); its ops are [(dim, offset, length, A)]: slice [offset:offset+length] of
`dim` becomes slice·A.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from .errors import DotResizeError
from .groups import Member, WidthGroup
from .maps import Fill, WidthMap, expand_units, selected_rows

Sites = dict[tuple[str, str], list]


def owner(model: torch.nn.Module, m: Member) -> tuple[str, str]:
    """The (module, attribute) the member's op reads: for a tied weight, the alias owned by that module."""
    module, _, attr = m.param.rpartition(".")
    if m.module and m.module != module:
        try:
            mod = model.get_submodule(m.module)
            if isinstance(getattr(mod, attr, None), torch.nn.Parameter):
                return m.module, attr
        except AttributeError:
            pass
    return module, attr


def site_tensor(model, module: str, attr: str, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """The parameter, in `dtype` (None: `working_dtype` of its own)."""
    t = getattr(model.get_submodule(module), attr).detach()
    return t.to(working_dtype(t.dtype) if dtype is None else dtype)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a map is applied in: float64 for float64 weights (exactness checks), float32 for lower ones
    (the maps themselves are float64 and cast once; a 2048×5632 product in float64 is twice the time)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_ops(model, group: WidthGroup, w: WidthMap, sites: Sites) -> None:
    """Producers and passthroughs take M, consumers U; on a GQA group, kv-width members take the kv map, and
    the q/k producers of merged heads keep their target's rows (the attention pattern)."""
    unit = group.unit
    kv = group.kv_heads or group.size
    for m in group.members:
        inner = group.inner(m)
        length = m.length or group.size * unit
        # one value per head (a relative-position bias table's column), not one per channel of every head
        per_head = group.kind == "heads" and unit > 1 and length in (group.size, kv)
        step = 1 if per_head else unit * inner
        units = length // step
        on_kv = group.kind == "heads" and units == kv and kv != group.size
        if m.role == "producer" and m.attn == "qk" and (w.kv_keep if on_kv else w.keep) is not None:
            A = Index(expand_index(w.kv_keep if on_kv else w.keep, step))
        elif m.role in ("producer", "passthrough"):
            A = Index(expand_index(w.keep, step)) if w.is_selection and not on_kv else \
                expand_units(w.kv_merge if on_kv else w.merge, step)
        elif m.role == "consumer" and not per_head:
            if on_kv:
                raise DotResizeError(f"{group.name}: {m.param} reads the kv heads' width directly; a map for "
                                     "such a consumer is not supported: keep this group's width")
            A = _consumer_map(w, unit, inner)
        else:
            continue
        sites[owner(model, m)].append((m.dim, m.offset, m.length or (kv if on_kv else group.size) * step, A))


def _consumer_map(w: WidthMap, unit: int, inner: int):
    """Uᵀ on a consumer's input channels, structured where the map is a selection (its fill)."""
    if w.fill is not None and inner == 1:
        return IndexFill(w.fill)
    if w.is_selection and w.unmerge_channels is None and w.fill is None:
        return Index(expand_index(w.keep, unit * inner))
    return expand_units(w.channel_unmerge(unit), inner).T


@dataclass(frozen=True)
class Index:
    """A column selection as an op: P ← P[..., idx] along the dim (exact, and no n×m product)."""
    idx: torch.Tensor

    def __call__(self, P: torch.Tensor, dim: int) -> torch.Tensor:
        return take(P, dim, self.idx)


@dataclass(frozen=True)
class IndexFill:
    """Uᵀ of a `Fill` as an op: P ← P[kept] + P[removed]·Rᵀ along the dim (the kept channels pass through)."""
    fill: Fill

    def __call__(self, P: torch.Tensor, dim: int) -> torch.Tensor:
        f = self.fill
        moved = P.movedim(dim, -1)
        out = take(moved, -1, f.kept)
        out += f.fill_removed(take(moved, -1, f.removed))
        return out.movedim(-1, dim)


def take(P: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """P's entries at `idx` along `dim`, by advanced indexing: half the time of `index_select` on a CPU
    for bfloat16 weights and for column gathers."""
    return P[(slice(None),) * (dim % P.dim()) + (idx.to(P.device),)]


def expand_index(idx: torch.Tensor, step: int) -> torch.Tensor:
    """Unit indices as the indices of their `step` channels each."""
    return idx if step == 1 else (idx[:, None] * step + torch.arange(step)).reshape(-1)


def transform(P: torch.Tensor, ops) -> torch.Tensor:
    """Apply [(dim, offset, length, A)] to P: the slice [offset:offset+length] of `dim` becomes slice·A
    (A a matrix, or a structured `Index` / `IndexFill`)."""
    by_dim = defaultdict(list)
    for dim, off, length, A in ops:
        by_dim[dim].append((off, length, A))
    for dim, segs in by_dim.items():
        pieces, pos = [], 0
        for off, length, A in sorted(segs, key=lambda s: s[0]):
            if off < pos:
                raise DotResizeError(f"overlapping segments on one parameter dim ({off} < {pos})")
            if off > pos:
                pieces.append(P.narrow(dim, pos, off - pos))
            pieces.append(_times(P.narrow(dim, off, length), dim, A))
            pos = off + length
        if pos < P.shape[dim]:
            pieces.append(P.narrow(dim, pos, P.shape[dim] - pos))
        P = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)   # one piece: no copy
    return P.contiguous()


def _times(chunk: torch.Tensor, dim: int, A) -> torch.Tensor:
    """chunk·A along `dim`; a dense selection matrix becomes an index too."""
    if not isinstance(A, torch.Tensor):
        return A(chunk, dim)
    kept = selected_rows(A)
    if kept is not None:
        return Index(kept)(chunk, dim)
    return (chunk.movedim(dim, -1) @ A.to(device=chunk.device, dtype=chunk.dtype)).movedim(-1, dim)


def consumer_norms(model: torch.nn.Module, group: WidthGroup) -> torch.Tensor:
    """d_i = ‖W_c[:, i]‖ over all consumers that read the whole width, per channel of the group (n × unit);
    a flattened consumer's positions of one channel count as that channel's."""
    n_ch = group.size * group.unit
    total = torch.zeros(n_ch, dtype=torch.float64)
    for m in group.consumers():
        inner = group.inner(m)
        if (m.length or n_ch) != n_ch * inner:
            continue
        module, attr = owner(model, m)
        W = getattr(model.get_submodule(module), attr).detach().movedim(m.dim, -1)
        dtype = working_dtype(W.dtype)
        for rows in W.reshape(-1, n_ch, inner).split(256):
            # a copy per chunk squared in place: no weight-sized buffer, and float32 sums for bfloat16
            total += rows.to("cpu", dtype, copy=True).square_().sum((0, 2)).double()
    return total.sqrt()
