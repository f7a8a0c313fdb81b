"""The selection and least-squares math of the passes: plain functions over float64 tensors (DESIGN §5).

Notation: a group's observation-point rows X ∈ R^{N×n}, Gram G = XᵀX, consumers W_c with column norms
d_i = ‖W_c[:, i]‖. Importances score channels; `select` picks m units; `ridge_fit` and `ls_unmerge` fit the
consumers of a merged or pruned group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .maps import Fill, selected_rows


@dataclass(frozen=True)
class Importance:
    """`score(mean_sq, col_norms)` per channel; `select(gram, col_norms, m)`: a rule that picks units itself
    (None: the top-m scores)."""
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    select: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None


def pivoted_cholesky(gram: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of m columns chosen greedily to span the others best: at step k the column with the largest
    residual variance d_i = G_ii − Σ_{j<k} L_ij², then L_{:,k} = (G_{:,i} − L·L_{i,:}ᵀ)/√d_i."""
    n = gram.shape[0]
    d = gram.diagonal().clone()
    L = torch.zeros(n, m, dtype=gram.dtype)
    chosen = []
    for k in range(m):
        i = int(torch.argmax(d))
        chosen.append(i)
        col = (gram[:, i] - L[:, :k] @ L[i, :k]) / d[i].clamp_min(1e-30).sqrt()
        L[:, k] = col
        d -= col ** 2
        d[chosen] = -float("inf")
    return torch.tensor(sorted(chosen))


def _weighted_cholesky(gram: torch.Tensor, col_norms: torch.Tensor, m: int) -> torch.Tensor:
    """Greedy column-subset selection on D·G·D, D = diag(d): the neurons whose consumer contributions best
    span the others."""
    return pivoted_cholesky(gram * col_norms[:, None] * col_norms[None, :], m)


def transport_targets(gram: torch.Tensor, col_norms: torch.Tensor, m: int) -> torch.Tensor:
    """m targets S that make the cost of moving every neuron onto its nearest target small:
    min_S Σ_j min_{i∈S} C_ji,  C_ji = d_j²·(G_jj − G_ij²/G_ii),
    the part of neuron j's consumer contribution that target i, rescaled, cannot carry (C_jj = 0). Reverse
    greedy, as for facility location: from all n, drop one target at a time, the one whose loss raises the cost
    least (its neurons move to their second-nearest target)."""
    n = gram.shape[0]
    diag = gram.diagonal().clamp_min(1e-30)
    C = (col_norms[:, None] ** 2) * (diag[:, None] - gram ** 2 / diag[None, :]).clamp_min(0)
    C.fill_diagonal_(0.0)
    alive = torch.ones(n, dtype=torch.bool)
    near = C.topk(2, dim=1, largest=False)
    values, indices = near.values.clone(), near.indices.clone()
    for _ in range(n - m):
        # dropping target t costs every neuron whose nearest it is the step to its second-nearest
        raise_by = torch.zeros(n, dtype=C.dtype).index_add_(0, indices[:, 0], values[:, 1] - values[:, 0])
        raise_by[~alive] = math.inf
        t = int(raise_by.argmin())
        alive[t] = False
        C[:, t] = math.inf
        stale = ((indices == t).any(1)).nonzero().squeeze(1)   # only their two nearest change
        near = C[stale].topk(2, dim=1, largest=False)
        values[stale], indices[stale] = near.values, near.indices
    return alive.nonzero().squeeze(1)


IMPORTANCES: dict[str, Importance] = {
    "weight": Importance(lambda act_sq, d: d),                                  # ‖W_c[:, i]‖
    "activation": Importance(lambda act_sq, d: act_sq.sqrt()),                  # sqrt(G_ii / N)
    "act_weight": Importance(lambda act_sq, d: act_sq.sqrt() * d),              # sqrt(G_ii / N)·‖W_c[:, i]‖
    "cholesky": Importance(lambda act_sq, d: act_sq.sqrt() * d, select=_weighted_cholesky),  # heads: act_weight
    "transport": Importance(lambda act_sq, d: act_sq.sqrt() * d, select=transport_targets),  # heads: act_weight
}


def unit_scores(channel_scores: torch.Tensor, unit: int) -> torch.Tensor:
    """A unit's (head's) score: the norm of its channels' scores."""
    return channel_scores.view(-1, unit).pow(2).sum(1).sqrt() if unit > 1 else channel_scores


def scores(kind: str, mean_sq: torch.Tensor | None, col_norms: torch.Tensor, unit: int) -> torch.Tensor:
    """Each unit's importance (`mean_sq` None: an importance that needs no statistics)."""
    act = mean_sq if mean_sq is not None else torch.ones_like(col_norms)
    return unit_scores(IMPORTANCES[kind].score(act, col_norms), unit)


def select(kind: str, mean_sq: torch.Tensor | None, col_norms: torch.Tensor, gram: torch.Tensor | None,
           unit: int, m: int) -> torch.Tensor:
    """The m units to keep (sorted) for a group without GQA structure."""
    imp = IMPORTANCES[kind]
    if imp.select is not None and unit == 1:
        return imp.select(gram, col_norms, m)
    return scores(kind, mean_sq, col_norms, unit).topk(m).indices.sort().values


def keep_heads(scores: torch.Tensor, kv: int, m: int, kv_after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q heads to keep (sorted) and kv heads to keep for GQA with `kv` groups of q heads: whole groups by their
    summed score when kv heads go, else the best m/kv q heads within every group."""
    rep = scores.numel() // kv
    per = scores.view(kv, rep)
    if kv_after < kv:
        kv_keep = per.sum(1).topk(kv_after).indices.sort().values
        q_keep = torch.cat([k * rep + torch.arange(rep) for k in kv_keep.tolist()])
    else:
        kv_keep = torch.arange(kv)
        r = m // kv
        q_keep = torch.cat([k * rep + per[k].topk(r).indices.sort().values for k in range(kv)])
    return q_keep, kv_keep


LS_REGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)   # λ tried against held-out rows, after the pass's own


def ridge_fit(A: torch.Tensor, B: torch.Tensor, reg: float, prior: torch.Tensor | None = None,
              A_hold: torch.Tensor | None = None,
              B_hold: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """U = argmin ‖H − H'U‖² + λ‖U − U₀‖² = (A + λI)⁻¹(B + λU₀); A = H'ᵀH', B = H'ᵀH, U₀ = `prior` (or 0).

    λ is relative to the mean of diag(A). With held-out Grams (A_hold, B_hold: the held-out rows' share of A
    and B) λ is the one among `reg` and LS_REGS whose fit on the other rows best predicts the held-out rows
    (∞ = U₀ itself); then U is refitted on all rows. Without them λ = `reg`. A calibration set too small for
    the width would otherwise turn the fit into noise (SmolLM2, prune+ls MLP 1536→1152 from 4×256 tokens:
    perplexity 514 with λ = 1e-4, 50.9 picked on held-out rows; plain selection 53.4).
    Returns U and the relative λ used.
    """
    U0 = torch.zeros_like(B) if prior is None else prior.to(B.dtype)
    if A_hold is not None and A_hold.abs().sum() > 0 and (A - A_hold).abs().sum() > 0:
        reg = _pick_reg(A - A_hold, B - B_hold, U0, A_hold, B_hold, sorted({reg, *LS_REGS}))
    return _ridge(A, B, reg, U0), reg


def _pick_reg(A_fit, B_fit, U0, A_hold, B_hold, regs: list[float]) -> float:
    """The λ of `regs` (ascending) whose fit best predicts the held-out rows. The held-out error of a ridge
    path falls while λ removes variance and rises once it adds bias, so the scan stops at the first rise
    (on SmolLM2 it ends after two or three of the seven solves; each is a Cholesky factorisation)."""
    best, best_err = regs[0], math.inf
    for lam in regs:
        err = _holdout_error(_ridge(A_fit, B_fit, lam, U0), A_hold, B_hold)
        if err >= best_err:
            break
        best, best_err = lam, err
    return best


def _ridge(A, B, reg, U0):
    """(A + λ'I)⁻¹(B + λ'U₀) by Cholesky (A + λ'I is symmetric positive definite for λ' > 0)."""
    if math.isinf(reg):
        return U0.clone()
    lam = reg * A.diagonal().mean().clamp_min(1e-12)
    M = A + lam * torch.eye(A.shape[0], dtype=A.dtype)
    L, info = torch.linalg.cholesky_ex(M)
    if info.item() != 0:   # λ' = 0 on a singular Gram: the general solver says so
        return torch.linalg.solve(M, B + lam * U0)
    return torch.cholesky_solve(B + lam * U0, L)


def _holdout_error(U, A_hold, B_hold) -> float:
    """‖H − H'U‖² on the held-out rows, up to the constant ‖H‖²: tr(UᵀA_hU) − 2·tr(UᵀB_h)."""
    return float((U * (A_hold @ U)).sum() - 2 * (U * B_hold).sum())


def ls_unmerge(merge: torch.Tensor, gram: torch.Tensor | None, reg: float = 1e-4, prior: torch.Tensor | None = None,
               holdout: torch.Tensor | None = None, rows: tuple | None = None) -> tuple[torch.Tensor, float]:
    """U ≈ (MᵀGM + λI)⁻¹ (MᵀG + λU₀): the least-squares reconstruction of X from XM (`ridge_fit` with
    H' = XM, H = X; `holdout`: the held-out rows' share of G, to pick λ). `rows`: (X, held-out mask) when
    fewer rows than channels were observed; a selection is then solved in the row space (`ridge_rows`)."""
    kept = selected_rows(merge)
    if kept is None or prior is None or not torch.equal(prior, merge.T):
        if gram is None:
            raise ValueError("ls_unmerge: a merge that is not a selection needs the Gram, not rows")
        hold = (None, None) if holdout is None else (merge.T @ holdout @ merge, merge.T @ holdout)
        return ridge_fit(merge.T @ gram @ merge, merge.T @ gram, reg, prior, *hold)
    fill, lam = selection_fill(kept, merge.shape[0], gram, reg, holdout, rows)
    return fill.dense(), lam


def selection_fill(kept: torch.Tensor, n: int, gram: torch.Tensor | None, reg: float = 1e-4,
                   holdout: torch.Tensor | None = None, rows: tuple | None = None) -> tuple[Fill, float]:
    """`ls_unmerge` of the selection S keeping `kept` (sorted) with prior Sᵀ, as a `Fill`. SᵀGS and SᵀG are
    rows and columns of G, and on the kept channels (SᵀGS + λI)⁻¹(SᵀGS + λI) = I for every λ and every split
    of the rows, so only the removed channels' columns R = (G_kk + λI)⁻¹G_kr are solved (their held-out
    error is the only part that depends on λ). `rows`: (X, held-out mask), solved in the row space."""
    removed = torch.ones(n, dtype=torch.bool)
    removed[kept] = False
    if rows is not None:
        X, held = rows
        factors, lam = ridge_rows(X[:, kept], X[:, removed], held, reg)
        A, B = factors
        if A.shape[1] * (A.shape[0] + B.shape[1]) >= A.shape[0] * B.shape[1]:   # two products cost no less than R
            A, B = A @ B, None
        return Fill(kept, removed.nonzero().squeeze(1), A, B), lam
    hold = (None, None) if holdout is None else (holdout[kept][:, kept], holdout[kept][:, removed])
    R, lam = ridge_fit(gram[kept][:, kept], gram[kept][:, removed], reg, None, *hold)
    return Fill(kept, removed.nonzero().squeeze(1), R), lam


def ridge_rows(Xk: torch.Tensor, Xr: torch.Tensor, held: torch.Tensor, reg: float
               ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """`ridge_fit` toward 0 with A = X_kᵀX_k, B = X_kᵀX_r, solved in the row space when there are fewer rows N
    than channels: R = (X_kᵀX_k + λ'I)⁻¹X_kᵀX_r = X_kᵀ(K + λ'I)⁻¹X_r with K = X_kX_kᵀ (N×N, the push-through
    identity), λ' = λ·tr(K)/n_k as in `_ridge`. The held-out scan eigendecomposes the fit rows' K = QΣQᵀ
    once, so every λ costs a product: the held-out prediction is P·diag(1/(σ + λ'))·Z with P = X_kH X_kFᵀ Q
    and Z = QᵀX_rF. Same λ and R as the Gram path (to rounding), at O(N²n) instead of O(n³). Returns R's
    factors (X_kᵀ, (K + λ'I)⁻¹X_r) and λ."""
    fit, lam = ~held, reg
    if held.any() and fit.any():
        lam = _pick_reg_rows(Xk[fit], Xr[fit], Xk[held], Xr[held], sorted({reg, *LS_REGS}))
    if math.isinf(lam):
        return (Xk.T, torch.zeros(Xk.shape[0], Xr.shape[1], dtype=Xk.dtype)), lam
    K = Xk @ Xk.T
    shift = lam * (K.diagonal().sum() / Xk.shape[1]).clamp_min(1e-12)
    return (Xk.T, torch.linalg.solve(K + shift * torch.eye(K.shape[0], dtype=K.dtype), Xr)), lam


def _pick_reg_rows(Xk_f, Xr_f, Xk_h, Xr_h, regs: list[float]) -> float:
    """`_pick_reg` in the row space: held-out error ‖Y‖² − 2⟨Y, X_rH⟩ of the prediction Y = X_kH·R(λ)."""
    K = Xk_f @ Xk_f.T
    sigma, Q = torch.linalg.eigh(K)
    P, Z = Xk_h @ (Xk_f.T @ Q), Q.T @ Xr_f
    scale = (K.diagonal().sum() / Xk_f.shape[1]).clamp_min(1e-12)
    best, best_err = regs[0], math.inf
    for lam in regs:
        Y = torch.zeros_like(Xr_h) if math.isinf(lam) else P @ (Z / (sigma.clamp_min(0) + lam * scale)[:, None])
        err = float((Y * Y).sum() - 2 * (Y * Xr_h).sum())
        if err >= best_err:
            break
        best, best_err = lam, err
    return best
