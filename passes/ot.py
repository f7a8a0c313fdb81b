"""Discrete optimal transport between a group's neurons and its targets (DESIGN §5.2–5.4). POT lives here only.

Units: `gram` is G = XᵀX over N calibration tokens (float64), so ‖x_i − x_j‖²/N = (G_ii + G_jj − 2G_ij)/N.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import ot
import torch

from dotresize_fx.errors import DotResizeError

Cost = Literal["l2", "cosine"]
Marginals = Literal["uniform", "energy", "semi"]
Unmerge = Literal["ot", "pinv", "ls"]
MARGINAL_TOL = 1e-6


def cost_matrix(gram: torch.Tensor, count: int, targets: torch.Tensor, kind: Cost = "l2") -> torch.Tensor:
    """C ∈ R^{n×m}: C_ij = (G_ii + G_tt − 2 G_it)/N (l2) or 1 − G_it/sqrt(G_ii G_tt) (cosine), t = targets[j],
    divided by its median so that one regularisation means the same at every layer."""
    d = gram.diagonal()
    cross = gram[:, targets]
    if kind == "l2":
        C = (d[:, None] + d[targets][None, :] - 2 * cross) / max(count, 1)
    else:
        C = 1 - cross / (d[:, None] * d[targets][None, :]).clamp_min(1e-30).sqrt()
    C = C.clamp_min(0)
    med = C[C > 0].median() if (C > 0).any() else torch.tensor(1.0, dtype=C.dtype)
    return C / med


def marginals(gram: torch.Tensor, targets: torch.Tensor, kind: Marginals) -> tuple[torch.Tensor, torch.Tensor]:
    """Source mass a (n) and target mass b (m), each summing to 1."""
    n, m = gram.shape[0], len(targets)
    if kind == "energy":
        a = gram.diagonal().clamp_min(1e-30)
        a = a / a.sum()
        b = a[targets] / a[targets].sum()
        return a, b
    return torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)


def transport_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float = 0.05,
                   solver: Literal["sinkhorn", "emd"] = "sinkhorn", max_iter: int = 2000) -> torch.Tensor:
    """T = argmin ⟨T, C⟩ − ε·H(T) s.t. T1 = a, Tᵀ1 = b (Sinkhorn, log domain) or the exact plan (ot.emd).

    Raises if the plan misses its marginals: a degenerate plan is never returned silently.
    """
    C, a_, b_ = cost.numpy(), a.numpy(), b.numpy()
    if solver == "emd":
        T = ot.emd(a_, b_, C, numItermax=max(10_000_000, 50 * C.size))
    else:
        T = ot.sinkhorn(a_, b_, C, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=1e-9)
    T = torch.as_tensor(np.asarray(T), dtype=torch.float64)
    err_a = (T.sum(1) - a).abs().sum().item()
    err_b = (T.sum(0) - b).abs().sum().item()
    if not np.isfinite(T.numpy()).all() or err_a > 1e-3 or err_b > 1e-3:
        raise DotResizeError(f"the transport plan missed its marginals (‖T1−a‖₁={err_a:.2g}, ‖Tᵀ1−b‖₁={err_b:.2g}): "
                             "raise reg (e.g. 0.1), use solver=emd, or use cost=cosine")
    return T


def semi_plan(cost: torch.Tensor, a: torch.Tensor, targets: torch.Tensor, *, reg: float,
              mass: float = 1.0) -> torch.Tensor:
    """Kept neurons keep their own mass; every other neuron sends `mass` × its mass softly to its nearest
    targets (mass 0: pruning, 1: full merging)."""
    n, m = cost.shape
    T = torch.softmax(-cost / reg, dim=1) * (mass * a[:, None])
    T[targets] = 0
    T[targets, torch.arange(m)] = a[targets]
    return T


def width_map_from_plan(plan: torch.Tensor, *, unmerge: Literal["ot", "pinv"]) -> tuple[torch.Tensor, torch.Tensor]:
    """M = T·diag(1/b) (column j averages the sources sent to target j) and U (m×n):
    ot: (diag(1/a)·T)ᵀ (each source's consumer weights go to its targets);  pinv: M⁺.
    (`ls` is fitted by the pass from calibration data, starting from the `ot` map.)"""
    a, b = plan.sum(1), plan.sum(0)
    M = plan / b.clamp_min(1e-30)[None, :]
    U = (plan / a.clamp_min(1e-30)[:, None]).T if unmerge == "ot" else torch.linalg.pinv(M)
    return M, U.contiguous()
