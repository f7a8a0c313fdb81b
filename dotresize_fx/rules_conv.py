"""Rules for convolutional models: convolutions (transposed, depthwise), BatchNorm and GroupNorm, pooling,
upsampling, PReLU, and the positions these compute. Registered into `rules.RULES`."""
from __future__ import annotations

import torch

from .groups import Constant
from .rules import aten, packet, rule, val


_TRANSPOSED = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)


@rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, *_TRANSPOSED)
def conv(w, n, out) -> None:
    """A convolution's weight is (out, in/groups, k…), a transposed one's (in, out/groups, k…)."""
    x, wt = n.args[0], n.args[1]
    b = n.args[2] if len(n.args) > 2 else None
    op = packet(n.target)
    g_arg = 8 if op is aten.convolution else 6
    groups = n.args[g_arg] if len(n.args) > g_arg else 1
    transposed = op in _TRANSPOSED or (op is aten.convolution and bool(n.args[6]))
    reads, writes = (0, 1) if transposed else (1, 0)
    xd, wd = w.dims(x), w.dims(wt)
    w.s.join(out[0], xd[0])
    _positions(w, n, out)
    if groups == 1:
        w.s.join(xd[1], wd[reads])
        w.s.join(out[1], wd[writes])
        w.use(wt, reads, "consumer", n, "conv")
        w.use(wt, writes, "producer", n, "conv")
    elif val(wt).shape[1] == 1 and val(wt).shape[0] == groups:   # depthwise: each channel its own filter
        w.join_all([xd[1], out[1]], [wd[0], wd[0]])
        w.use(wt, 0, "passthrough", n, "depthwise")
        w.channelwise.append((out[1], "convolution (depthwise)", w.module(n)))
        w.constants.append((out[1], Constant(n.name, g_arg, -1, groups, 1)))   # groups = channels
        if isinstance(b, torch.fx.Node):
            w.s.join(w.dims(b)[0], out[1])
            w.use(b, 0, "passthrough", n, "depthwise")
        return
    else:
        reason = f"grouped convolution (groups={groups}, module {w.module(n)})"
        for a in (xd[1], out[1], wd[0]):
            w.s.pin(a, reason)
    if isinstance(b, torch.fx.Node):
        w.s.join(w.dims(b)[0], out[1])
        w.use(b, 0, "producer", n, "conv")


@rule(aten.group_norm)
def group_norm(w, n, out) -> None:
    """GroupNorm over channels: one group (statistics over every channel and position, as PoolFormer's) acts
    like a LayerNorm over channels; one group per channel normalises each channel alone; other group counts
    tie channels to their group and stay pinned."""
    xd = w.dims(n.args[0])
    w.join_all(xd, out)
    groups = n.args[1]
    for p in n.args[2:4]:
        if isinstance(p, torch.fx.Node):
            w.s.join(w.dims(p)[0], xd[1])
            w.use(p, 0, "passthrough", n, "norm")
    channels = w.s.size_of(xd[1])
    if groups == 1:
        w.reductions.append((xd[1], "group_norm", w.module(n)))
        w.centring.add(w.module(n))
    elif groups == channels:
        w.channelwise.append((xd[1], "group_norm (one group per channel)", w.module(n)))
        w.constants.append((xd[1], Constant(n.name, 1, -1, groups, 1)))
    else:
        w.s.pin(xd[1], f"GroupNorm with {groups} groups of {channels} channels (module {w.module(n)})")


@rule(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional)
def batch_norm(w, n, out) -> None:
    xd = w.dims(n.args[0])
    first = out if out else w.tuple_dims(n)[0]
    w.join_all(xd, first)
    for p in n.args[1:5]:
        if isinstance(p, torch.fx.Node):
            w.s.join(w.dims(p)[0], xd[1])
            w.use(p, 0, "passthrough", n, "norm")


@rule(aten.prelu, aten._prelu_kernel)
def prelu(w, n, out) -> None:
    """PReLU's slope is one per channel (dim 1), or one for all."""
    xd, slope = w.dims(n.args[0]), n.args[1]
    w.join_all(xd, out)
    if len(xd) > 1 and w.dims(slope) and w.s.static(w.dims(slope)[0]):
        w.s.join(w.dims(slope)[0], xd[1])
        w.use(slope, 0, "passthrough", n, "pointwise")
    w.channelwise.append((xd[1] if len(xd) > 1 else xd[0], "prelu", w.module(n)))


@rule(aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten.upsample_bilinear2d,
      aten.upsample_bicubic2d, aten.upsample_linear1d, aten.upsample_trilinear3d, aten._upsample_nearest_exact2d)
def upsample(w, n, out) -> None:
    """Resampling positions (nn.Upsample, F.interpolate): batch and channels pass, each channel alone."""
    w.join_all(w.dims(n.args[0])[:2], out[:2])
    _positions(w, n, out)


def _positions(w, n, out) -> None:
    """The spatial dims a convolution or a pooling computes are positions, not widths: no parameter writes them,
    so a token-mixing Linear over flattened patches (MLP-Mixer) cannot permute or cut them."""
    for a in out[2:]:
        w.s.pin(a, f"positions computed by aten.{packet(n.target).__name__} (module {w.module(n) or '<root>'})")


@rule(aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.avg_pool2d, aten.max_pool2d,
      aten.max_pool2d_with_indices, aten.adaptive_avg_pool1d, aten.avg_pool1d, aten.max_pool1d)
def pool(w, n, out) -> None:
    """Pooling over positions: batch and channels pass through; every channel is pooled alone."""
    xd = w.dims(n.args[0])
    first = out if out else w.tuple_dims(n)[0]
    w.join_all(xd[:2], first[:2])
    _positions(w, n, first)
    if packet(n.target) not in (aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.avg_pool2d,
                                aten.adaptive_avg_pool1d, aten.avg_pool1d):
        w.channelwise.append((first[1], packet(n.target).__name__, w.module(n)))
