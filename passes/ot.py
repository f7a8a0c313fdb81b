"""Discrete optimal transport between a group's neurons and its targets (DESIGN §5.2–5.4). POT lives here only.

Units: `gram` is G = XᵀX over N calibration tokens (float64), so ‖x_i − x_j‖²/N = (G_ii + G_jj − 2G_ij)/N.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import ot
import torch

from dotresize_fx.errors import DotResizeError

Solver = Literal["sinkhorn", "emd", "unbalanced"]
Unmerge = Literal["ot", "pinv", "ls"]


def _l2(gram, count, targets):
    """C_ij = (G_ii + G_tt − 2 G_it)/N: the mean squared distance between neuron i and target t = targets[j]."""
    d = gram.diagonal()
    return (d[:, None] + d[targets][None, :] - 2 * gram[:, targets]) / max(count, 1)


def _cosine(gram, count, targets):
    """C_ij = 1 − G_it / sqrt(G_ii G_tt): scale-free."""
    d = gram.diagonal()
    return 1 - gram[:, targets] / (d[:, None] * d[targets][None, :]).clamp_min(1e-30).sqrt()


COSTS = {"l2": _l2, "cosine": _cosine}
Cost = Literal[tuple(COSTS)]


def cost_matrix(gram: torch.Tensor, count: int, targets: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """C ∈ R^{n×m} by `kind` (COSTS), divided by its median so that one regularisation means the same at every
    layer."""
    C = COSTS[kind](gram, count, targets).clamp_min(0)
    med = C[C > 0].median() if (C > 0).any() else torch.tensor(1.0, dtype=C.dtype)
    return C / med


def _uniform(gram, targets):
    n, m = gram.shape[0], len(targets)
    return torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)


def _energy(gram, targets):
    """a_i ∝ G_ii (each neuron's share of the activation energy); b the targets' shares, renormalised."""
    a = gram.diagonal().clamp_min(1e-30)
    a = a / a.sum()
    return a, a[targets] / a[targets].sum()


MARGINALS = {"uniform": _uniform, "energy": _energy}


def marginals(gram: torch.Tensor, targets: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Source mass a (n) and target mass b (m), each summing to 1 (`kind` in MARGINALS)."""
    return MARGINALS[kind](gram, targets)


def transport_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float = 0.05,
                   solver: str = "sinkhorn", tau: float = 1.0, max_iter: int = 2000) -> torch.Tensor:
    """T = argmin ⟨T, C⟩ − ε·H(T) s.t. T1 = a, Tᵀ1 = b (`sinkhorn`, log domain) or the exact plan (`emd`,
    ot.emd); `unbalanced`: the target marginal only KL-relaxed, T = argmin ⟨T, C⟩ − ε·H(T) + τ·KL(Tᵀ1 ‖ b)
    s.t. T1 = a (ot.unbalanced.sinkhorn_unbalanced with reg_m = (∞, τ)): τ → 0 is the semi-relaxed row softmax
    of `semi_plan`, τ → ∞ the balanced plan.

    Raises if the plan misses its (fixed) marginals: a degenerate plan is never returned silently.
    """
    C, a_, b_ = cost.numpy(), a.numpy(), b.numpy()
    if solver == "emd":
        T = ot.emd(a_, b_, C, numItermax=max(10_000_000, 50 * C.size))
    elif solver == "unbalanced":
        with warnings.catch_warnings():   # POT says the entropy regulariser ignores `c`, which is what we ask
            warnings.filterwarnings("ignore", message="If reg_type = entropy")
            T = ot.unbalanced.sinkhorn_unbalanced(a_, b_, C, reg, (float("inf"), tau), reg_type="entropy",
                                                  method="sinkhorn_stabilized", numItermax=max_iter, stopThr=1e-9)
    else:
        T = ot.sinkhorn(a_, b_, C, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=1e-9)
    T = torch.as_tensor(np.asarray(T), dtype=torch.float64)
    err_a = (T.sum(1) - a).abs().sum().item()
    err_b = 0.0 if solver == "unbalanced" else (T.sum(0) - b).abs().sum().item()
    if not np.isfinite(T.numpy()).all() or err_a > 1e-3 or err_b > 1e-3:
        raise DotResizeError(f"the transport plan missed its marginals (‖T1−a‖₁={err_a:.2g}, ‖Tᵀ1−b‖₁={err_b:.2g}): "
                             f"raise reg (it is {reg:g}; e.g. {5 * reg:g}), use solver=emd, or use cost=cosine")
    return T


def semi_plan(cost: torch.Tensor, a: torch.Tensor, targets: torch.Tensor, *, reg: float,
              mass: float = 1.0) -> torch.Tensor:
    """Semi-relaxed entropic transport: only the source marginal is fixed, which has the closed form of a
    row softmax, T_ij = μ·a_i·softmax_j(−C_ij/ε) = argmin ⟨T, C⟩ − ε·H(T) s.t. T1 = μ·a (no constraint on Tᵀ1).
    Kept neurons (targets) send their own mass a_t to themselves; every other neuron sends μ = `mass` × its mass
    (mass 0: pruning, 1: full merging). This is not the paper's balanced problem (`transport_plan`)."""
    m = cost.shape[1]
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
