"""Rules for ops that index, split or join along a dim: split/chunk (fused qkv), glu, repeat_interleave (kv
heads), index (a bias table), gather (pooling), roll, pad, select (a class token), unbind (timm's qkv), slice (rotary halves,
logits_to_keep), cat. Registered into `rules.RULES`."""
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


@rule(aten.repeat_interleave)
def repeat_interleave(w, n, out) -> None:
    """Each slice repeated r times along a dim (kv heads shared by q heads, written by hand): the output width
    is (input × r), input outer; the literal r is recorded (q heads per kv head when heads change)."""
    repeats = n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats")
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
    xd = w.dims(n.args[0])
    if not isinstance(repeats, int) or dim is None:
        w.pin_node(n.args[0], f"repeat_interleave by a tensor or over a flattened input (module {w.module(n)})")
        return
    dim %= len(xd)
    w.join_all([a for i, a in enumerate(xd) if i != dim], [a for i, a in enumerate(out) if i != dim])
    rep = w.s.new(repeats)
    w.s.factor(out[dim], [xd[dim], rep])
    if repeats > 1:
        w.constants.append((rep, Constant(n.name, 1, -1, repeats, 1)))


@rule(aten.index)
def index(w, n, out) -> None:
    """x[idx] with one index tensor (a relative-position bias table gathered per token pair, as Swin's): the
    indexed dim becomes the index's dims, the others pass; a parameter's passing dims are read per value."""
    x, indices = n.args[0], list(n.args[1])
    xd = w.dims(x)
    given = [i for i, t in enumerate(indices) if t is not None]
    if len(given) != 1:
        w.pin_node(x, f"indexed by several tensors at once (aten.index in {w.module(n) or '<root>'})")
        return
    p, idx_dims = given[0], len(w.dims(indices[given[0]]))
    w.join_all(xd[:p], out[:p])
    w.join_all(xd[p + 1:], out[p + idx_dims:])
    w.s.pin(xd[p], f"gathered by an index tensor along this dim (aten.index in {w.module(n) or '<root>'})")
    for d in range(len(xd)):
        if d != p:
            w.use(x, d, "passthrough", n, "index")


@rule(aten.gather)
def gather(w, n, out) -> None:
    """x.gather(dim, idx) (last-token pooling: the index expanded over the width): dims the index spans whole
    pass; the gathered dim, and a dim the index covers only in part, are pinned."""
    xd = w.dims(n.args[0])
    dim = n.args[1] % len(xd)
    where = f"aten.gather in {w.module(n) or '<root>'}"
    for d, (a, b) in enumerate(zip(xd, out)):
        if d != dim and w.s.size_of(a) == w.s.size_of(b):
            w.s.join(a, b)
        else:
            w.s.pin(a, f"gathered along this dim ({where})")


@rule(aten.roll)
def roll(w, n, out) -> None:
    """A cyclic shift of positions (Swin's shifted windows): the other dims pass; a rolled width is pinned."""
    xd = w.dims(n.args[0])
    dims = n.args[2] if len(n.args) > 2 else n.kwargs.get("dims", [])
    dims = {d % len(xd) for d in ([dims] if isinstance(dims, int) else dims)} if dims else set(range(len(xd)))
    w.join_all(xd, out)
    for d in dims:
        w.s.pin(xd[d], f"rolled along this dim (aten.roll in {w.module(n) or '<root>'})")


@rule(aten.pad, aten.constant_pad_nd)
def pad(w, n, out) -> None:
    """Padding (Swin's windows, a conv's borders): pairs from the last dim backwards; a padded dim changes size
    and is pinned, the others pass."""
    xd, amounts = w.dims(n.args[0]), list(n.args[1])
    padded = {len(xd) - 1 - i // 2 for i, p in enumerate(amounts) if p != 0}
    for d, (a, b) in enumerate(zip(xd, out)):
        if d in padded:
            w.s.pin(a, f"padded along this dim (aten.{packet(n.target).__name__} in {w.module(n) or '<root>'})")
        else:
            w.s.join(a, b)


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
