"""Merging is exact where it should be: duplicated neurons and heads, a residual stream inside span(M), the
GQA path that keeps every kv group, and least squares on a model whose blocks do not chain."""
from pathlib import Path

import torch

import models
from dotresize_fx.analyze import analyze
from dotresize_fx.compress import Job, PassSpec, run
from dotresize_fx.load import load
from dotresize_fx.maps import WidthMap
from dotresize_fx.rewrite import apply

FACTORY = str(Path(__file__).resolve().parents[1] / "models.py")


def _run(spec, passes, **kw):
    return run(Job(f"{FACTORY}:{spec}", PassSpec.parse(passes), data="random", calib_samples=4, progress=False,
                   **kw))


def _max_diff(a, b, inputs):
    with torch.no_grad():
        return (a(*inputs).logits - b(*inputs).logits).abs().max().item()


def test_duplicated_neurons_merge_exactly_and_pruning_them_does_not():
    dense, inputs = models.llama_duplicated_neurons()
    merged = _run("llama_duplicated_neurons", "dotresize:mlp=0.25,unmerge=ot")
    pruned = _run("llama_duplicated_neurons", "prune:mlp=0.25")
    assert merged["widths"] == pruned["widths"] == {"mlp.0": 72, "mlp.1": 72}
    assert _max_diff(merged["_model"], dense, inputs) < 1e-10
    assert _max_diff(pruned["_model"], dense, inputs) > 1e-4


def test_duplicated_heads_merge_exactly_and_pruning_them_does_not():
    dense, inputs = models.llama_duplicated_heads()
    merged = _run("llama_duplicated_heads", "dotresize:heads=0.25,unmerge=ot")
    pruned = _run("llama_duplicated_heads", "prune:heads=0.25")
    assert merged["widths"] == {"heads.0": 3, "heads.1": 3}
    assert _max_diff(merged["_model"], dense, inputs) < 1e-10
    assert _max_diff(pruned["_model"], dense, inputs) > 1e-4


def _stream_in_subspace(model, inputs, V):
    """Project every writer of the residual stream onto span(V): the stream then lives there."""
    a = analyze(model, inputs)
    g = a.by_kind("residual")[0]
    P = V @ V.T
    with torch.no_grad():
        for m in g.producers():
            p = model.get_parameter(m.param)
            p.copy_((p.movedim(m.dim, -1) @ P.to(p.dtype)).movedim(-1, m.dim))
    return a, g


def test_residual_merge_is_exact_on_data_in_its_span():
    """m < n: an RMSNorm stream in span(Q) maps by Q exactly; a LayerNorm stream (zero-mean) in an
    (m−1)-dim subspace of span(M) too, the one direction left spent on the all-ones vector."""
    gen = torch.Generator().manual_seed(3)
    model, inputs = models.llama_tiny_eps()
    model = model.double()
    Q = torch.linalg.qr(torch.randn(64, 40, generator=gen, dtype=torch.float64))[0]
    a, g = _stream_in_subspace(model, inputs, Q)
    new, _ = apply(model, a, {g.name: WidthMap(g.name, Q, Q.T.contiguous())})
    assert new.config.hidden_size == 40 and _max_diff(new, model, inputs) < 1e-5   # HF RMSNorm runs in float32

    model, inputs = models.gpt2_tiny_eps()
    model = model.double()
    Z = torch.randn(64, 40, generator=gen, dtype=torch.float64)
    V = torch.linalg.qr(Z - Z.mean(0))[0]                        # 40 zero-mean orthonormal directions
    a, g = _stream_in_subspace(model, inputs, V[:, :39])
    M = torch.cat([V[:, :39], 0.1 * V[:, 39:]], dim=1)           # span(M) ⊃ the stream; one spare direction
    new, _ = apply(model, a, {g.name: WidthMap(g.name, M, torch.linalg.pinv(M))})
    assert new.transformer.wte.weight.shape[1] == 40 and _max_diff(new, model, inputs) < 1e-8
    lossy, _ = apply(model, a, {g.name: WidthMap(g.name, V[:, :30], V[:, :30].T.contiguous())})
    assert _max_diff(lossy, model, inputs) > 1e-3                 # and the check can fail


def test_heads_removed_evenly_within_kv_groups(tmp_path):
    """8 q heads in 2 kv groups, a quarter removed: 3 q heads stay in each group, both kv heads stay."""
    report = _run("llama_gqa8", "prune:heads=0.25", out=str(tmp_path / "o"))
    model = report["_model"]
    assert report["widths"] == {"heads.0": 6, "heads.1": 6}
    attn = model.model.layers[0].self_attn
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (6, 2)
    assert attn.q_proj.out_features == 6 * 8 and attn.k_proj.out_features == 2 * 8
    assert attn.num_key_value_groups == 3
    ids = models._ids()[0]
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "o").model(ids).logits, model(ids).logits)


def test_least_squares_helps_a_model_whose_blocks_do_not_chain():
    """Blocks that return only their branch are calibrated as one block; `ls` still refits the consumers on
    real activations and beats the plan's own unmerge on unseen inputs."""
    dense, _ = models.outside_residual()
    ls = _run("outside_residual", "dotresize:mlp=0.5")
    ot = _run("outside_residual", "dotresize:mlp=0.5,unmerge=ot")
    assert ls["passes"][0]["layerwise_skipped"] and set(ls["passes"][0]["ls_reg"]) == {"mlp.0", "mlp.1"}
    ids = torch.randint(0, models.VOCAB, (8, 12), generator=torch.Generator().manual_seed(9))

    def err(r):
        with torch.no_grad():
            return (r["_model"](ids) - dense(ids)).pow(2).mean().item()
    assert err(ls) < 0.8 * err(ot)
