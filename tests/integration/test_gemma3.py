"""The real Gemma-3-270M (slow: `make test-slow` fetches it): the analysis the family needs, and one compress."""
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    from dotresize_fx.load import load
    return load("gemma3-270m")


def test_gemma3_groups(gemma3):
    from dotresize_fx.analyze import analyze
    a = analyze(gemma3.model, gemma3.example_inputs)
    assert [g.size for g in a.by_kind("mlp")] == [2048] * 18
    assert {(g.size, g.kv_heads, g.unit) for g in a.by_kind("heads")} == {(4, 1, 256)} and len(a.by_kind("heads")) == 18
    assert all(sorted(m.param.rsplit(".", 2)[-2] for m in g.members if m.role == "shared") == ["k_norm", "q_norm"]
               for g in a.by_kind("heads"))
    r = a.by_kind("residual")[0]
    assert r.size == 640 and not r.resizable and "a gain applied to a branch's output" in r.reason


def test_gemma3_prune_ls_compresses_with_onnx_parity(tmp_path):
    import math
    from dotresize_fx.compress import Job, PassSpec, run
    r = run(Job("gemma3-270m", PassSpec.parse("prune:mlp=0.25,unmerge=ls"), data="sotu", calib_samples=4,
                seq_len=128, eval_tokens=508, out=str(tmp_path / "o"), progress=False, onnx=True))
    assert r["widths"]["mlp.0"] == 1536 and math.isfinite(r["ppl_after"]) and r["ppl_after"] > r["ppl_before"]
    assert r["onnx"]["max_abs_diff"] <= 1e-3
