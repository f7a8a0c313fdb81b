"""Streaming statistics, block discovery and the block runner (DESIGN §5, §5.6)."""
import torch

import models
from dotresize_fx.analyze import analyze
from dotresize_fx.blocks import BlockRunner, block_list, blocks
from dotresize_fx.calibrate import CrossStats, Stats, collect_stats, holdout_rows


def test_stats_stream_the_gram_and_its_held_out_share():
    X = torch.randn(700, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = Stats.zeros(6, holdout=True)
    for part in X.split(350):
        s.add(part)
    assert s.count == 700 and torch.allclose(s.gram, X.T @ X)
    hold = torch.cat([part[holdout_rows(350)] for part in X.split(350)])
    assert torch.allclose(s.holdout, hold.T @ hold) and hold.shape[0] == 2 * 64


def test_cross_stats_pair_rows():
    g = torch.Generator().manual_seed(1)
    H, H2 = torch.randn(200, 5, generator=g), torch.randn(200, 3, generator=g)
    c = CrossStats.zeros(3, 5)
    c.add(H2[:120], H[:120])
    c.add(H2[120:], H[120:])
    H, H2 = H.double(), H2.double()
    assert torch.allclose(c.A, H2.T @ H2) and torch.allclose(c.B, H2.T @ H)


def test_collect_stats_sees_the_consumer_input_and_removes_its_hooks():
    model, inputs = models.llama()
    a = analyze(model, inputs)
    g = a.by_kind("mlp")[0]
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    cal = collect_stats(model, a, [inputs], [g.name], progress=False)
    h.remove()
    X = seen[0].reshape(-1, g.size).double()
    assert torch.allclose(cal.stats[g.name].gram, X.T @ X)
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks


def test_blocks_that_chain_are_found_and_others_are_one_block():
    model, inputs = models.llama()
    assert block_list(model, analyze(model, inputs), inputs)[0] == "model.layers"
    model, inputs = models.outside_residual()
    found = blocks(model, analyze(model, inputs), [inputs])
    assert found.whole and found.modules == [model]


def test_each_block_runs_with_its_own_arguments():
    """Alternating window masks: moving the hidden states through the blocks with each block's own mask gives
    the model's real last hidden states (block 0's mask reused everywhere would not)."""
    model, inputs = models.alternating_windows()
    a = analyze(model, inputs)
    order = blocks(model, a, [inputs])
    assert order.prefix == "blocks"
    runner = BlockRunner(model, order, [inputs])
    assert runner.per_block
    for b in range(len(order.modules)):
        runner.advance(b)
    out = []
    hook = model.blocks[-1].register_forward_hook(lambda m, args, o: out.append(o))
    with torch.no_grad():
        model(*inputs)
    hook.remove()
    assert torch.equal(runner.inputs[0][0][0], out[0])
    model, inputs = models.llama()
    shared = BlockRunner(model, blocks(model, analyze(model, inputs), [inputs]), [inputs])
    assert not shared.per_block     # Llama's blocks all get block 0's arguments: nothing stored per block


def _pass_keeping_maps(model, inputs, spec: str):
    """(analysis, 3 random batches, the pass run on `model` keeping its maps, the resized model)."""
    from dotresize_fx.compress import PassSpec
    from passes import build_pass
    a = analyze(model, inputs)
    batches = [(torch.randint(0, models.VOCAB, (2, 10), generator=torch.Generator().manual_seed(i)),)
               for i in range(3)]
    p = build_pass(PassSpec.parse(spec)[0], a, inputs, batches)
    p.keep_maps = True
    return a, batches, p, p(model).graph_module


def test_layer_by_layer_with_per_block_arguments_equals_its_maps_applied_at_once():
    from dotresize_fx.rewrite import apply
    model, inputs = models.alternating_windows()
    a, batches, p, layerwise = _pass_keeping_maps(model, inputs, "dotresize:mlp=0.25")
    assert p.report["layerwise"] and set(p.report["ls_reg"]) == {g.name for g in a.by_kind("mlp")}
    at_once, _ = apply(model, a, p.maps)
    with torch.no_grad():
        assert torch.equal(layerwise(*inputs), at_once(*inputs))


def test_per_layer_bases_are_calibrated_on_the_projected_prefix_that_the_rewrite_computes():
    """PCA per layer: the rewritten model computes the dense one with each block's stream projected onto its
    basis (`stages.projected`), and block 1's basis is the PCA of the stream entering, crossing and leaving
    block 1 when block 0, projected, feeds it (not of the dense stream)."""
    from dotresize_fx.calibrate import Calibration, observing, stream_rows
    from dotresize_fx.maps import WidthMap
    from dotresize_fx.stages import projected
    model, inputs = models.llama()
    a, batches, p, new = _pass_keeping_maps(model, inputs, "pca:residual=0.25,residual_maps=per_layer")
    g = a.by_kind("residual")[0]
    stages, order = p.maps[g.name].stages, blocks(model, a, batches)
    assert len(stages) == len(order.modules) + 1 and torch.equal(stages[-1].merge, stages[-2].merge)
    with torch.no_grad():
        with projected(model, g, order, stages):
            want = model(*inputs).logits
        got, dense = new(*inputs).logits, model(*inputs).logits
    # to float32 rounding and the norms' ε, which the narrower stream sees scaled by m/n
    assert (got - want).abs().max() < 1e-3 * want.abs().max() < 0.1 * (got - dense).abs().max()
    # the pass measures the same on its probe (these inputs) and reports it
    assert abs(p.report["per_layer_vs_simulated_prefix"][g.name] - (got - want).abs().max().item()) < 1e-6

    def block_1_basis(earlier):
        """PCA of block 1's norms' inputs and its output, with block 0 projected by `earlier`."""
        cal, leaving = Calibration(), Stats.zeros(g.size)
        keep = WidthMap(g.name, torch.eye(g.size, dtype=torch.float64), torch.eye(g.size, dtype=torch.float64))
        hook = order.modules[1].register_forward_hook(lambda _m, _a, out: leaving.add(stream_rows(out[0] if isinstance(out, tuple) else out, False)))
        with torch.no_grad(), projected(model, g, order, [earlier, keep, keep]), \
                observing(model, a, [g.name], cal, per_norm=True):
            for batch in batches:
                model(*batch)
        hook.remove()
        norms = [cal.norms[n] for n in g.norms if n.startswith(f"{order.prefix}.1.")]
        Q = p.group_map(model, g, stages[1].m, None, sum(norms, leaving)).merge
        return Q @ Q.T
    P1 = stages[1].merge @ stages[1].merge.T
    dense = WidthMap(g.name, torch.eye(g.size, dtype=torch.float64), torch.eye(g.size, dtype=torch.float64))
    assert torch.allclose(block_1_basis(stages[0]), P1, atol=1e-8)
    assert (block_1_basis(dense) - P1).abs().max() > 1e-3   # the dense stream gives another basis
