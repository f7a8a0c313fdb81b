"""The least-squares fits: the selection shortcut equals the general ridge fit, and the λ scan picks the
held-out minimum."""
import torch

from dotresize_fx import fit
from dotresize_fx.maps import selection_matrix


def _data(seed=0, rows=300, n=16):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    hold = (torch.arange(rows) // 20) % 5 == 4
    return X.T @ X, X[hold].T @ X[hold]


def test_selection_shortcut_equals_the_general_ridge_fit():
    G, G_hold = _data()
    S = selection_matrix(16, torch.tensor([0, 2, 3, 7, 8, 11, 12, 15]))
    U, lam = fit.ls_unmerge(S, G, 1e-4, prior=S.T, holdout=G_hold)
    U_ref, lam_ref = fit.ridge_fit(S.T @ G @ S, S.T @ G, 1e-4, S.T, S.T @ G_hold @ S, S.T @ G_hold)
    assert lam == lam_ref and torch.allclose(U, U_ref, atol=1e-10)
    assert torch.equal(U[:, S.argmax(0)], torch.eye(8, dtype=torch.float64))   # kept channels pass through


def test_the_lambda_scan_finds_the_held_out_minimum():
    G, G_hold = _data(1, rows=60)   # few rows for the width: a ridge helps
    S = selection_matrix(16, torch.arange(0, 16, 2))
    A, B, A_h, B_h = S.T @ G @ S, S.T @ G, S.T @ G_hold @ S, S.T @ G_hold
    regs = sorted({1e-4, *fit.LS_REGS})
    errors = {lam: fit._holdout_error(fit._ridge(A - A_h, B - B_h, lam, S.T), A_h, B_h) for lam in regs}
    assert fit._pick_reg(A - A_h, B - B_h, S.T, A_h, B_h, regs) == min(errors, key=errors.get)


def test_row_space_fit_equals_the_gram_fit_when_rows_are_fewer_than_channels():
    """384 rows of 400 channels (rank-deficient Grams: λ decides), every 5th run of 64 rows held out, as the
    calibration keeps them: the push-through solve picks the same λ and gives the same U as the Gram path."""
    from dotresize_fx.calibrate import Stats
    g = torch.Generator().manual_seed(3)
    n = 400
    X = torch.randn(384, 40, generator=g, dtype=torch.float64) @ torch.randn(40, n, generator=g, dtype=torch.float64)
    X += 0.1 * torch.randn(384, n, generator=g, dtype=torch.float64)
    stats = Stats.zeros(n, holdout=True)
    stats.add(X)
    assert stats.rows is not None and stats.rows[1].sum() == 64
    S = selection_matrix(n, torch.arange(0, n, 2))
    for reg in (1e-4, 0.05):
        U_rows, lam_rows = fit.ls_unmerge(S, stats.gram, reg, prior=S.T, holdout=stats.holdout, rows=stats.rows)
        U_gram, lam_gram = fit.ls_unmerge(S, stats.gram, reg, prior=S.T, holdout=stats.holdout)
        assert lam_rows == lam_gram and not torch.equal(U_rows, S.T)
        assert (U_rows - U_gram).abs().max() < 1e-8 * U_gram.abs().max()


def test_rows_are_dropped_once_they_reach_the_channel_count():
    from dotresize_fx.calibrate import Stats
    stats = Stats.zeros(8, holdout=True)
    stats.add(torch.randn(5, 8, dtype=torch.float64))
    assert stats.rows[0].shape == (5, 8)
    stats.add(torch.randn(5, 8, dtype=torch.float64))
    assert stats.rows is None and stats.count == 10
