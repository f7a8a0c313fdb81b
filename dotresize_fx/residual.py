"""The residual stream's algebra (DESIGN §5, residual): norm invariance needs an orthonormal map.

Factor the merge map M = Q·R (QR; Q ∈ R^{n×m} orthonormal). The stream carries z = x·Q: every producer becomes
W_p·Q. Each norm's gain g is folded into the consumers that read it, and the norm keeps the constant gain
sqrt(n/m), since RMSNorm_m(x·Q)·sqrt(n/m) = RMSNorm_n(x)·Q for x in span(Q). Consumers reading the norm become
R·U·diag(g)·W_c (with U = M⁺ that is Qᵀ·diag(g)·W_c). A stream read through centring norms (LayerNorm) is
first made zero-mean (every producer centred: mean subtraction is linear) and mapped by a Q that keeps it
zero-mean, so the stock LayerNorm modules act as RMSNorm (`centred_basis`).
"""
from __future__ import annotations

import math

import torch

from .errors import DotResizeError
from .families import rescale_embedding
from .groups import WidthGroup
from .maps import WidthMap, is_selection
from .sites import Sites, linear_ops, owner, site_tensor

SKIP_ADAPTER = "skip_adapter"


def residual_ops(model, group: WidthGroup, w: WidthMap, sites: Sites, overwrite: dict, notes: list[str]) -> None:
    """Add the ops of a residual map to `sites`; the norms' new gains and biases go to `overwrite`."""
    centre = group.centred
    if centre and (w.is_selection or is_selection(w.merge)) and not w.stages:
        linear_ops(model, group, w, sites)  # keeping channels: LayerNorm simply normalises over the kept ones
        return
    blocker = rotation_blocker(group)
    if blocker:
        raise DotResizeError(f"{group.name}: {blocker}; only keeping channels (prune) preserves it: do not merge "
                             "or rotate this width")
    n, m = w.n, w.m
    if centre and m < 2:
        raise DotResizeError(f"{group.name}: a LayerNorm stream needs at least 2 channels; lower the reduction")
    stages = w.stages or [w]
    # the stream carries z = x·Q; consumers rebuild x ≈ z·C (C = R·U for a QR basis)
    bases = [stage_basis(s, centre) for s in stages]
    readers = [Q.T @ s.merge @ s.unmerge for Q, s in zip(bases, stages)]
    producer = torch.eye(n, dtype=torch.float64) - (1.0 / n if centre else 0.0)  # centring folded into writers
    gain = math.sqrt(n / m)
    norms = {name: norm_affine(model, name, centre) for name in group.norms}
    # a layer scale γ on a branch's output moves into its producer's rows (γ·(W·h) = (diag γ · W)·h) and is 1 after
    gammas = {module: site_tensor(model, *fqn.rpartition(".")[::2]).reshape(-1)
              for module, fqn in group.scales.items()}
    for mem in group.members:
        site = owner(model, mem)
        i = stage_of(mem.module or mem.param, w.stage_prefix, len(stages) - 1, mem.role == "producer") \
            if w.stages else 0
        Q, C = bases[i], readers[i]
        if mem.role == "producer":
            scale = rescale_embedding(model.get_submodule(site[0]), n, m) if mem.via == "embedding" else 1.0
            A = producer @ Q * scale
            if mem.module in gammas:
                A = torch.diag(gammas[mem.module]) @ A
            sites[site].append((mem.dim, mem.offset, mem.length or n, A))
        elif mem.param in group.scales.values():
            shape = list(site_tensor(model, *site).shape)
            shape[mem.dim] = m
            overwrite[site] = torch.ones(shape, dtype=torch.float64)
        elif mem.role == "consumer":
            g = norms[mem.reads][0] if mem.reads else torch.ones(n, dtype=torch.float64)
            sites[site].append((mem.dim, mem.offset, mem.length or n, torch.diag(g) @ C.T))
        elif mem.role == "passthrough" and mem.module in norms:
            g, offset, b = norms[mem.module]
            if site[1] == "bias":
                overwrite[site] = (b / g) @ Q  # LayerNorm(x) = (x̂ + b/g)·g: the bias travels with x̂
            else:
                overwrite[site] = torch.full((m,), gain - offset, dtype=torch.float64)
    for l in range(len(stages) - 1):
        add_skip_adapter(model.get_submodule(f"{w.stage_prefix}.{l}"), bases[l].T @ bases[l + 1])
    notes.append(f"{group.name}: norm gains folded into consumers; norms keep gain sqrt({n}/{m})"
                 + ("; producers centred so LayerNorm acts as RMSNorm" if centre else "")
                 + (f"; {len(stages) - 1} skip adapters between per-layer bases" if w.stages else ""))


def stage_basis(w: WidthMap, centred: bool) -> torch.Tensor:
    """The orthonormal basis Q (n×m) that carries the stream for map `w` (a centred stream's keeps it zero-mean)."""
    return centred_basis(w.merge) if centred else torch.linalg.qr(w.merge)[0]


def stage_of(path: str, prefix: str, last: int, producer: bool = False) -> int:
    """Which per-layer basis a module works in: its block's in ModuleList `prefix`, or outside the blocks the
    first (the embedding, a producer) or the `last` (final norm and head, readers)."""
    rest = path.removeprefix(prefix + ".")
    head = rest.split(".", 1)[0]
    if rest != path and head.isdigit():
        return int(head)
    return 0 if producer else last


def add_skip_adapter(block: torch.nn.Module, A: torch.Tensor) -> None:
    """Multiply the block's output (its residual stream) by A (m × m): the change of basis to the next block.

    A parameter plus a forward hook: the module tree and every parameter name stay as they were, torch.export
    and the ONNX exporter trace the hook, and `save` records which blocks carry one.
    """
    if hasattr(block, SKIP_ADAPTER):
        raise DotResizeError("the residual stream already has per-layer maps: resize it in one pass")
    dtype = next(block.parameters()).dtype
    block.register_parameter(SKIP_ADAPTER, torch.nn.Parameter(A.to(dtype), requires_grad=False))
    block.register_forward_hook(_apply_skip_adapter)


def _apply_skip_adapter(block, _args, out):
    A = getattr(block, SKIP_ADAPTER)
    if isinstance(out, tuple):
        return (out[0] @ A, *out[1:])
    return out @ A


def rotation_blocker(group: WidthGroup) -> str | None:
    """Why no orthogonal map of this stream keeps the function (None: rotations and merges are exact)."""
    if group.channelwise:
        return f"{group.channelwise[0]} acts on each channel of the stream alone"
    raw = sorted({mem.module for mem in group.members if mem.role == "consumer" and not mem.reads})
    if group.centred and raw:
        return (f"{', '.join(raw)} read the LayerNorm stream without a LayerNorm, so centring the stream would "
                "change their input")
    return None


def centred_basis(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal Q (n×m) with Q·1_m ∥ 1_n, spanning the top m−1 zero-mean directions of M and 1_n.

    A zero-mean stream x then maps to a zero-mean z = x·Q, on which LayerNorm equals RMSNorm; the one
    direction spent on 1_n carries nothing (x ⊥ 1_n), the price of keeping stock LayerNorm modules.
    """
    n, m = M.shape
    u = torch.full((n, 1), n ** -0.5, dtype=torch.float64)
    S, _, _ = torch.linalg.svd(M - u @ (u.T @ M), full_matrices=False)
    Q1 = torch.cat([S[:, :m - 1], u], dim=1)
    v = torch.full((m, 1), m ** -0.5, dtype=torch.float64)
    v[-1] -= 1.0
    H = torch.eye(m, dtype=torch.float64) - 2.0 * (v @ v.T) / (v.T @ v)  # swaps e_m and 1_m/√m
    return Q1 @ H


def norm_affine(model, name: str, centring: bool) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(g, offset, b): the norm computes x̂·g + b with g = weight + offset (Gemma: offset 1).

    RMSNorm-style gains are probed, not assumed: a large constant input has RMS equal to itself, so the
    output is the gain. A centring norm maps a constant to its bias, so its affine parameters are read directly.
    """
    norm = model.get_submodule(name)
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise DotResizeError(f"norm {name} has no weight to carry the sqrt(n/m) gain; keep the residual width")
    n = weight.shape[0]
    zeros = torch.zeros(n, dtype=torch.float64)
    bias = getattr(norm, "bias", None)
    if centring:
        g = weight.detach().to(torch.float64)
        b = bias.detach().to(torch.float64) if bias is not None else zeros
        if bias is not None and bool((g.abs() < 1e-12).any()):
            raise DotResizeError(f"LayerNorm {name} has a zero gain with a bias; its bias cannot be folded")
        return g, 0.0, b
    if bias is not None:
        raise DotResizeError(f"norm {name} ({type(norm).__name__}) has a bias but does not centre: not supported")
    probe = torch.full((1, n), 1e3, dtype=weight.dtype)
    with torch.no_grad():
        g = norm(probe)[0].to(torch.float64)
        saved = weight.detach().clone()
        weight.zero_()
        offset = norm(probe)[0].to(torch.float64).mean().item()
        weight.copy_(saved)
    return g, offset, zeros
