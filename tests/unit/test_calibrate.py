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


def test_layer_by_layer_with_per_block_arguments_equals_its_maps_applied_at_once():
    from dotresize_fx.compress import PassSpec
    from dotresize_fx.rewrite import apply
    from passes import build_pass
    model, inputs = models.alternating_windows()
    a = analyze(model, inputs)
    batches = [(torch.randint(0, models.VOCAB, (2, 10), generator=torch.Generator().manual_seed(i)),)
               for i in range(3)]
    p = build_pass(PassSpec.parse("dotresize:mlp=0.25")[0], a, inputs, batches)
    p.keep_maps = True
    layerwise = p(model).graph_module
    assert p.report["layerwise"] and set(p.report["ls_reg"]) == {g.name for g in a.by_kind("mlp")}
    at_once, _ = apply(model, a, p.maps)
    with torch.no_grad():
        assert torch.equal(layerwise(*inputs), at_once(*inputs))
