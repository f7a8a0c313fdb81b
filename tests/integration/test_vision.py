"""Vision models written as their authors write them (tests/vision.py), given as factories and never edited:
analysis, exact verify, compress of heads / MLP / channels that reloads, and ONNX parity."""
from pathlib import Path

import pytest
import torch

import vision_models as vision
from dotresize_fx.analyze import analyze
from dotresize_fx.compress import Job, PassSpec, run
from dotresize_fx.load import load
from dotresize_fx.verify import invariance_checks

FACTORY = str(Path(__file__).resolve().parents[2] / "examples" / "vision_models.py")
ARCHS = ["vit", "vit_qk_norm", "resnet", "convnext", "mobilenet", "resnet_bottleneck", "vgg", "whisper",
         "torch_transformer"]


def _summary(a):
    return [{"name": g.name, "kind": g.kind, "size": g.size, "unit": g.unit, "kv_heads": g.kv_heads,
             "resizable": g.resizable, "reason": g.reason,
             "members": sorted(f"{m.param}:{m.dim}:{m.role}:{m.offset}:{m.length}" for m in g.members),
             "constants": sorted(f"{c.node}:{c.index}={c.value}" for c in g.constants)} for g in a.groups]


@pytest.mark.parametrize("arch", ARCHS)
def test_analysis_and_exact_verify(arch, golden):
    model, inputs = getattr(vision, arch)()
    a = analyze(model, inputs)
    golden(f"analyze/{arch}", _summary(a))
    checks = invariance_checks(model, a, inputs)
    assert all(c["ok"] for c in checks), checks
    # these forwards run in float64 throughout, so they are held to float64's floor
    assert all(c["compute_dtype"] == "torch.float64" and c["max_abs_diff"] < 1e-12 for c in checks), checks


def test_vit_fused_qkv_is_one_heads_group_with_q_k_v_segments():
    a = analyze(*vision.vit())
    g = a.by_kind("heads")[0]
    spans = sorted((m.offset, m.length) for m in g.members if m.param == "blocks.0.attn.qkv.weight")
    assert (g.size, g.kv_heads, g.unit) == (4, 4, 8) and spans == [(0, 32), (32, 32), (64, 32)]
    assert a.by_kind("residual")[0].resizable      # the class token's select is on the token dim, not the width


def test_depthwise_convs_follow_their_channels():
    a = analyze(*vision.mobilenet())
    hidden = [g for g in a.by_kind("channels") if g.size == 32]
    assert hidden and all(g.resizable for g in hidden)
    assert any(m.param == "blocks.0.conv.3.weight" and m.role == "passthrough" for m in hidden[0].members)


@pytest.mark.parametrize("arch, passes", [("vit", "dotresize:mlp=0.25,heads=0.25"), ("vit", "prune:heads=0.5"),
                                          ("resnet", "prune:channels=0.25,round_to=4"),
                                          ("resnet", "dotresize:channels=0.25,round_to=4"),
                                          ("mobilenet", "prune:channels=0.25,round_to=4"),
                                          ("convnext", "prune:mlp=0.25,residual=0.25,round_to=4"),
                                          ("resnet_bottleneck", "dotresize:channels=0.25,round_to=4"),
                                          ("vgg", "dotresize:channels=0.25,mlp=0.25,round_to=4"),
                                          ("whisper", "dotresize:heads=0.25,mlp=0.25,channels=0.25,round_to=4"),
                                          ("torch_transformer", "prune:mlp=0.25,residual=0.25,round_to=4")])
def test_compress_reloads_as_a_program(arch, passes, tmp_path):
    report = run(Job(f"{FACTORY}:{arch}", PassSpec.parse(passes), data="random", calib_samples=4,
                     out=str(tmp_path / "o"), progress=False))
    assert report["rewrite_path"] == "program" and report["params_after"] < report["params_before"]
    model, inputs = load(tmp_path / "o").model, getattr(vision, arch)()[1]
    with torch.no_grad():
        assert torch.equal(model(*inputs), report["_model"](*inputs))


def test_vit_onnx_matches_the_program_at_two_batch_sizes(tmp_path):
    report = run(Job(f"{FACTORY}:vit", PassSpec.parse("prune:heads=0.25,mlp=0.25"), data="random",
                     calib_samples=4, out=str(tmp_path / "o"), progress=False, onnx=True))
    assert report["onnx"]["max_abs_diff"] < 1e-4 and report["widths"]["heads.0"] == 3


def test_calibration_inputs_from_a_tensor_file(tmp_path):
    """A user's own images as a .pt or .npy tensor (samples first) calibrate a vision model."""
    import numpy as np
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    reports = [run(Job(f"{FACTORY}:resnet", PassSpec.parse("prune:channels=0.25,round_to=4"), data=str(tmp_path / f),
                       calib_samples=6, batch_size=3, progress=False)) for f in ("x.pt", "x.npy")]
    assert reports[0]["protocol"]["corpus"].endswith("x.pt")
    with torch.no_grad():
        assert torch.equal(reports[0]["_model"](x), reports[1]["_model"](x))   # the same data either way


def test_verify_runs_on_the_rewritten_program(tmp_path):
    import json
    from dotresize_fx.cli import main
    assert main(["verify", f"{FACTORY}:vit_qk_norm", "--json", str(tmp_path / "v.json")]) == 0
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["rewrite_path"] == "program"
    assert [c["name"] for c in result["checks"]][:3] == ["identity", "permutation", "rotation residual.0"]
    assert all(c["ok"] and c["max_abs_diff"] < 1e-12 for c in result["checks"])


def test_a_flattened_feature_map_is_read_per_channel():
    """VGG's Linear reads 16 channels × 4×4 positions: its member spans 256 inputs, 16 per channel."""
    a = analyze(*vision.vgg())
    g = next(g for g in a.by_kind("channels") if g.size == 16)
    fc = next(m for m in g.consumers() if m.param == "7.weight")
    assert g.resizable and (fc.length, g.inner(fc)) == (256, 16)


def test_multihead_attention_folding_heads_into_the_batch_pins_heads_only():
    """nn.MultiheadAttention views its heads into the batch dim: the heads stay, with the reason; the MLP and
    the residual stream stay resizable, and a rotation of that stream is skipped because the LM head reads it
    without a LayerNorm (pre-LN encoder with no final norm)."""
    from dotresize_fx.residual import rotation_blocker
    a = analyze(*vision.torch_transformer())
    heads, residual = a.by_kind("heads"), a.by_kind("residual")[0]
    assert heads and all(not g.resizable and "folds a width into a batch" in g.reason for g in heads)
    assert all(g.resizable for g in a.by_kind("mlp")) and residual.resizable
    assert "head read the LayerNorm stream" in rotation_blocker(residual)
