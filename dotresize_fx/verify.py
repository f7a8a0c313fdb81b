"""Invariance checks: maps that must not change the function (DESIGN §6).

Run in float64, so that passing is a proof of the machinery, not of float32 luck: identity maps on every
resizable group, a random permutation of each, a random rotation of the residual stream (where one keeps the function: see
`residual.rotation_blocker`), and a different
rotation per block (per-layer maps with skip adapters) where the blocks chain. A model whose forward computes
in float32 even when its weights are float64 (Hugging Face's RMSNorm and rotary tables cast to float32) is
held to float32's floor instead, and the result says which floor applied.
"""
from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .blocks import block_list
from .groups import Analysis, WidthGroup
from .maps import WidthMap
from .outputs import model_outputs
from .residual import rotation_blocker, stage_of
from .rewrite import apply

VERIFY_TOL = {torch.float64: 1e-9, torch.float32: 1e-5}   # max |Δ output| / max(1, max |output|)


def invariance_checks(model: torch.nn.Module, analysis: Analysis, inputs: tuple, *, seed: int = 0) -> list[dict]:
    """[{name, max_abs_diff, tolerance, compute_dtype, ok, groups}] for every check (the model is not modified)."""
    g = torch.Generator().manual_seed(seed)
    ref_model = copy.deepcopy(model).double()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with torch.no_grad(), _LowestFloat() as seen:
        ref = model_outputs(ref_model, inputs).double()
    groups = [grp for grp in analysis.groups if grp.resizable]
    checks = [("identity", {grp.name: _identity(grp) for grp in groups}),
              ("permutation", {grp.name: _permutation(grp, g) for grp in groups})]
    for grp in groups:
        if grp.kind == "residual" and rotation_blocker(grp) is None:
            checks += _rotations(ref_model, analysis, grp, inputs, g)
    tol = VERIFY_TOL[seen.lowest] * max(1.0, ref.abs().max().item())
    results = []
    for name, maps in checks:
        new, _ = apply(ref_model, analysis, maps)
        with torch.no_grad():
            out = model_outputs(new, inputs).double()
        diff = (out - ref).abs().max().item() if out.shape == ref.shape else float("inf")
        results.append({"name": name, "max_abs_diff": diff, "tolerance": tol, "compute_dtype": str(seen.lowest),
                        "ok": diff <= tol, "groups": len(maps)})
    return results


class _LowestFloat(TorchDispatchMode):
    """The least precise floating dtype any op of a forward produces (float64 or float32)."""

    def __init__(self):
        super().__init__()
        self.lowest = torch.float64

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
               for t in tree_leaves(out)):
            self.lowest = torch.float32
        return out


def _rotations(model, analysis, grp: WidthGroup, inputs, g) -> list[tuple[str, dict]]:
    Q = _rotation(grp.size, g)
    out = [(f"rotation {grp.name}", {grp.name: WidthMap(grp.name, Q, Q.T.contiguous())})]
    blocks = block_list(model, analysis, inputs)
    # a different rotation per block proves the skip adapters, where the stream runs through every block (a
    # hierarchical model's stage stream does not)
    if blocks is not None and {stage_of(n, blocks[0], len(blocks[1])) for n in grp.norms} == set(
            range(len(blocks[1]) + 1)):
        stages = [WidthMap(grp.name, Q, Q.T.contiguous())
                  for Q in (_rotation(grp.size, g) for _ in range(len(blocks[1]) + 1))]
        w = WidthMap(grp.name, stages[0].merge, stages[0].unmerge, stages=stages, stage_prefix=blocks[0])
        out.append((f"per-layer rotation {grp.name}", {grp.name: w}))
    return out


def _rotation(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _identity(grp: WidthGroup) -> WidthMap:
    kv = grp.kv_heads if grp.kind == "heads" and grp.kv_heads != grp.size else None
    return WidthMap.identity(grp.name, grp.size, kv)


def _permutation(grp: WidthGroup, g: torch.Generator) -> WidthMap:
    if grp.kind == "heads" and grp.kv_heads != grp.size:
        kv, rep = grp.kv_heads, grp.size // grp.kv_heads
        kv_perm = torch.randperm(kv, generator=g)
        within = [torch.randperm(rep, generator=g) for _ in range(kv)]
        q_perm = torch.cat([kv_perm[i] * rep + within[i] for i in range(kv)])
        return WidthMap.selection(grp.name, grp.size, q_perm, kv, kv_perm)
    return WidthMap.selection(grp.name, grp.size, torch.randperm(grp.size, generator=g))
