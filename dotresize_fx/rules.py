"""Per-op rules of the dependency analysis (DESIGN §4): one small function per kind of ATen op.

`RULES` maps an ATen op overload packet to `rule(walker, node, out)`, where `out` holds the atoms of the node's
output dims. A rule unions the channel spaces the op ties together and records which parameter dims it reads as
producer, consumer or passthrough. Pointwise ops (tagged by ATen) share one rule; an op with no rule pins every
width it touches (see `Walker.rule`).
"""
from __future__ import annotations

import math

import torch

from .groups import Constant

aten = torch.ops.aten

SAME_SHAPE = {aten.clone, aten.contiguous, aten._to_copy, aten.to, aten.alias, aten.detach, aten.dropout,
              aten.native_dropout, aten.feature_dropout, aten.lift_fresh_copy, aten.type_as}
RESHAPE = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.view_copy,
           aten.squeeze, aten.unsqueeze}
REDUCE = {aten.mean, aten.sum, aten.var, aten.std, aten.amax, aten.amin, aten.var_mean, aten.norm}
ADDITIVE = {aten.add, aten.add_, aten.sub, aten.sub_, aten.neg, aten.rsub}
SCALING = {aten.mul, aten.mul_, aten.div, aten.div_}
# ops that make new tensors or read shapes: they touch no existing width
IGNORE = {aten.sym_size, aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
          aten.arange, aten.full, aten.zeros, aten.ones, aten.empty, aten.scalar_tensor, aten.new_ones,
          aten.new_zeros, aten.new_full, aten.new_empty, aten.zeros_like, aten.ones_like, aten.full_like,
          aten.empty_like, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset}

RULES: dict = {}


def rule(*ops):
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def packet(target):
    return getattr(target, "overloadpacket", target)


def val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _varies(node, i: int, ndim: int) -> bool:
    """Whether `node`, broadcast to `ndim` dims, takes different values along dim `i`."""
    shape = val(node).shape
    j = i - (ndim - len(shape))
    return j >= 0 and shape[j] != 1


def pointwise(w, n, out) -> None:
    operands = [a for a in n.all_input_nodes if isinstance(val(a), torch.Tensor)]
    w.broadcast(out, operands)
    op = packet(n.target)
    adding = op in (aten.add, aten.add_) and len(operands) > 1
    for o in operands:
        # a parameter added into an activation (a position table, a bias) writes its values: a producer
        role = "producer" if adding and tuple(val(o).shape) != tuple(val(n).shape) else "passthrough"
        for d in range(len(w.dims(o))):
            w.use(o, d, role, n, "pointwise")
    if op in ADDITIVE:
        return
    if _layer_scale(w, n, operands):
        return   # folded into the branch's producer before a residual map (`residual.residual_ops`)
    for i, atom in enumerate(out):
        varying = [o for o in operands if _varies(o, i, len(out))]
        # x·s and x/s with s constant along this dim commute with any linear map of it; nothing else does
        if varying and not (op in SCALING and varying == [n.args[0]]):
            w.channelwise.append((atom, op.__name__, w.module(n)))


_PRODUCERS = {aten.linear, aten.addmm, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution}


def _layer_scale(w, n, operands):
    """Layer scale: a branch's output times a parameter vector, `γ · fc2(h)`. It commutes with a map of the
    stream once γ is folded into the producer's rows, so it is recorded (γ, producer module), not channel-wise."""
    if packet(n.target) not in (aten.mul, aten.mul_) or len(operands) != 2:
        return False
    for gamma, x in (operands, operands[::-1]):
        shape = val(gamma).shape
        if gamma.name not in w.origin or sum(d != 1 for d in shape) != 1:  # one value per channel
            continue
        while packet(x.target) in SAME_SHAPE and len(x.users) == 1:
            x = x.args[0]
        if packet(x.target) in _PRODUCERS and len(x.users) == 1:
            w.layer_scales.append((w.origin[gamma.name][0], w.module(x)))
            return True
    return False


@rule(*SAME_SHAPE)
def same_shape(w, n, out) -> None:
    src = n.args[0]
    w.join_all(w.dims(src), out)
    if src.name in w.origin:
        w.origin[n.name] = w.origin[src.name]


@rule(aten.t, aten.transpose, aten.permute)
def permute(w, n, out) -> None:
    src = n.args[0]
    sd = w.dims(src)
    op, nd = packet(n.target), len(sd)
    if op is aten.t:
        order = list(range(nd))[::-1]
    elif op is aten.transpose:
        order = list(range(nd))
        i, j = n.args[1] % nd, n.args[2] % nd
        order[i], order[j] = order[j], order[i]
    else:
        order = [d % nd for d in n.args[1]]
    for i, d in enumerate(order):
        w.s.join(out[i], sd[d])
    if src.name in w.origin:
        fqn, pd = w.origin[src.name]
        w.origin[n.name] = (fqn, [pd[d] for d in order])


@rule(*RESHAPE)
def reshape(w, n, out) -> None:
    src = n.args[0]
    sd = w.dims(src)
    in_shape, out_shape = val(src).shape, val(n).shape
    groups = align_shapes(list(in_shape), list(out_shape))
    if groups is None:
        reason = f"reshape {tuple(in_shape)} -> {tuple(out_shape)} mixes widths (module {w.module(n)})"
        w.pin_node(src, reason)
        w.pin_node(n, reason)
        return
    for in_dims, out_dims in groups:
        ins = [sd[i] for i in in_dims if w.s.static(sd[i])]
        outs = [out[j] for j in out_dims if w.s.static(out[j])]
        if _size(w, ins) != _size(w, outs):
            if not _fold(w, n, in_dims, out_dims, ins, outs):
                for a in ins + outs:
                    w.s.pin(a, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} folds a width into a batch or "
                               f"sequence dim in a way the analysis cannot follow (module {w.module(n)})")
        elif len(ins) == 1 and len(outs) == 1:
            w.s.join(ins[0], outs[0])
        elif len(ins) == 1 and outs:
            w.s.factor(ins[0], outs)
        elif len(outs) == 1 and ins:
            w.s.factor(outs[0], ins)
        elif ins or outs:
            reason = f"reshape regroups several widths at once (module {w.module(n)})"
            for a in ins + outs:
                w.s.pin(a, reason)
    _record_constants(w, n, out)


def _fold(w, n, in_dims, out_dims, ins, outs) -> bool:
    """nn.MultiheadAttention folds its heads into the batch, (B, H·D) → (H·B, D), and unfolds them after
    attention, (H·B, …) → (B, H, …). A fold factors the width as (H, D) and remembers H under the symbolic size
    it went into (keyed by that size's expression: the latest fold of "4*s24" is the one an unfold undoes);
    the size H·B given to the fold is recorded as a constant of H's group."""
    shape_in, shape_out = val(n.args[0]).shape, val(n).shape
    sym_in = [i for i in in_dims if not isinstance(shape_in[i], int)]
    sym_out = [j for j in out_dims if not isinstance(shape_out[j], int)]
    if len(ins) == 1 and len(sym_out) == 1 and len(sym_in) == 1 and _size(w, ins) % max(_size(w, outs), 1) == 0:
        folded = w.s.new(_size(w, ins) // _size(w, outs))
        w.s.factor(ins[0], [folded, *outs])
        w.folded[str(shape_out[sym_out[0]])] = folded
        sizes = n.args[1] if len(n.args) > 1 else None
        if packet(n.target) in (aten.view, aten.reshape, aten._unsafe_view) and isinstance(sizes, (list, tuple)) \
                and isinstance(sizes[sym_out[0]], torch.fx.Node):
            k = w.s.size[folded]
            w.constants.append((folded, Constant(n.name, 1, sym_out[0], k, 1, symbolic=True)))
        return True
    if not ins and len(outs) == 1 and len(sym_in) == 1 and str(shape_in[sym_in[0]]) in w.folded:
        w.s.join(outs[0], w.folded[str(shape_in[sym_in[0]])])
        return True
    return False


def _size(w, atoms: list[int]) -> int:
    return math.prod(w.s.size[a] for a in atoms)


def _record_constants(w, n, out) -> None:
    """The literal sizes of a view/reshape/expand (`unflatten(x, dim, sizes)`: sizes of dims dim, dim+1, …)."""
    arg, first = 1, 0
    if packet(n.target) is aten.unflatten:
        arg, first = 2, n.args[1] % len(w.dims(n.args[0]))
    if len(n.args) > arg and isinstance(n.args[arg], (list, tuple)):
        for i, v in enumerate(n.args[arg]):
            d = first + i
            if isinstance(v, int) and v > 1 and d < len(out) and w.s.size[out[d]] == v:
                w.constants.append((out[d], Constant(n.name, arg, i, v, 1)))


@rule(aten.expand)
def expand(w, n, out) -> None:
    src = n.args[0]
    sd = w.dims(src)
    for i in range(1, len(sd) + 1):
        w.s.join(sd[-i], out[-i])
    if src.name in w.origin:   # a broadcast parameter (a class token expanded over the batch) is still it
        fqn, pd = w.origin[src.name]
        w.origin[n.name] = (fqn, [None] * (len(out) - len(pd)) + pd)
    _record_constants(w, n, out)


@rule(aten.linear)
def linear(w, n, out) -> None:
    x, wt = n.args[0], n.args[1]
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    xd, wd = w.dims(x), w.dims(wt)
    w.s.join(xd[-1], wd[1])
    w.s.join(out[-1], wd[0])
    w.join_all(xd[:-1], out[:-1])
    w.use(wt, 1, "consumer", n, "linear")
    w.use(wt, 0, "producer", n, "linear")
    if isinstance(b, torch.fx.Node):
        w.s.join(w.dims(b)[0], out[-1])
        w.use(b, 0, "producer", n, "linear")


@rule(aten.mm, aten.bmm, aten.matmul)
def matmul(w, n, out, a=None, b=None) -> None:
    a = a if a is not None else n.args[0]
    b = b if b is not None else n.args[1]
    ad, bd = w.dims(a), w.dims(b)
    if len(ad) < 2 or len(bd) < 2:
        w.pin_node(n, f"matmul with a vector operand (module {w.module(n)})")
        return
    w.s.join(ad[-1], bd[-2])
    w.s.join(out[-2], ad[-2])
    w.s.join(out[-1], bd[-1])
    for i in range(3, len(out) + 1):
        for od in (ad, bd):
            if len(od) >= i:
                w.s.join(od[-i], out[-i])
    for opnd, contracted, free in ((a, -1, -2), (b, -2, -1)):
        w.use(opnd, contracted, "consumer", n, "linear")
        w.use(opnd, free, "producer", n, "linear")
    if a.name not in w.origin and b.name not in w.origin and len(out) >= 3:
        # activation × activation with batch dims: attention; its static batch dims are heads
        w.heads.append((out[-3], ad[-1]))


@rule(aten.addmm)
def addmm(w, n, out) -> None:
    matmul(w, n, out, n.args[1], n.args[2])
    bias = n.args[0]
    bd = w.dims(bias)
    if bd:
        w.s.join(bd[-1], out[-1])
        w.use(bias, len(bd) - 1, "producer", n, "linear")


@rule(aten.embedding)
def embedding(w, n, out) -> None:
    wt, idx = n.args[0], n.args[1]
    wd = w.dims(wt)
    w.s.join(out[-1], wd[1])
    w.join_all(w.dims(idx), out[:-1])
    w.use(wt, 1, "producer", n, "embedding")
    w.use(wt, 0, "index", n, "embedding")
    w.s.pin(wd[0], "indexed by token ids (a vocabulary or position table)")


@rule(aten.layer_norm, aten.rms_norm)
def layer_norm(w, n, out) -> None:
    x = n.args[0]
    w.join_all(w.dims(x), out)
    centring = packet(n.target) is aten.layer_norm
    params = [a for a in n.args[2:4 if centring else 3] if isinstance(a, torch.fx.Node)]
    for p in params:
        w.s.join(w.dims(p)[-1], out[-1])
        w.use(p, len(w.dims(p)) - 1, "passthrough", n, "norm")
    w.reductions.append((out[-1], packet(n.target).__name__, w.module(n)))
    if centring:
        w.centring.add(w.module(n))
    shape = n.args[1]   # normalized_shape: the trailing widths as literals
    for i, v in enumerate(shape):
        d = len(out) - len(shape) + i
        if isinstance(v, int) and v > 1 and w.s.size[out[d]] == v:
            w.constants.append((out[d], Constant(n.name, 1, i, v, 1)))


@rule(*REDUCE)
def reduce(w, n, out) -> None:
    xd = w.dims(n.args[0])
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if dims is None:
        dims = list(range(len(xd)))
    dims = {d % len(xd) for d in ([dims] if isinstance(dims, int) else dims)}
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    if keep:
        for i, a in enumerate(xd):
            if i not in dims:
                w.s.join(a, out[i])
    else:
        w.join_all([a for i, a in enumerate(xd) if i not in dims], out)
    for d in dims:
        w.reductions.append((xd[d], packet(n.target).__name__, w.module(n)))


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def softmax(w, n, out) -> None:
    xd = w.dims(n.args[0])
    w.join_all(xd, out)
    w.reductions.append((xd[n.args[1] % len(xd)], packet(n.target).__name__, w.module(n)))


@rule(aten.hardswish, aten.log_sigmoid, aten.where)
def untagged_pointwise(w, n, out) -> None:
    """Elementwise ops that ATen does not tag pointwise (two activations, `where`)."""
    pointwise(w, n, out)


@rule(aten.scaled_dot_product_attention)
def sdpa(w, n, out) -> None:
    q, k, v = n.args[:3]
    qd, kd, vd = w.dims(q), w.dims(k), w.dims(v)
    w.s.join(qd[-1], kd[-1])
    w.s.join(out[-1], vd[-1])
    w.s.join(out[-3], qd[-3])
    w.s.join(kd[-3], vd[-3])
    sq, sk = w.s.size_of(qd[-3]), w.s.size_of(kd[-3])
    if sq == sk:
        w.s.join(qd[-3], kd[-3])
    elif sq and sk and sq % sk == 0:
        w.s.factor(qd[-3], [kd[-3], w.s.new(sq // sk)])
    w.heads.append((qd[-3], qd[-1]))
    w.head_dims += [qd[-1], out[-1]]
    for i in range(4, len(out) + 1):
        for d in (qd, kd, vd):
            w.s.join(d[-i], out[-i])
    mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
    if isinstance(mask, torch.fx.Node):   # broadcast over the scores (…, heads, queries, keys): a per-head bias
        scores = [*qd[:-1], kd[-2]]         # (T5's relative positions) follows the heads
        for a, b in zip(reversed(w.dims(mask)), reversed(scores)):
            w.s.join(a, b)


def align_shapes(a: list, b: list) -> list[tuple[list[int], list[int]]] | None:
    """Group dims of a reshape: [(in dims, out dims)] with equal products; size-1 dims are left out."""
    def value(x):
        return x if isinstance(x, int) else x.node.hint if x.node.hint is not None else None
    ia = [i for i, x in enumerate(a) if value(x) != 1]
    ib = [j for j, x in enumerate(b) if value(x) != 1]
    groups, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        gi, gj = [ia[i]], [ib[j]]
        pa, pb = value(a[ia[i]]), value(b[ib[j]])
        if pa is None or pb is None:
            if (pa is None) != (pb is None):
                return None
            groups.append((gi, gj))
            i, j = i + 1, j + 1
            continue
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia) and value(a[ia[i]]) is not None:
                pa *= value(a[ia[i]])
                gi.append(ia[i])
                i += 1
            elif pb < pa and j < len(ib) and value(b[ib[j]]) is not None:
                pb *= value(b[ib[j]])
                gj.append(ib[j])
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups if i == len(ia) and j == len(ib) else None


from . import rules_conv, rules_einsum, rules_index  # noqa: E402,F401  (register their rules in RULES)
