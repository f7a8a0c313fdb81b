"""ONNX export with dynamic batch/sequence, onnxruntime parity, and the export command's errors."""
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import models
from dotresize_fx.cli import main
from dotresize_fx.errors import DotResizeError
from dotresize_fx import kvcache
from dotresize_fx.export import LATENCY_SLACK, PARITY_TOL, _feed, check, latency_bound, to_onnx


@pytest.mark.parametrize("arch,opset", [("llama", 23), ("llama", 18), ("nanogpt", 23)])
def test_onnx_matches_torch_at_two_shapes(arch, opset, tmp_path):
    """Llama's SDPA becomes one ONNX Attention node from opset 23 on; nanoGPT's explicit math stays MatMuls.
    A decoder that generates is exported with its KV cache; a full sequence runs with an empty past."""
    model, inputs = getattr(models, arch)()
    path = to_onnx(model, inputs, tmp_path / "m.onnx", opset)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("Attention" in ops) == (arch == "llama" and opset >= 23)
    if "Attention" in ops:  # grouped-query keys and values reach the Attention node unrepeated (2 kv heads)
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
        shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                  for v in [*graph.value_info, *graph.input, *graph.output]}
        attention = [n for n in graph.node if n.op_type == "Attention"]
        assert attention and all(shapes[n.input[1]][1] == shapes[n.input[2]][1] == 2 for n in attention)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert names == (["input_ids", "attention_mask", "position_ids", *past] if arch == "llama" else ["input_ids"])
    for shape in [(2, 10), (3, 17)]:
        ids = torch.randint(0, 128, shape)
        got = sess.run(["logits"], _feed(sess, ids.numpy()))[0]
        with torch.no_grad():
            out = model(ids)
            want = (out.logits if hasattr(out, "logits") else out).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < PARITY_TOL


def test_onnx_attention_mask_pads_like_torch(tmp_path):
    """A padded batch: ORT honours the mask as torch does (and the mask really changes the logits)."""
    model, inputs = models.llama()
    sess = ort.InferenceSession(str(to_onnx(model, inputs, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    got = sess.run(["logits"], _feed(sess, ids.numpy(), mask.numpy()))[0]
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.numpy()
        unmasked = model(ids).logits.numpy()
    assert np.abs(got - want)[0, 4:].max() < PARITY_TOL and np.abs(got - want)[1].max() < PARITY_TOL
    assert np.abs(want - unmasked)[0, 4:].max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_kv_cache_onnx_generates_torchs_greedy_tokens(arch, tmp_path):
    """GQA with RoPE, Gemma 3's sliding windows (window 4, shorter than the 17 positions decoded) with one kv
    head, GPT-2's learned positions: onnxruntime decoding through the file's cache gives the tokens torch gives
    by recomputing the whole sequence each step, for every row of a batch; the present tensors grow by one
    position per step."""
    model, inputs = getattr(models, arch)()
    sess = ort.InferenceSession(str(to_onnx(model, inputs, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    tokens, _, _ = kvcache.greedy(sess, ids.numpy(), 8)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokens.shape == (3, 8) and (tokens == seq[:, 9:].numpy()).all()
    out = sess.run(None, kvcache.feed(sess, ids[:, :4].numpy()))
    step = sess.run(None, kvcache.feed(sess, ids[:, 4:5].numpy(), past=out[1:]))
    assert out[1].shape[2] == 4 and step[1].shape[2] == 5
    with torch.no_grad():
        assert np.abs(step[0][:, -1] - model(ids[:, :5]).logits[:, -1].numpy()).max() < PARITY_TOL


@pytest.mark.parametrize("arch", ["nanogpt_sdpa", "rope_gqa_sdpa"])
def test_causal_sdpa_modules_export_a_cache_with_their_kv_heads(arch, tmp_path):
    """Learned positions, or rotary ones with grouped-query SDPA (2 kv heads for 4 q heads, its own scale):
    the file's cache has the kv heads, and decoding through it gives torch's greedy tokens and full-sequence
    logits."""
    from dotresize_fx.generate import check_generation
    model, inputs = getattr(models, arch)()
    sess = ort.InferenceSession(str(to_onnx(model, inputs, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    assert [i.shape[1] for i in kvcache.past_inputs(sess)] == ([4] * 4 if arch == "nanogpt_sdpa" else [2] * 4)
    gen = check_generation(sess, model, inputs[0][:, :5], n=6)
    assert gen["same_tokens"] and gen["cached_step_max_abs_diff"] < PARITY_TOL


class _TablePositions(models.NanoGPTSdpa):
    """Positions sliced from a table by the sequence length: a cache cannot shift them."""
    def embed(self, idx):
        return self.wte(idx) + self.wpe.weight[: idx.size(1)]


def test_a_module_with_causal_sdpa_exports_a_kv_cache_that_generates(tmp_path):
    """A nanoGPT written with causal SDPA and learned positions from arange, compressed through its captured
    program (fewer heads, narrower residual): the file takes the resized cache (2 heads), its greedy tokens and
    cached step equal torch's, and torch decodes through the same cache. Positions taken from a table by
    slicing cannot be shifted: that model exports without a cache, and says why."""
    import json
    out = tmp_path / "o"
    assert main(["compress", f"{models.__file__}:nanogpt_sdpa", "--passes", "prune:residual=0.25,heads=0.5",
                 "--data", "random", "--calib-samples", "2", "--onnx", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rewrite_path"] == "program" and report["onnx"]["generation"]["same_tokens"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids"] + [i.name for i in kvcache.past_inputs(sess)]
    assert [i.shape[1] for i in kvcache.past_inputs(sess)] == [2] * 4
    assert main(["generate", str(out), "--prompt-ids", "5,9,2,7,1", "--max-new-tokens", "7", "--batch", "2",
                 "--json", str(tmp_path / "g.json")]) == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["same_tokens"] and g["ort"]["kv_cache"] and g["cache_max_abs_diff"] < 1e-4

    torch.manual_seed(0)
    table = _TablePositions().eval()
    logger, records = logging.getLogger("dotresize_fx.kvcache"), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        path = to_onnx(table, models._ids(), tmp_path / "t.onnx")
    finally:
        logger.removeHandler(handler)
    assert any("no KV cache for this model" in r.getMessage() for r in records)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]


def test_failed_validation_says_by_how_much():
    with pytest.raises(DotResizeError, match="differ from torch by 0.5"):
        check({"max_abs_diff": 0.5})


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    f = tmp_path / "f.py"
    f.write_text("import torch\ndef m():\n    return torch.nn.Linear(4, 4), (torch.zeros(2, 4),)\n")
    assert main(["export", f"{f}:m", "--out", str(tmp_path / "missing" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_verify_command_json(tmp_path):
    import json
    assert main(["verify", f"{models.__file__}:llama", "--json", str(tmp_path / "v.json")]) == 0
    checks = json.loads((tmp_path / "v.json").read_text())["checks"]
    assert [c["name"] for c in checks] == ["identity", "permutation", "rotation residual.0",
                                            "per-layer rotation residual.0"]
    assert all(c["ok"] and c["max_abs_diff"] < 1e-5 for c in checks)


def test_forward_flops_count_every_matmul_and_attention():
    """The FLOPs behind `flops_ratio` (what a perfect speed-up would give): q/k/v/o, gate/up/down and the LM
    head per token, plus attention scores and values (4·seq² per head_dim channel of each q head), exactly."""
    from dotresize_fx.export import forward_flops
    model, _ = models.llama()
    c = model.config
    seq, d, hd = 32, c.hidden_size, c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * c.intermediate_size
    per_token = 2 * per_layer * c.num_hidden_layers + 2 * d * models.VOCAB
    attention = 4 * seq * seq * c.num_attention_heads * hd * c.num_hidden_layers
    assert forward_flops(model, 1, seq, models.VOCAB) == per_token * seq + attention


def test_latency_bound_is_the_parameter_ratio_plus_slack():
    met = latency_bound({"latency_ratio": 0.93, "flops_ratio": 0.93}, 0.906)
    assert met["latency_within_bound"] and met["latency_bound"] == pytest.approx(0.906 + LATENCY_SLACK)
    assert not latency_bound({"latency_ratio": 0.88, "flops_ratio": 0.87}, 0.81)["latency_within_bound"]


def test_int4_weights_and_greedy_generation_match_torch(tmp_path):
    """quantize:int4 (GPTQ, calibrated on the job's data) writes MatMulNBits nodes; greedy tokens of the float
    ONNX, decoded through its KV cache, equal torch's, and torch's cached step gives the full-sequence logits.
    The cache inputs have the resized kv head count (2 → 1)."""
    import json
    from dotresize_fx.cli import main
    out = tmp_path / "o"
    assert main(["compress", f"{models.__file__}:llama", "--passes",
                 "prune:mlp=0.25,heads=0.5 quantize:int4,block_size=32,algo=gptq,samples=3", "--data", "random",
                 "--calib-samples", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    q = report["quantized"]
    assert q["scheme"] == "int4" and q["quantized_nodes"] == q["matmul_nodes"] > 0
    assert (q["algo"], q["calib_samples"]) == ("gptq", 3)
    assert q["size_mb_after"] < 0.7 * q["size_mb_before"]   # the float embedding (a Gather) stays
    assert report["onnx"]["generation"]["same_tokens"]
    assert report["onnx"]["generation"]["cached_step_max_abs_diff"] < PARITY_TOL
    for batch in ("batch1", "batch8"):   # decode speed of the dense, compressed and int4 files, side by side
        speeds = report["decode"][batch]
        assert list(speeds) == ["dense", "compressed", "compressed int4"]
        assert all(s["decode_tokens_per_s"] > 0 and s["decode_spread"] >= 0 for s in speeds.values())
    past = kvcache.past_inputs(ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]))
    assert [i.shape[1] for i in past] == [1] * 4
    assert main(["generate", str(out), "--prompt-ids", "5,9,2,7", "--max-new-tokens", "6", "--batch", "2",
                 "--json", str(tmp_path / "g.json")]) == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["same_tokens"] and len(g["torch_tokens"]) == 6 and g["cache_max_abs_diff"] < 1e-4
    assert g["ort"]["kv_cache"] and g["batch"] == 2


def test_int8_weight_only_is_block_wise_8_bit_and_close_to_float(tmp_path):
    from passes.quantize import QuantizeConfig, quantize_onnx
    model, inputs = models.llama()
    path = to_onnx(model, inputs, tmp_path / "m.onnx")
    q = quantize_onnx(path, tmp_path / "q.onnx", QuantizeConfig("int8", weight_only=True, block_size=32))
    nodes = [n for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert q["bits"] == 8 and len(nodes) == q["matmul_nodes"] == 15
    assert all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nodes)
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    got = sess.run(["logits"], _feed(sess, ids.numpy()))[0]
    assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03   # 8 bits: ~1% on random weights


def test_gptq_int4_is_closer_to_float_than_round_to_nearest(tmp_path):
    """On the ids it calibrated on and on others, GPTQ's 4-bit file is nearer the float logits than RTN's at the
    same block size; without calibration data it is refused."""
    from passes.quantize import QuantizeConfig, quantize_onnx
    model, inputs = models.llama()
    path = to_onnx(model, inputs, tmp_path / "m.onnx")
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 128, (1, 32), generator=g) for _ in range(8)]
    gptq = QuantizeConfig("int4", block_size=32, algo="gptq", samples=8)
    with pytest.raises(DotResizeError, match="calibrates on data"):
        quantize_onnx(path, tmp_path / "g.onnx", gptq)
    quantize_onnx(path, tmp_path / "g.onnx", gptq, lambda n: calib[:n])
    quantize_onnx(path, tmp_path / "r.onnx", QuantizeConfig("int4", block_size=32))
    for ids in (torch.cat(calib[:2]), torch.randint(0, 128, (2, 32), generator=g)):
        with torch.no_grad():
            want = model(ids).logits.numpy()
        err = {}
        for name in ("g", "r"):
            sess = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
            err[name] = np.linalg.norm(sess.run(["logits"], _feed(sess, ids.numpy()))[0] - want)
        assert 0 < err["g"] < 0.9 * err["r"]


@pytest.mark.parametrize("head", [True, False])
def test_a_tied_head_is_quantized_when_asked(head, tmp_path):
    """A head tied to the embedding reads it through a Transpose that no quantizer touches: with head=1 it gets
    its own weight and becomes MatMulNBits (the embedding's Gather stays float); with head=0 it stays MatMul."""
    from transformers import LlamaConfig
    from passes.quantize import QuantizeConfig, quantize_onnx
    model, inputs = models._hf(LlamaConfig, **models.SMALL, tie_word_embeddings=True)
    path = to_onnx(model, inputs, tmp_path / "m.onnx")
    q = quantize_onnx(path, tmp_path / "q.onnx", QuantizeConfig("int4", block_size=32, head=head))
    assert q["head_quantized"] == head and len(q["float_matmuls"]) == (0 if head else 1)
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + head and "Gather" in ops
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    got = sess.run(["logits"], _feed(sess, ids.numpy()))[0]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)   # 4-bit weights: close to float, not equal
    assert got.shape == want.shape and 0 < rel < 0.25


def test_external_data_file_runs_and_quantizes_beside_its_data(tmp_path):
    """Weights in `<file>.data` (automatic above 1 GB; forced here): the file loads with its data, matches
    torch, quantizes to a file with its own data, and no staging directory is left behind."""
    from passes.quantize import QuantizeConfig, quantize_onnx
    model, inputs = models.llama()
    path = to_onnx(model, inputs, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > (tmp_path / "m.onnx").stat().st_size
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert np.abs(sess.run(["logits"], _feed(sess, ids.numpy()))[0] - model(ids).logits.numpy()).max() < PARITY_TOL
    q = quantize_onnx(path, tmp_path / "q.onnx", QuantizeConfig("int4", block_size=32))
    assert (tmp_path / "q.onnx.data").exists() and q["quantized_nodes"] == q["matmul_nodes"]
    assert ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "q.onnx", "q.onnx.data"]
    to_onnx(model, inputs, path)   # a smaller export over it removes the stale data file
    assert not (tmp_path / "m.onnx.data").exists()
