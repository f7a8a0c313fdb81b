"""ONNX export with dynamic batch/sequence, onnxruntime parity, and the export command's errors."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import models
from dotresize_fx.cli import main
from dotresize_fx.errors import DotResizeError
from dotresize_fx.export import LATENCY_SLACK, PARITY_TOL, check, latency_bound, to_onnx


@pytest.mark.parametrize("arch,opset", [("llama", 23), ("llama", 18), ("nanogpt", 23)])
def test_onnx_matches_torch_at_two_shapes(arch, opset, tmp_path):
    """Llama's SDPA becomes one ONNX Attention node from opset 23 on; nanoGPT's explicit math stays MatMuls."""
    model, inputs = getattr(models, arch)()
    path = to_onnx(model, inputs, tmp_path / "m.onnx", opset)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("Attention" in ops) == (arch == "llama" and opset >= 23)
    if "Attention" in ops:  # grouped-query keys and values reach the Attention node unrepeated (2 kv heads)
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
        shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                  for v in graph.value_info}
        attention = [n for n in graph.node if n.op_type == "Attention"]
        assert attention and all(shapes[n.input[1]][1] == shapes[n.input[2]][1] == 2 for n in attention)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == (["input_ids", "attention_mask"] if arch == "llama" else ["input_ids"])
    for shape in [(2, 10), (3, 17)]:
        ids = torch.randint(0, 128, shape)
        feed = {"input_ids": ids.numpy().astype(np.int64)}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones(shape, dtype=np.int64)
        got = sess.run(None, feed)[0]
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
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.numpy()
        unmasked = model(ids).logits.numpy()
    assert np.abs(got - want)[0, 4:].max() < PARITY_TOL and np.abs(got - want)[1].max() < PARITY_TOL
    assert np.abs(want - unmasked)[0, 4:].max() > 1e-3


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
    """quantize:int4 writes MatMulNBits nodes; greedy tokens of the float ONNX equal torch's, and torch's cached
    step gives the full-sequence logits."""
    import json
    from dotresize_fx.cli import main
    out = tmp_path / "o"
    assert main(["compress", f"{models.__file__}:llama", "--passes", "prune:mlp=0.25 quantize:int4,block_size=32",
                 "--data", "random", "--calib-samples", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    q = report["quantized"]
    assert q["scheme"] == "int4" and q["quantized_nodes"] == q["matmul_nodes"] > 0
    assert q["size_mb_after"] < 0.7 * q["size_mb_before"]   # the float embedding (a Gather) stays
    assert main(["generate", str(out), "--prompt-ids", "5,9,2,7", "--max-new-tokens", "6", "--json",
                 str(tmp_path / "g.json")]) == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["same_tokens"] and len(g["torch_tokens"]) == 6 and g["cache_max_abs_diff"] < 1e-4
