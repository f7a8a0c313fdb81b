"""BatchNorm folding (`fold_bn=1`): each eval-mode BatchNorm's scale moves into the convolution before it.

BN(y) = (y − μ)·g/√(σ² + ε) + b. With s = g/√(σ² + ε), the conv's filters become W·s (per output channel) and
the BatchNorm is left a pure shift, y' − (s·μ − b) (μ' = s·μ − b, σ'² = 1 − ε, g' = 1, b' = 0): the function is
unchanged, and what remains is linear in the channels, so a merge of channels (DOTResize) maps it exactly, where
averaging the statistics of a full BatchNorm is only an approximation. The module stays in place (onnxruntime
fuses Conv + BatchNormalization either way); no graph is edited.
"""
from __future__ import annotations

import torch

from .groups import Analysis
from .rules import aten, packet

_BATCH_NORMS = {aten._native_batch_norm_legit_no_training: 6, aten.batch_norm: 7}   # op → eps argument
_CONVS = {aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution}


def fold_batch_norms(model: torch.nn.Module, analysis: Analysis) -> list[str]:
    """Fold every BatchNorm that reads a (non-transposed) conv's output alone; returns the folded pairs."""
    sig = analysis.captured.program.graph_signature
    fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    folded = []
    for node in analysis.captured.graph.nodes:
        eps_arg = _BATCH_NORMS.get(packet(node.target))
        conv = node.args[0] if eps_arg is not None else None
        if not _folds_into(conv):
            continue
        weight, bias, mean, var = (_tensor(model, fqn, a) for a in node.args[1:5])
        if mean is None or var is None:
            continue
        eps = node.args[eps_arg] if len(node.args) > eps_arg else 1e-5
        conv_weight = _tensor(model, fqn, conv.args[1])
        with torch.no_grad():
            g = weight.double() if weight is not None else torch.ones_like(mean, dtype=torch.float64)
            s = g / (var.double() + eps).sqrt()
            shift = s * mean.double() - (bias.double() if bias is not None else 0.0)
            conv_weight.mul_(s.to(conv_weight.dtype).view(-1, *[1] * (conv_weight.dim() - 1)))
            conv_bias = _tensor(model, fqn, conv.args[2]) if len(conv.args) > 2 else None
            if conv_bias is not None:
                conv_bias.mul_(s.to(conv_bias.dtype))
            mean.copy_(shift.to(mean.dtype))
            var.fill_(1.0 - eps)
            if weight is not None:
                weight.fill_(1.0)
            if bias is not None:
                bias.zero_()
        folded.append(f"{fqn[conv.args[1].name].rpartition('.')[0]} ← {fqn[node.args[3].name].rpartition('.')[0]}")
    return folded


def _folds_into(conv) -> bool:
    if not isinstance(conv, torch.fx.Node) or packet(conv.target) not in _CONVS or len(conv.users) != 1:
        return False
    return not (packet(conv.target) is aten.convolution and bool(conv.args[6]))   # transposed: (in, out, …)


def _tensor(model, fqn: dict, arg):
    name = fqn.get(arg.name) if isinstance(arg, torch.fx.Node) else None
    if name is None:
        return None
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr)
