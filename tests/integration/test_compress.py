"""compress on tiny models end to end: passes, save, reload (stock HF and plan replay), bad input."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

import models
from dotresize_fx.cli import main
from dotresize_fx.compress import Job, PassSpec, run
from dotresize_fx.errors import DotResizeError
from dotresize_fx.load import load

FACTORY = str(Path(__file__).resolve().parents[1] / "models.py")


def _checksum(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


def _job(spec, passes, tmp_path, **kw):
    return Job(f"{FACTORY}:{spec}", PassSpec.parse(passes), data="random", calib_samples=4,
               out=str(tmp_path / "out"), progress=False, **kw)


@pytest.mark.parametrize("passes", ["prune:mlp=0.25,heads=0.5,residual=0.25",
                                    "prune:mlp=0.25,unmerge=ls",
                                    "dotresize:mlp=0.25,residual=0.25,heads=0.5",
                                    "dotresize:mlp=0.25,marginals=uniform,unmerge=ot",
                                    "prune:mlp=0.25 dotresize:mlp=0.25",
                                    "pca:residual=0.25"])
def test_llama_compress_saves_stock_checkpoint_that_reloads(passes, tmp_path):
    from transformers import AutoModelForCausalLM
    report = run(_job("llama", passes, tmp_path))
    assert report["nonembed_params_after"] < report["nonembed_params_before"]
    model = report["_model"]
    ids = models._ids()[0]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    replayed = load(tmp_path / "out").model
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(stock(ids).logits, want)
        assert torch.equal(replayed(ids).logits, want)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["widths"] == report["widths"]


def test_mlp_quarter_gives_intermediate_size_and_probe_change(tmp_path):
    report = run(_job("llama", "prune:mlp=0.25", tmp_path))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["intermediate_size"] == 72
    assert report["passes"][0]["probe_max_abs_diff"] > 0
    # the checkpoint generates with its KV cache, as the source did; the in-memory model is left as it was
    assert cfg["use_cache"] is True and report["_model"].config.use_cache is False


def test_residual_reduction_saves_llama_config_with_head_dim(tmp_path):
    run(_job("llama", "prune:residual=0.25", tmp_path))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["hidden_size"] == 48 and cfg["head_dim"] == 16 and cfg["tie_word_embeddings"] is False


def test_a_budget_spread_per_layer_saves_and_reloads(tmp_path):
    """--budget with the default fisher allocation: MLP and heads widths chosen per layer (a config cannot say
    that, so the plan is replayed), the same logits after reload, and the budget kept."""
    report = run(_job("llama", "prune:budget=0.3,round_to=4,unmerge=ls", tmp_path))
    allocation = report["passes"][0]["allocation"]
    assert allocation["rule"] == "fisher" and allocation["params_kept"] <= allocation["params_uniform"]
    assert report["nonembed_reduction"] >= 0.28
    replayed = load(tmp_path / "out").model
    ids = models._ids()[0]
    with torch.no_grad():
        assert torch.equal(replayed(ids).logits, report["_model"](ids).logits)


def test_non_hf_factory_replays_from_plan(tmp_path):
    report = run(_job("nanogpt", "prune:mlp=0.5", tmp_path))
    assert not (tmp_path / "out" / "config.json").exists()
    replayed = load(tmp_path / "out").model
    ids = models._ids()[0]
    with torch.no_grad():
        assert torch.equal(replayed(ids), report["_model"](ids))


def test_input_model_is_not_modified(tmp_path):
    model, _ = models.llama()
    before = _checksum(model)
    run(_job("llama", "dotresize:mlp=0.5,residual=0.25", tmp_path))
    assert _checksum(models.llama()[0]) == before


@pytest.mark.parametrize("args, message", [
    (["--mlp", "1.5"], "must be in (0, 1)"),
    (["--residual", "0.2", "--model-spec", "bert"], "no residual group is resizable"),
])
def test_bad_fractions_and_groups(args, message, tmp_path, capsys):
    spec = "bert" if "--model-spec" in args else "llama"
    args = [a for a in args if a not in ("--model-spec", "bert")]
    rc = main(["compress", f"{FACTORY}:{spec}", "--method", "prune", *args, "--data", "random",
               "--calib-samples", "2", "--out", str(tmp_path / "o")])
    assert rc == 2 and message in capsys.readouterr().err


def test_existing_output_is_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    rc = main(["compress", f"{FACTORY}:llama", "--method", "prune", "--mlp", "0.25", "--data", "random",
               "--calib-samples", "2", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_per_layer_widths_save_our_format_and_replay(tmp_path):
    """Different MLP widths per block: not a stock config, so safetensors + plan, replayed exactly."""
    from dotresize_fx.analyze import analyze
    from dotresize_fx.maps import WidthMap
    from dotresize_fx.rewrite import apply
    from dotresize_fx.save import save
    model, inputs = models.llama()
    a = analyze(model, inputs)
    m0, m1 = a.by_kind("mlp")
    maps = {m0.name: WidthMap.selection(m0.name, 96, torch.arange(64)),
            m1.name: WidthMap.selection(m1.name, 96, torch.arange(0, 96, 3))}
    new, report = apply(model, a, maps)
    assert not report.stock
    save(new, tmp_path / "o", source=f"{FACTORY}:llama", stock=report.stock)
    assert not (tmp_path / "o" / "config.json").exists()
    again = load(tmp_path / "o").model
    assert again.model.layers[1].mlp.down_proj.in_features == 32
    with torch.no_grad():
        assert torch.equal(again(*inputs).logits, new(*inputs).logits)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
@pytest.mark.parametrize("passes", ["dotresize:residual=0.25", "pca:residual=0.25"])
def test_layernorm_residual_merges_and_replays_from_plan(arch, passes, tmp_path):
    """A pre-LN LayerNorm stream is centred and mapped; GPT-2/OPT derive head_dim from hidden_size, so the
    narrower model is not a stock config: saved in our format and replayed exactly."""
    report = run(_job(arch, passes, tmp_path))
    assert report["widths"]["residual.0"] == 48
    assert report["graph_check_max_abs_diff"] < 1e-4
    plan = json.loads((tmp_path / "out" / "resize_plan.json").read_text())
    assert not plan["stock"] and not (tmp_path / "out" / "config.json").exists()
    replayed = load(tmp_path / "out").model
    ids = models._ids()[0]
    with torch.no_grad():
        assert torch.equal(replayed(ids).logits, report["_model"](ids).logits)


def test_layernorm_merge_keeps_the_function_on_the_kept_subspace():
    """A merge whose span holds the whole (centred) stream loses nothing: only the 1-direction is spent."""
    from dotresize_fx.analyze import analyze
    from dotresize_fx.maps import WidthMap
    from dotresize_fx.rewrite import apply
    model, inputs = models.gpt2()
    a = analyze(model, inputs)
    g = a.by_kind("residual")[0]
    n = g.size
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    new, _ = apply(model.double(), a, {g.name: WidthMap(g.name, Q, Q.T.contiguous())})
    lossy, _ = apply(model.double(), a, {g.name: WidthMap(g.name, Q[:, :n // 2], Q[:, :n // 2].T.contiguous())})
    with torch.no_grad():
        want = model(*inputs).logits
        assert (new(*inputs).logits - want).abs().max() < 1e-10
        assert (lossy(*inputs).logits - want).abs().max() > 1e-3  # and the check can fail


def test_channelwise_stream_refuses_merges_but_prunes(tmp_path):
    """MLP-Mixer's token MLP applies GELU to each residual channel: only keeping channels is exact."""
    with pytest.raises(DotResizeError, match="aten.gelu"):
        run(_job("mixer", "dotresize:residual=0.25", tmp_path))
    report = run(_job("mixer", "prune:residual=0.25", tmp_path))
    assert report["widths"]["residual.0"] == 24


def test_widths_derived_from_shapes_in_forward_resize_as_a_program(tmp_path):
    """nanoGPT splits qkv by x.size(-1) and views by n_head: its eager forward cannot run with a narrower
    residual or fewer heads, its captured program can (the graph literals are patched); saved as model.pt2 and
    exported to ONNX from that program."""
    report = run(_job("nanogpt", "prune:residual=0.25,heads=0.5", tmp_path, onnx=True))
    assert report["rewrite_path"] == "program" and report["widths"]["residual.0"] == 24
    assert report["onnx"]["max_abs_diff"] < 1e-4
    assert (tmp_path / "out" / "model.pt2").is_file() and not (tmp_path / "out" / "model.safetensors").exists()
    ids = models._ids()[0]
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "out").model(ids), report["_model"](ids))
        assert torch.equal(torch.export.load(str(tmp_path / "out" / "model.pt2")).module()(ids),
                           report["_model"](ids))


@pytest.mark.parametrize("arch", ["gpt2", "opt", "phi3", "gemma", "qwen2", "mistral"])
def test_every_width_of_hf_architectures_compresses_and_reloads(arch, tmp_path):
    """MLP, heads and residual at once, layer by layer: GPT-2's Conv1D/split_size and Phi-3's config-read head
    counts are kept in step while the model runs between blocks; the result reloads to identical logits."""
    from transformers import AutoModelForCausalLM
    report = run(_job(arch, "dotresize:mlp=0.25,heads=0.5,residual=0.25", tmp_path))
    assert report["graph_check_max_abs_diff"] < 1e-4
    assert {w for n, w in report["widths"].items() if n.startswith("heads")} == {2}
    ids = models._ids()[0]
    plan = json.loads((tmp_path / "out" / "resize_plan.json").read_text())
    with torch.no_grad():
        want = report["_model"](ids).logits
        assert torch.equal(load(tmp_path / "out").model(ids).logits, want)
        if plan["stock"]:
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits, want)
    assert plan["stock"] == (arch not in ("gpt2", "opt"))  # those derive head_dim from hidden_size


@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "qwen3", "olmo2", "llama_mqa"])
@pytest.mark.parametrize("method", ["prune", "dotresize"])
def test_decoder_families_compress_mlp_and_heads_and_reload(arch, method, tmp_path):
    """Gemma 3 (one kv head, q/k norms, sandwich norms, sliding windows), Gemma 2, Qwen3, OLMo-2 and MQA Llama:
    MLP and q heads (within the kv groups) resize layer by layer, and the result reloads to identical logits,
    from the stock checkpoint too."""
    from transformers import AutoModelForCausalLM
    report = run(_job(arch, f"{method}:mlp=0.25,heads=0.5", tmp_path))
    assert report["graph_check_max_abs_diff"] < 1e-4
    assert {w for n, w in report["widths"].items() if n.startswith("heads")} == {2}
    assert {w for n, w in report["widths"].items() if n.startswith("mlp")} == {72}
    ids = models._ids()[0]
    plan = json.loads((tmp_path / "out" / "resize_plan.json").read_text())
    with torch.no_grad():
        want = report["_model"](ids).logits
        assert torch.equal(load(tmp_path / "out").model(ids).logits, want)
        assert plan["stock"]
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits, want)


@pytest.mark.parametrize("passes,width", [("pca:residual=0.25,residual_maps=per_layer", 48),
                                          ("dotresize:residual=0.25,residual_maps=per_layer", 48),
                                          ("pca:residual=0.22,residual_maps=per_layer,round_to=2", 50)])
def test_per_layer_residual_maps_add_skip_adapters_that_save_and_export(passes, width, tmp_path):
    """One basis per block: an m×m adapter on each block's output, our format, replayed and exported exactly;
    not stock, so the width need not be a multiple of the 4 heads."""
    import onnxruntime as ort
    from dotresize_fx.export import to_onnx
    report = run(_job("llama", passes, tmp_path))
    model = report["_model"]
    adapters = [n for n, _ in model.named_parameters() if n.endswith("skip_adapter")]
    assert adapters == ["model.layers.0.skip_adapter", "model.layers.1.skip_adapter"]
    assert tuple(model.model.layers[0].skip_adapter.shape) == (width, width)
    plan = json.loads((tmp_path / "out" / "resize_plan.json").read_text())
    assert not plan["stock"] and plan["skip_adapters"] == ["model.layers.0", "model.layers.1"]
    ids = models._ids()[0]
    sess = ort.InferenceSession(str(to_onnx(model, (ids,), tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(load(tmp_path / "out").model(ids).logits, want)
        model.model.layers[0].skip_adapter.zero_()  # the adapter is really on the path
        assert (model(ids).logits - want).abs().max() > 1e-3
    from dotresize_fx.export import _feed
    got = sess.run(["logits"], _feed(sess, ids.numpy()))[0]
    assert abs(got - want.numpy()).max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_residual_refit_fits_each_norms_readers_on_the_resized_prefix(arch, tmp_path):
    """RMSNorm and LayerNorm streams: with every norm's readers refitted block by block (the final norm's, the
    LM head, too), held-out logits are nearer the dense model's than with the map's own readers; the output is
    saved as the map alone is (stock for Llama) and reloads to the same logits. Without a residual target the
    option is refused."""
    def job(passes, out):
        return Job(f"{FACTORY}:{arch}", PassSpec.parse(passes), data="random", calib_samples=16, out=str(out),
                   progress=False)
    plain = run(job("pca:residual=0.25", tmp_path / "a"))["_model"]
    report = run(job("pca:residual=0.25,residual_refit=1", tmp_path / "b"))
    dense, _ = getattr(models, arch)()
    ids = torch.randint(0, models.VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = dense(ids).logits
        err = {name: (m(ids).logits - want).norm().item() for name, m in (("plain", plain),
                                                                          ("refit", report["_model"]))}
        assert torch.equal(load(tmp_path / "b").model(ids).logits, report["_model"](ids).logits)
    assert err["refit"] < err["plain"]   # random weights: dropped directions are barely predictable
    refitted = report["passes"][0]["residual_refit"]
    layers = dense.config.num_hidden_layers
    assert len(refitted) == 2 * layers + 1 and ("model.norm" in refitted or "transformer.ln_f" in refitted)
    stock = [json.loads((tmp_path / d / "resize_plan.json").read_text())["stock"] for d in "ab"]
    assert stock[0] == stock[1]   # the refit changes weights only: stock as the map alone is
    with pytest.raises(DotResizeError, match="residual_refit refits the readers of a resized residual stream"):
        run(job("prune:mlp=0.25,residual_refit=1", tmp_path / "c"))


def test_per_layer_maps_are_a_choice_that_is_checked(tmp_path):
    with pytest.raises(DotResizeError, match="residual_maps='blocky' is not a choice: use one of global, per_layer"):
        run(_job("llama", "pca:residual=0.25,residual_maps=blocky", tmp_path))


def test_prune_then_dotresize_with_equal_targets_is_one_add_on_pass(tmp_path):
    """prune picks, DOTResize merges the rest, in one pass (each block calibrated once): the same model as
    DOTResize selecting with the prune importance; different targets run one after the other."""
    from dotresize_fx.compress import Pipeline
    fused = Pipeline(["prune:mlp=0.25,importance=activation", "dotresize:mlp=0.25"]).run(
        f"{FACTORY}:llama", data="random", calib_samples=4, progress=False)
    assert [p["method"] for p in fused["passes"]] == ["prune>dotresize"]
    alone = run(_job("llama", "dotresize:mlp=0.25,importance=activation", tmp_path))
    ids = models._ids()[0]
    with torch.no_grad():
        assert torch.equal(fused["_model"](ids).logits, alone["_model"](ids).logits)
    chained = Pipeline("prune:mlp=0.1 dotresize:mlp=0.2").run(f"{FACTORY}:llama", data="random", calib_samples=4,
                                                              progress=False)
    assert [(p["method"], p["widths"]["mlp.0"]) for p in chained["passes"]] == [("prune", 88), ("dotresize", 72)]


def test_pure_producers_keep_their_rows_and_consumers_fit_toward_the_plan(tmp_path):
    """pure_producers: every kept neuron's gate/up rows are the dense model's own (a selection); only the
    consumer takes the merge, fitted by least squares toward the plan with a λ reported per group."""
    report = run(_job("llama", "dotresize:mlp=0.25,pure_producers=1", tmp_path))
    dense, _ = models.llama()
    for i, layer in enumerate(report["_model"].model.layers):
        for proj in ("gate_proj", "up_proj"):
            new, old = getattr(layer.mlp, proj).weight, getattr(dense.model.layers[i].mlp, proj).weight
            assert new.shape[0] == 72 and (new[:, None] == old[None]).all(-1).any(1).all()
    picked = report["passes"][0]["ls_reg"]
    assert set(picked) == {"mlp.0", "mlp.1"} and report["graph_check_max_abs_diff"] < 1e-4
