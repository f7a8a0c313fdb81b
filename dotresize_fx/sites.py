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

import torch

from .errors import DotResizeError
from .groups import Member, WidthGroup
from .maps import WidthMap, expand_units, is_selection, selection_matrix

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


def site_tensor(model, module: str, attr: str) -> torch.Tensor:
    return getattr(model.get_submodule(module), attr).detach().to(torch.float64)


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
        M = w.kv_merge if on_kv else w.merge
        keep = w.kv_keep if on_kv else w.keep
        if m.role == "producer" and m.attn == "qk" and keep is not None:
            A = expand_units(selection_matrix(M.shape[0], keep), step)
        elif m.role in ("producer", "passthrough"):
            A = expand_units(M, step)
        elif m.role == "consumer" and not per_head:
            if on_kv:
                raise DotResizeError(f"{group.name}: {m.param} reads the kv heads' width directly; a map for "
                                     "such a consumer is not supported: keep this group's width")
            A = expand_units(w.channel_unmerge(unit), inner).T
        else:
            continue
        sites[owner(model, m)].append((m.dim, m.offset, m.length or A.shape[0], A))


def transform(P: torch.Tensor, ops) -> torch.Tensor:
    """Apply [(dim, offset, length, A)] to P: the slice [offset:offset+length] of `dim` becomes slice·A."""
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
            pieces.append(_times(P.narrow(dim, off, length).movedim(dim, -1), A).movedim(-1, dim))
            pos = off + length
        if pos < P.shape[dim]:
            pieces.append(P.narrow(dim, pos, P.shape[dim] - pos))
        P = torch.cat(pieces, dim=dim)
    return P.contiguous()


def _times(chunk: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """chunk·A. A selection (one 1 per column) is an index instead of an n×m product: exact, and the product
    in float64 was half of a prune pass's time (835M: 5632×4224 maps on three 2048-wide weights per block)."""
    if is_selection(A):
        return chunk.index_select(-1, A.argmax(0).to(chunk.device))
    return chunk @ A.to(device=chunk.device, dtype=chunk.dtype)


def consumer_norms(model: torch.nn.Module, group: WidthGroup) -> torch.Tensor:
    """d_i = ‖W_c[:, i]‖ over all consumers that read the whole width, per channel of the group (n × unit);
    a flattened consumer's positions of one channel count as that channel's."""
    n_ch = group.size * group.unit
    total = torch.zeros(n_ch, dtype=torch.float64)
    for m in group.consumers():
        inner = group.inner(m)
        if (m.length or n_ch) != n_ch * inner:
            continue
        W = site_tensor(model, *owner(model, m)).cpu().movedim(m.dim, -1)
        total += W.reshape(-1, n_ch, inner).pow(2).sum((0, 2))
    return total.sqrt()
