"""GPTQ: with no correlation between inputs it is round to nearest; with correlated inputs its output error is
lower; its MatMulNBits nodes compute what its codes, scales and zero points say under onnxruntime."""
import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from passes.gptq import gptq, minmax_params, quantize_gptq


def _dequant(codes, scales, zeros, block, K):
    N = codes.shape[0]
    q = codes.double().view(N, -1, block)
    return ((q - zeros[..., None]) * scales[..., None]).reshape(N, -1)[:, :K].T   # K × N


def _rtn(W, block, bits=4):
    """Round to nearest with min-max blocks: the reference GPTQ improves on."""
    Wt = W.T.double()
    s, z = zip(*(minmax_params(Wt[:, i:i + block], 2 ** bits - 1) for i in range(0, W.shape[0], block)))
    s, z = torch.stack(s, 1), torch.stack(z, 1)
    q = torch.clamp(torch.round(Wt.view(W.shape[1], -1, block) / s[..., None]) + z[..., None], 0, 2 ** bits - 1)
    return ((q - z[..., None]) * s[..., None]).reshape(W.shape[1], -1).T


def test_uncorrelated_inputs_make_gptq_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 12, generator=g, dtype=torch.float64)
    codes, scales, zeros = gptq(W, torch.eye(64, dtype=torch.float64), block=32, act_order=False, shrinks=(1.0,))
    assert torch.equal(_dequant(codes, scales, zeros, 32, 64), _rtn(W, 32))


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 96, generator=g, dtype=torch.float64) @ torch.randn(96, 96, generator=g, dtype=torch.float64)
    W = torch.randn(96, 24, generator=g, dtype=torch.float64)
    err_rtn = (X @ (W - _rtn(W, 32))).norm()
    for act_order in (False, True):
        W_hat = _dequant(*gptq(W, X.T @ X, block=32, act_order=act_order), 32, 96)
        assert (X @ (W - W_hat)).norm() < 0.8 * err_rtn


def _matmul_file(path, W):
    K, N = W.shape
    node = helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "s", K])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, "s", N])],
                              [numpy_helper.from_array(W.numpy().astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_matmulnbits_nodes_compute_the_dequantized_weight(tmp_path):
    """K = 96 in blocks of 32 is an odd number of blocks per column (zero points padded to a whole byte)."""
    import onnxruntime as ort
    g = torch.Generator().manual_seed(2)
    W = torch.randn(96, 10, generator=g)
    _matmul_file(tmp_path / "f.onnx", W)
    batches = [torch.randn(1, 40, 96, generator=g) for _ in range(3)]
    for bits in (4, 8):
        model = onnx.load(str(tmp_path / "f.onnx"))
        assert quantize_gptq(model, [], batches, tmp_path, bits, 32, accuracy_level=0) == 1
        assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
        assert "w" not in {i.name for i in model.graph.initializer}
        H = sum(b.reshape(-1, 96).double().T @ b.reshape(-1, 96).double() for b in batches)
        W_hat = _dequant(*gptq(W, H, bits=bits, block=32), 32, 96)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = torch.randn(1, 7, 96, generator=g)
        got = sess.run(["logits"], {"x": x.numpy()})[0]
        assert np.abs(got - (x.double() @ W_hat).numpy()).max() < 1e-4
        assert np.abs(got - (x @ W).numpy()).max() > 1e-3   # really quantized


def test_grams_taken_in_chunks_give_the_same_file(tmp_path, monkeypatch):
    """Two chained MatMuls and one sharing the first's input: with a Gram budget of one byte every input is
    calibrated in its own pass, and the quantized weights are the same as from one pass."""
    import passes.gptq as gptq_module
    g = torch.Generator().manual_seed(3)
    w1, w2, w3 = (torch.randn(*s, generator=g).numpy().astype(np.float32) for s in ((64, 48), (48, 10), (64, 10)))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y"], name="mm1"),
             helper.make_node("MatMul", ["y", "w2"], ["a"], name="mm2"),
             helper.make_node("MatMul", ["x", "w3"], ["b"], name="mm3"),
             helper.make_node("Add", ["a", "b"], ["logits"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "s", 64])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, "s", 10])],
                              [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f.onnx"))
    batches = [torch.randn(1, 40, 64, generator=g) for _ in range(2)]
    files = {}
    for budget in (1 << 30, 1):
        monkeypatch.setattr(gptq_module, "GRAM_BYTES", budget)
        chunks = gptq_module._gram_chunks(
            [n for n in onnx.load(str(tmp_path / "f.onnx")).graph.node if n.op_type == "MatMul"],
            {i.name: i for i in onnx.load(str(tmp_path / "f.onnx")).graph.initializer})
        assert [len(c) for c in chunks] == ([3] if budget > 1 else [1, 1, 1])
        model = onnx.load(str(tmp_path / "f.onnx"))
        assert quantize_gptq(model, [], batches, tmp_path, 4, 16, accuracy_level=0) == 3
        files[budget] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    one, chunked = files.values()
    assert one.keys() == chunked.keys() and all(np.array_equal(one[k], chunked[k]) for k in one)
