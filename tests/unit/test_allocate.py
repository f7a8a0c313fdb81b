"""Allocation of one budget over layers: the error curve is the least-squares error it claims, the greedy
spends the uniform plan's parameters, and the rules move units toward the layers that need them."""
import pytest
import torch

from dotresize_fx.allocate import Ladder, _greedy, _threshold, error_curve, subset_error


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


def test_subset_error_is_the_least_squares_error_of_that_subset():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(100, 8, generator=g, dtype=torch.float64)
    W = torch.randn(8, 3, generator=g, dtype=torch.float64)
    keep = torch.tensor([6, 1, 3])
    assert abs(subset_error(X.T @ X, W, keep) - float(_explicit_error(X, W, keep))) < 1e-6 * float((X @ W).pow(2).sum())


def _mlp_ladder(scale, cost=3, floor=2, size=8, step=2):
    widths = list(range(floor, size + 1, step))
    return Ladder([(m, None) for m in widths], [cost * m for m in widths],
                  [scale * (1 - m / size) ** 2 for m in widths])


def test_greedy_gives_units_where_the_error_falls_most_within_the_budget():
    ladders = {"g0": _mlp_ladder(10.0), "g1": _mlp_ladder(1.0)}
    at = _greedy(ladders, budget=3 * 8)
    widths = {n: ladders[n].widths[i][0] for n, i in at.items()}
    assert sum(3 * w for w in widths.values()) == 24
    assert widths["g0"] > widths["g1"] >= 2


def test_greedy_jumps_over_a_rung_that_buys_nothing():
    """A heads ladder whose middle rung lowers no error: the move straight to the top rung is taken, and the
    MLP pays for it."""
    heads = Ladder([(3, 1), (6, 2), (9, 3)], [30, 60, 90], [5.0, 5.0, 0.0])
    mlp = _mlp_ladder(1.0, cost=1, floor=4, size=40, step=4)
    at = _greedy({"heads": heads, "mlp": mlp}, budget=30 + 60 + 20)
    assert heads.widths[at["heads"]] == (9, 3)
    assert heads.params[at["heads"]] + mlp.params[at["mlp"]] <= 110


def test_threshold_keeps_the_units_above_one_normalised_threshold():
    groups = _groups(8, 8)
    scores = {"g0": torch.tensor([8., 7, 6, 5, 1, 1, 1, 1]), "g1": torch.tensor([3., 3, 3, 3, 3, 3, 2, 0])}
    widths = _threshold(scores, groups, {"g0": 1, "g1": 1}, {"g0": 2, "g1": 2}, budget=10, step=2)
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


def _run(model, inputs, config):
    from dotresize_fx.analyze import analyze
    from dotresize_fx.compress import PassSpec
    from passes import build_pass
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 128, (2, 16), generator=g),) for _ in range(6)]
    analysis = analyze(model, inputs)
    p = build_pass(PassSpec.parse(config)[0], analysis, inputs, batches)
    return p(model).graph_module, p.report


def test_fisher_gives_nothing_to_a_layer_the_loss_hardly_sees():
    """Block 1 of a nanoGPT adds its MLP's output scaled by 0.01: the MLP's own error (what `curve` measures,
    at its consumer's output) is as large as block 0's, but the loss hardly moves, so fisher cuts it to the
    floor and keeps block 0 whole (which then leaves the plan); curve does not."""
    import models

    class QuietBlock(models._NanoBlock):
        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + 0.01 * self.mlp_proj(torch.nn.functional.gelu(self.c_fc(self.ln_2(x))))
    model, inputs = models.nanogpt()
    quiet = QuietBlock(32, 4)
    quiet.load_state_dict(model.blocks[1].state_dict())
    model.blocks[1] = quiet.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, fisher = _run(model, inputs, "prune:mlp=0.25,unmerge=ls,allocation=fisher")
    _, curve = _run(model, inputs, "prune:mlp=0.25,unmerge=ls,allocation=curve")
    assert fisher["allocation"]["widths"] == {"mlp.0": 128, "mlp.1": 64}
    assert "mlp.0" not in fisher["widths"] and fisher["widths"]["mlp.1"] == 64
    assert curve["allocation"]["widths"]["mlp.1"] > 64
    # the dense model is left as it was: weights, requires_grad flags, no gradients, its own block forwards
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(q.requires_grad and q.grad is None for q in model.parameters())
    assert all("forward" not in vars(block) for block in model.blocks)


def test_a_budget_with_fisher_spreads_one_reduction_over_mlp_and_heads():
    """budget=0.3 as an MLP cut (allocation=uniform) against the same budget spread by fisher (the default for
    a budget) over MLP and heads: no more parameters kept, the heads are allocated too, and every kept width is
    one the rewrite applied."""
    import models
    from dotresize_fx.evaluate import parameter_counts
    model, inputs = models.llama()
    uniform, ur = _run(model, inputs, "prune:budget=0.3,round_to=4,unmerge=ls,allocation=uniform")
    spread, sr = _run(model, inputs, "prune:budget=0.3,round_to=4,unmerge=ls")
    assert "allocation" not in ur and sr["allocation"]["rule"] == "fisher"
    dense = parameter_counts(model)["non_embedding"]
    kept = {k: parameter_counts(m)["non_embedding"] for k, m in (("uniform", uniform), ("spread", spread))}
    assert kept["spread"] <= kept["uniform"] <= 0.72 * dense   # 30% asked, rounded to multiples of 4
    assert ur["budget"]["mlp_fraction"] == sr["budget"]["mlp_fraction"] > 0.3
    assert set(sr["allocation"]["kv_heads"]) == {"heads.0", "heads.1"}
    for n, m in sr["allocation"]["widths"].items():
        assert sr["widths"].get(n, m) == m
    assert spread(*inputs).logits.shape == model(*inputs).logits.shape


@pytest.mark.parametrize("config, message", [
    ("prune:budget=0.2,mlp=0.1", "instead of mlp/heads"),
    ("prune:budget=1.5", "must be in (0, 1)"),
    ("pca:budget=0.2", "pca reduces the residual stream only"),
])
def test_a_budget_that_cannot_be_met_as_given_is_refused(config, message):
    from dotresize_fx.compress import PassSpec
    from dotresize_fx.errors import DotResizeError
    from passes import width_config
    with pytest.raises(DotResizeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        width_config(PassSpec.parse(config)[0])
