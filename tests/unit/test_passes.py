"""The math of the passes: transport plans, width maps, selection (DESIGN §5)."""
import pytest
import torch

import models
from dotresize_fx.analyze import analyze
from dotresize_fx.errors import DotResizeError
from dotresize_fx.calibrate import holdout_rows
from dotresize_fx.fit import ls_unmerge, pivoted_cholesky, transport_targets
from dotresize_fx.targets import Targets, plan_widths
from passes import ot as dot


def _gram(n=12, N=400, seed=0):
    X = torch.randn(N, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X.T @ X, N, X


@pytest.mark.parametrize("solver", ["sinkhorn", "emd"])
def test_plan_marginals_hold(solver):
    G, N, _ = _gram()
    targets = torch.tensor([0, 3, 5, 7])
    C = dot.cost_matrix(G, N, targets)
    a, b = dot.marginals(G, targets, "uniform")
    T = dot.transport_plan(C, a, b, reg=0.1, solver=solver)
    assert torch.allclose(T.sum(1), a, atol=1e-6) and torch.allclose(T.sum(0), b, atol=1e-6)


def test_degenerate_plan_is_an_error_with_advice():
    C = torch.rand(10, 3, dtype=torch.float64) * 1e4      # unnormalised cost: Sinkhorn underflows
    a, b = torch.full((10,), 0.1, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    with pytest.raises(DotResizeError, match="raise reg"):
        dot.transport_plan(C, a, b, reg=1e-4, solver="sinkhorn", max_iter=5)


def test_cost_is_median_normalised_and_zero_on_targets():
    G, N, _ = _gram()
    targets = torch.tensor([1, 4])
    C = dot.cost_matrix(G, N, targets)
    assert C[1, 0].abs() < 1e-9 and C[4, 1].abs() < 1e-9
    assert C[C > 0].median() == pytest.approx(1.0)


def test_identity_plan_gives_identity_maps():
    n = 6
    T = torch.eye(n, dtype=torch.float64) / n
    for unmerge in ("ot", "pinv"):
        M, U = dot.width_map_from_plan(T, unmerge=unmerge)
        assert torch.allclose(M, torch.eye(n, dtype=torch.float64)) and torch.allclose(U, M)


def test_ls_unmerge_is_the_least_squares_reconstruction():
    G, N, X = _gram()
    M = torch.rand(12, 5, dtype=torch.float64)
    U, lam = ls_unmerge(M, G, reg=0.0)
    best = torch.linalg.lstsq(X @ M, X).solution
    assert lam == 0.0 and torch.allclose(U, best, atol=1e-8)


def test_ls_with_few_rows_picks_its_ridge_on_held_out_rows():
    """Barely more rows than features: plain least squares fits noise; the held-out rows pick a ridge toward
    the prior (plain selection) that predicts unseen rows better. Without held-out rows, reg is used as given."""
    torch.manual_seed(0)
    n, m = 240, 200
    W = torch.randn(n, 16, dtype=torch.float64)

    def rows(k):
        return torch.randn(k, 16, dtype=torch.float64) @ W.T + torch.randn(k, n, dtype=torch.float64)
    S = torch.eye(n, dtype=torch.float64)[:, :m]
    X, X_test = rows(300), rows(4000)      # rows 256…299 are held out: 256 rows fit 200 features
    hold = holdout_rows(300)
    G, G_hold = X.T @ X, X[hold].T @ X[hold]
    U, lam = ls_unmerge(S, G, 1e-8, prior=S.T, holdout=G_hold)
    U_plain, lam_plain = ls_unmerge(S, G, 1e-8)

    def test_error(U):
        return (X_test - X_test @ S @ U).pow(2).mean().item()
    assert lam_plain == 1e-8 and lam > 1e-8
    assert test_error(U) < 0.9 * test_error(U_plain)


def test_semi_plan_keeps_targets_pure_mass():
    G, N, _ = _gram()
    targets = torch.tensor([0, 2, 9])
    C = dot.cost_matrix(G, N, targets)
    a, _ = dot.marginals(G, targets, "energy")
    T = dot.semi_plan(C, a, targets, reg=0.05)
    assert torch.allclose(T.sum(1), a) and torch.equal(T[targets].diagonal(), a[targets])


def test_semi_plan_mass_interpolates_from_pruning_to_merging():
    G, N, _ = _gram()
    targets = torch.tensor([0, 2, 9])
    C = dot.cost_matrix(G, N, targets)
    a, _ = dot.marginals(G, targets, "energy")
    M0, _ = dot.width_map_from_plan(dot.semi_plan(C, a, targets, reg=0.05, mass=0.0), unmerge="pinv")
    assert torch.equal(M0, torch.eye(12, dtype=torch.float64)[:, targets])   # mass 0: a selection
    half = dot.semi_plan(C, a, targets, reg=0.05, mass=0.5)
    full = dot.semi_plan(C, a, targets, reg=0.05)
    others = torch.ones(12, dtype=torch.bool)
    others[targets] = False
    assert torch.allclose(half[others], 0.5 * full[others]) and torch.equal(half[targets], full[targets])


def test_pivoted_cholesky_skips_redundant_columns():
    X = torch.randn(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    X = torch.cat([X, 3 * X[:, :1]], dim=1)             # column 5 repeats column 0, louder
    chosen = pivoted_cholesky(X.T @ X, 5).tolist()
    assert 5 in chosen and 0 not in chosen


def test_transport_targets_keep_what_the_others_cannot_carry():
    """A duplicate moves onto its twin for free and a near-silent neuron costs little to move, so both go; on a
    small case the selection is the reverse greedy's, checked by brute force at every step."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 5, dtype=torch.float64, generator=g)
    X = torch.cat([X, 3 * X[:, :1], 0.01 * torch.randn(300, 1, dtype=torch.float64, generator=g)], dim=1)
    assert transport_targets(X.T @ X, torch.ones(7, dtype=torch.float64), 5).tolist() == [1, 2, 3, 4, 5]
    X = torch.randn(50, 12, dtype=torch.float64, generator=g) @ torch.randn(12, 12, dtype=torch.float64, generator=g)
    G, d = X.T @ X, torch.rand(12, dtype=torch.float64, generator=g)
    C = d[:, None] ** 2 * (G.diagonal()[:, None] - G ** 2 / G.diagonal()[None, :]).clamp_min(0)
    alive = list(range(12))
    while len(alive) > 4:
        alive.remove(min(alive, key=lambda t: C[:, [a for a in alive if a != t]].min(1).values.sum()))
    assert transport_targets(G, d, 4).tolist() == alive


def test_widths_are_rounded_and_gqa_divisible():
    a = analyze(*models.llama())
    plan = plan_widths(a, Targets(mlp=0.3, heads=0.3))
    mlp = [w for n, w in plan.widths.items() if n.startswith("mlp")]
    heads = [w for n, w in plan.widths.items() if n.startswith("heads")]
    assert mlp == [(64, None)] * 2 and all(q % kv == 0 for q, kv in heads)
    assert any("asked" in r for r in plan.rounding)


def test_fraction_out_of_range():
    with pytest.raises(DotResizeError, match=r"\(0, 1\)"):
        Targets(mlp=1.0)
    with pytest.raises(DotResizeError, match=r"\(0, 1\)"):
        Targets(heads=0.0)



def test_unbalanced_plan_moves_from_the_row_softmax_to_the_balanced_plan():
    """τ·KL(Tᵀ1 ‖ b) with the source fixed: τ → 0 is the semi-relaxed closed form, τ → ∞ meets b."""
    g = torch.Generator().manual_seed(0)
    C = torch.rand(12, 4, generator=g, dtype=torch.float64) * 3
    a = torch.rand(12, generator=g, dtype=torch.float64)
    a /= a.sum()
    b = torch.full((4,), 0.25, dtype=torch.float64)
    soft = torch.softmax(-C / 0.1, 1) * a[:, None]
    gaps = []
    for tau in (1e-4, 1.0, 1e4):
        T = dot.transport_plan(C, a, b, reg=0.1, solver="unbalanced", tau=tau)
        assert torch.allclose(T.sum(1), a, atol=1e-5)
        gaps.append((T.sum(0) - b).abs().sum().item())
        if tau == 1e-4:
            assert (T - soft).abs().max() < 1e-4
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3
