"""The embedded model (SmolLM2-135M, float32): marked slow, run with `make test-slow`."""
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from dotresize_fx.load import load
    return load("smollm2-135m")


def test_analysis_counts(smollm2):
    from dotresize_fx.analyze import analyze
    a = analyze(smollm2.model, smollm2.example_inputs)
    assert [g.size for g in a.by_kind("residual")] == [576]
    assert [g.size for g in a.by_kind("mlp")] == [1536] * 30
    assert {(g.size, g.kv_heads, g.unit) for g in a.by_kind("heads")} == {(9, 3, 64)}
    assert len(a.by_kind("heads")) == 30
    assert a.tied == [["model.embed_tokens.weight", "lm_head.weight"]]


def test_prune_mlp_quarter_reloads_in_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    from dotresize_fx.compress import Job, PassSpec, run
    r = run(Job("smollm2-135m", PassSpec.parse("prune:mlp=0.25"), calib_samples=4, seq_len=128,
                eval_tokens=1024, out=str(tmp_path / "p"), progress=False, onnx=True))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert stock.config.intermediate_size == 1152
    ids = r["_eval_windows"][:1]
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, r["_model"](ids).logits)
    # the ONNX file, checked here independently of the toolkit's own report
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "p" / "model.onnx"), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, 3, 0, 64), np.float32)   # the KV cache: 3 kv heads of 64, no past yet
    feed = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy(),
            "position_ids": np.arange(ids.shape[1])[None], **{f"past_key_values.{i}.{kv}": empty
                                                              for i in range(30) for kv in ("key", "value")}}
    got = sess.run(["logits"], feed)[0]
    assert abs(got - stock(ids).logits.detach().numpy()).max() < 1e-3
    assert r["ppl_after"] > r["ppl_before"] and r["ppl_before"] == pytest.approx(json.loads(
        (tmp_path / "p" / "report.json").read_text())["ppl_before"])
