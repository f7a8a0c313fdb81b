"""Rules for ops that index, split or join along a dim: split/chunk (fused qkv), glu, select (a class token),
unbind (timm's qkv), slice (rotary halves, logits_to_keep), cat. Registered into `rules.RULES`."""
from __future__ import annotations

from .groups import Constant
from .rules import aten, packet, rule


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split)
def split(w, n, out_unused) -> None:
    xd = w.dims(n.args[0])
    dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % len(xd)
    outs = w.tuple_dims(n)
    offset = 0
    for o in outs:
        for i, a in enumerate(o):
            if i != dim:
                w.s.join(a, xd[i])
        length = w.s.size[o[dim]]
        if w.s.static(xd[dim]) and length:
            w.s.add_segment(xd[dim], offset, length, o[dim])
            offset += length
    if packet(n.target) is aten.chunk or isinstance(n.args[1], int):  # equal parts: the input width decides
        w.equal_splits.append((n, [o[dim] for o in outs]))
    if packet(n.target) is not aten.chunk and isinstance(n.args[1], int) and outs and w.s.static(outs[0][dim]):
        w.constants.append((outs[0][dim], Constant(n.name, 1, -1, n.args[1], 1)))   # split(x.size(-1)): a literal
    elif isinstance(n.args[1], (list, tuple)):
        for i, (o, size) in enumerate(zip(outs, n.args[1])):
            if isinstance(size, int) and w.s.static(o[dim]):
                w.constants.append((o[dim], Constant(n.name, 1, i, size, 1)))


@rule(aten.glu)
def glu(w, n, out) -> None:
    """glu(x, dim) = a · σ(b) for the halves a ‖ b of x: one width in two segments (a gated MLP's fused
    gate ‖ up), each channel gated by its own partner, so merges and rotations do not commute with it."""
    xd = w.dims(n.args[0])
    dim = (n.args[1] if len(n.args) > 1 else -1) % len(xd)
    w.join_all([a for i, a in enumerate(xd) if i != dim], [a for i, a in enumerate(out) if i != dim])
    half = w.s.size[out[dim]]
    if w.s.static(xd[dim]) and half:
        w.s.add_segment(xd[dim], 0, half, out[dim])
        w.s.add_segment(xd[dim], half, half, out[dim])
    w.channelwise.append((out[dim], "glu", w.module(n)))


@rule(aten.select)
def select(w, n, out) -> None:
    """One index along a dim (a class token, the last position): the other dims pass; that dim is pinned if
    it carries a width."""
    xd = w.dims(n.args[0])
    dim = n.args[1] % len(xd)
    w.join_all([a for i, a in enumerate(xd) if i != dim], out)
    w.s.pin(xd[dim], f"one index selected along this width (aten.select in {w.module(n) or '<root>'})")
    w.unbound.append(xd[dim])   # as the outer factor of a fused qkv (nn.MultiheadAttention): q ‖ k ‖ v


@rule(aten.unbind)
def unbind(w, n, out_unused) -> None:
    """Unbinding a dim (timm's qkv.unbind(0) over the (3, heads, head_dim) factorisation of a fused qkv): each
    output is one slice, so that dim, as an outer factor of a width, is a set of segments (`classify`)."""
    xd = w.dims(n.args[0])
    dim = (n.args[1] if len(n.args) > 1 else 0) % len(xd)
    for o in w.tuple_dims(n):
        w.join_all([a for i, a in enumerate(xd) if i != dim], o)
    w.unbound.append(xd[dim])


@rule(aten.slice)
def slice_(w, n, out) -> None:
    xd = w.dims(n.args[0])
    dim = (n.args[1] if len(n.args) > 1 else 0) % len(xd)
    for i, a in enumerate(xd):
        if i != dim:
            w.s.join(a, out[i])
    if not w.s.static(xd[dim]):
        return
    size = w.s.size_of(xd[dim])
    start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
    end = n.args[3] if len(n.args) > 3 and n.args[3] is not None else size
    step = n.args[4] if len(n.args) > 4 else 1
    if not isinstance(start, int) or not isinstance(end, int):
        w.s.pin(xd[dim], f"slice with a symbolic bound (module {w.module(n)})")
        return
    start, end = max(0, start if start >= 0 else size + start), min(size, end if end >= 0 else size + end)
    if (start, end, step) == (0, size, 1):
        w.s.join(xd[dim], out[dim])
    elif step == 1:
        w.s.add_segment(xd[dim], start, end - start, out[dim])
    else:
        w.s.pin(xd[dim], f"strided slice (module {w.module(n)})")


@rule(aten.cat)
def cat(w, n, out) -> None:
    """Parts joined along a width (DenseNet's growing features, a U-Net's skip): that width is segmented into
    its parts, as a fused qkv is, so each part's group reaches the consumers through its own slice."""
    parts = n.args[0]
    dim = (n.args[1] if len(n.args) > 1 else 0) % len(out)
    for p in parts:
        for i, a in enumerate(w.dims(p)):
            if i != dim:
                w.s.join(a, out[i])
                w.use(p, i, "producer", n, "concat")   # a parameter concatenated in (a class token) writes rows
    if not all(w.s.static(w.dims(p)[dim]) for p in parts):    # a class token, a symbolic length
        reason = f"concatenated along this width (aten.cat in {w.module(n) or '<root>'}) with a part of size 1 " \
                 "or of symbolic size"
        for a in [out[dim], *(w.dims(p)[dim] for p in parts)]:
            w.s.pin(a, reason)
        return
    offset = 0
    for p in parts:
        size = w.s.size[w.dims(p)[dim]]
        w.use(p, dim, "producer", n, "concat")        # a parameter concatenated along the width writes its slice
        w.s.add_segment(out[dim], offset, size, w.dims(p)[dim])
        offset += size
