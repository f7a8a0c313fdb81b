"""Allocation of one budget over layers: the error curve is the least-squares error it claims, the greedy
spends the uniform plan's parameters, and the rules move units toward the layers that need them."""
import torch

from dotresize_fx.allocate import _greedy, _threshold, error_curve


def _explicit_error(X, W, keep):
    """min_U ‖X W − X_S U‖² by lstsq."""
    Y = X @ W
    U = torch.linalg.lstsq(X[:, keep], Y).solution
    return (Y - X[:, keep] @ U).pow(2).sum()


def test_error_curve_equals_explicit_least_squares_at_every_width():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    W = torch.randn(12, 5, generator=g, dtype=torch.float64)
    order = torch.randperm(12, generator=g)
    curve = error_curve(X.T @ X, W, order)
    explicit = torch.stack([_explicit_error(X, W, order[:k]) if k else (X @ W).pow(2).sum() for k in range(13)])
    # within the ridge's pull (λ = 1e-6 of the mean diagonal) of the exact errors
    assert (curve - explicit).abs().max() < 1e-5 * explicit[0]
    assert curve[-1] < 1e-5 * curve[0] and (curve[:-1] >= curve[1:]).all()


def _groups(*sizes):
    class G:
        def __init__(self, size):
            self.size = size
    return {f"g{i}": G(s) for i, s in enumerate(sizes)}


def test_greedy_gives_units_where_the_error_falls_most_within_the_budget():
    groups = _groups(8, 8)
    k = torch.arange(9, dtype=torch.float64)
    measured = {"g0": {"curve": 10.0 * (1 - k / 8) ** 2}, "g1": {"curve": 1.0 * (1 - k / 8) ** 2}}
    cost, floor = {"g0": 3, "g1": 3}, {"g0": 2, "g1": 2}
    widths = _greedy(measured, groups, cost, floor, budget=3 * 8, step=2)
    assert sum(cost[n] * w for n, w in widths.items()) == 24
    assert widths["g0"] > widths["g1"] >= 2


def test_threshold_keeps_the_units_above_one_normalised_threshold():
    groups = _groups(8, 8)
    measured = {"g0": {"scores": torch.tensor([8., 7, 6, 5, 1, 1, 1, 1])},
                "g1": {"scores": torch.tensor([3., 3, 3, 3, 3, 3, 2, 0])}}
    widths = _threshold(measured, groups, {"g0": 1, "g1": 1}, {"g0": 2, "g1": 2}, budget=10, step=2)
    assert sum(widths.values()) <= 10 and widths["g1"] >= widths["g0"]   # g1's scores are flat: all near its mean


def test_a_pass_with_curve_allocation_keeps_the_uniform_parameters_in_other_places():
    """prune with allocation=curve on a 2-layer Llama: non-uniform widths, every one a multiple of round_to,
    the same MLP parameters as the uniform plan, and the report says where they went."""
    import models
    from dotresize_fx.analyze import analyze
    from dotresize_fx.compress import PassSpec
    from passes import build_pass
    model, inputs = models.llama()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, models.VOCAB, (2, 16), generator=g),) for _ in range(6)]
    analysis = analyze(model, inputs)
    results = {}
    for rule in ("uniform", "curve"):
        p = build_pass(PassSpec.parse(f"prune:mlp=0.25,round_to=4,allocation={rule}")[0], analysis, inputs, batches)
        results[rule] = (p(model).graph_module, p.report)
    uniform, curve = (sum(q.numel() for q in m.parameters()) for m, _ in results.values())
    widths = results["curve"][1]["allocation"]["widths"]
    assert uniform == curve and len(set(widths.values())) > 1 and all(w % 4 == 0 for w in widths.values())
    applied = results["curve"][1]["widths"]
    assert all(applied.get(n, analysis.group(n).size) == w for n, w in widths.items())
