"""Vision models written as their authors write them (tests/vision.py), given as factories and never edited:
analysis, exact verify, compress of heads / MLP / channels that reloads, and ONNX parity."""
import copy
from pathlib import Path

import pytest
import torch

import models
import vision_models as vision
from dotresize_fx.analyze import analyze
from dotresize_fx.compress import Job, PassSpec, run
from dotresize_fx.errors import DotResizeError
from dotresize_fx.load import load
from dotresize_fx.verify import invariance_checks

FACTORY = str(Path(__file__).resolve().parents[2] / "examples" / "vision_models.py")
ARCHS = ["vit", "vit_qk_norm", "resnet", "convnext", "mobilenet", "resnet_bottleneck", "vgg", "whisper",
         "torch_transformer", "densenet", "unet", "conformer", "poolformer", "mlp_mixer", "swin"]


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
                                          ("torch_transformer", "prune:mlp=0.25,residual=0.25,round_to=4"),
                                          ("torch_transformer", "dotresize:heads=0.25,mlp=0.25"),
                                          ("densenet", "dotresize:channels=0.25,round_to=2"),
                                          ("unet", "prune:channels=0.25,round_to=2"),
                                          ("conformer", "dotresize:heads=0.25,mlp=0.25,channels=0.25,round_to=4"),
                                          ("poolformer", "prune:channels=0.25,round_to=4"),
                                          ("mlp_mixer", "prune:mlp=0.25,residual=0.25,round_to=4"),
                                          ("swin", "dotresize:heads=0.25,mlp=0.25,round_to=4")])
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
    assert [c["name"] for c in result["checks"]][:4] == ["identity", "permutation", "rotation residual.0",
                                                         "per-layer rotation residual.0"]
    assert all(c["ok"] and c["max_abs_diff"] < 1e-12 for c in result["checks"])


def test_a_flattened_feature_map_is_read_per_channel():
    """VGG's Linear reads 16 channels × 4×4 positions: its member spans 256 inputs, 16 per channel."""
    a = analyze(*vision.vgg())
    g = next(g for g in a.by_kind("channels") if g.size == 16)
    fc = next(m for m in g.consumers() if m.param == "7.weight")
    assert g.resizable and (fc.length, g.inner(fc)) == (256, 16)


def test_multihead_attention_heads_folded_into_the_batch_are_a_heads_group():
    """nn.MultiheadAttention views its heads into the batch dim and back: its fused in_proj is q ‖ k ‖ v of one
    heads group, and the residual's rotation is skipped because the LM head reads the stream without a
    LayerNorm (pre-LN encoder with no final norm)."""
    from dotresize_fx.residual import rotation_blocker
    a = analyze(*vision.torch_transformer())
    heads, residual = a.by_kind("heads"), a.by_kind("residual")[0]
    assert len(heads) == 2 and all(g.resizable and (g.size, g.unit) == (4, 8) for g in heads)
    spans = sorted((m.offset, m.length) for m in heads[0].members
                   if m.param == "encoder.layers.0.self_attn.in_proj_weight" and m.role == "producer")
    assert spans == [(0, 32), (32, 32), (64, 32)]
    assert all(g.resizable for g in a.by_kind("mlp")) and residual.resizable
    assert "head read the LayerNorm stream" in rotation_blocker(residual)


def test_multihead_attention_keeps_other_heads_per_layer_exactly():
    """Removing heads 1 of layer 0 and 0, 2 of layer 1 from the program equals the model with those heads'
    out_proj columns zeroed: the shared `4 * batch` size the graph folds heads into is rescaled per layer."""
    from dotresize_fx.maps import WidthMap
    from dotresize_fx.program import as_module
    from dotresize_fx.rewrite import apply
    model, inputs = vision.torch_transformer()
    a = analyze(model, inputs)
    keep = {"heads.0": [0, 2, 3], "heads.1": [1, 3]}
    maps = {g: WidthMap.selection(g, 4, torch.tensor(k)) for g, k in keep.items()}
    resized, _ = apply(as_module(a), a, maps)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, k in enumerate(keep.values()):
            w = masked.encoder.layers[layer].self_attn.out_proj.weight
            for h in set(range(4)) - set(k):
                w[:, 8 * h:8 * (h + 1)] = 0
        assert torch.allclose(resized(*inputs), masked(*inputs), atol=1e-6)
        assert dict(resized.named_parameters())["encoder.layers.1.self_attn.out_proj.weight"].shape == (32, 16)


def test_concatenated_features_are_segments_of_their_groups():
    """DenseNet's cat([x, conv(x)]): the 32 channels after two layers are 16 ‖ 8 ‖ 8 of three groups, each
    resizable, and the consumer reads each group through its own slice."""
    a = analyze(*vision.densenet())
    spans = sorted((m.offset, m.length) for g in a.by_kind("channels") for m in g.consumers() if m.param == "5.weight")
    assert spans == [(0, 16), (16, 8), (24, 8)]
    assert all(g.resizable for g in a.by_kind("channels") if g.size in (8, 16))


MODELS = str(Path(__file__).resolve().parents[1] / "models.py")


def test_a_hugging_face_vit_saves_stock_and_reloads(tmp_path):
    """transformers' ViT saves under its checkpoint's weight names (a conversion map): the stock directory reloads
    through from_pretrained, by dotresize_fx.load and by the class itself, with the compressed model's logits."""
    from transformers import ViTForImageClassification
    from dotresize_fx.outputs import model_outputs
    report = run(Job(f"{MODELS}:hf_vit", PassSpec.parse("dotresize:heads=0.25,mlp=0.25,residual=0.25,round_to=4"),
                     data="random", calib_samples=4, out=str(tmp_path / "o"), progress=False, onnx=True))
    assert report["rewrite_path"] == "eager" and report["onnx"]["max_abs_diff"] < 1e-4
    x = models.hf_vit()[1]
    with torch.no_grad():
        want = model_outputs(report["_model"], x)
        assert torch.equal(model_outputs(load(tmp_path / "o").model, x), want)
        stock = ViTForImageClassification.from_pretrained(tmp_path / "o").eval()
        assert torch.equal(model_outputs(stock, x), want) and stock.config.num_attention_heads == 3


def test_a_hugging_face_convnext_keeps_its_depthwise_convs_in_step(tmp_path):
    """A stage's stream that cannot change (its stem's norm) is skipped and listed; the other stage's channels
    and every MLP shrink, and each depthwise conv's `groups` follows its channels."""
    from dotresize_fx.outputs import model_outputs
    report = run(Job(f"{MODELS}:hf_convnext", PassSpec.parse("prune:mlp=0.25,residual=0.25,round_to=4"),
                     data="random", calib_samples=4, out=str(tmp_path / "o"), progress=False))
    skipped = report["passes"][0]["skipped"]
    assert report["widths"]["residual.1"] == 24 and any("starts at a norm's output" in s for s in skipped)
    dw = report["_model"].convnext.encoder.stages[1].layers[0].dwconv
    assert dw.groups == dw.in_channels == dw.out_channels == 24
    x = models.hf_convnext()[1]
    with torch.no_grad():
        assert torch.equal(model_outputs(load(tmp_path / "o").model, x), model_outputs(report["_model"], x))


def test_the_patch_grid_is_positions_not_a_width():
    """MLP-Mixer's token MLP reads the 4×4 patch grid a conv computed: no parameter writes those positions, so
    the grid is pinned (a permutation of it would not be an invariance), and the token MLP's hidden width stays
    resizable."""
    a = analyze(*vision.mlp_mixer())
    grid = [g for g in a.groups if "positions computed by aten.conv2d" in g.reason]
    assert grid and not any(g.resizable for g in grid)
    assert sorted(g.size for g in a.by_kind("mlp")) == [32, 32, 128, 128]


def test_einsum_attention_and_glu_convs_are_heads_and_channels():
    a = analyze(*vision.conformer())
    assert [(g.size, g.unit, g.resizable) for g in a.by_kind("heads")] == [(4, 8, True), (4, 8, True)]
    glu = [g for g in a.by_kind("channels") if g.size == 32]
    pw1 = sorted((m.offset, m.length) for g in glu for m in g.producers() if m.param.endswith("pw1.weight"))
    assert len(glu) == 2 and all(g.resizable for g in glu) and pw1 == [(0, 32), (0, 32), (32, 32), (32, 32)]


def test_batch_norm_folding_keeps_the_function_and_leaves_a_shift():
    """fold_bn=1: every BatchNorm after a conv becomes a pure shift (gain 1, variance 1 − ε), its scale in the
    conv's filters, and the model computes what it did."""
    from dotresize_fx.foldbn import fold_batch_norms
    model, x = vision.resnet_bottleneck()
    folded = copy.deepcopy(model)
    pairs = fold_batch_norms(folded, analyze(model, x))
    bns = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(pairs) == len(bns) and all(torch.all(b.weight == 1) and torch.allclose(b.running_var, torch.full_like(
        b.running_var, 1 - b.eps)) for b in bns)
    with torch.no_grad():
        assert (folded(*x) - model(*x)).abs().max() < 1e-6
    report = run(Job(f"{FACTORY}:resnet_bottleneck", PassSpec.parse("dotresize:channels=0.25,round_to=4,fold_bn=1"),
                     data="random", calib_samples=4, progress=False))
    assert report["passes"][0]["folded_bn"] == pairs and report["params_after"] < report["params_before"]


def test_calibration_inputs_from_a_folder_of_images(tmp_path):
    """A folder of images calibrates as the same pixels would from a tensor file: sized to the example input
    (shorter side, then a centre crop), scaled to [0, 1], normalised with ImageNet's mean and std."""
    import numpy as np
    from PIL import Image
    from dotresize_fx import data
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "wide.jpg")
    example = vision.resnet()[1]
    batches = data.input_batches(str(tmp_path), example, 6, 3)
    x = torch.cat([b[0] for b in batches])
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    want = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert x.shape == (6, 3, 16, 16) and torch.allclose(x[:5], want, atol=1e-6)
    torch.save(x, tmp_path.parent / "x.pt")
    reports = [run(Job(f"{FACTORY}:resnet", PassSpec.parse("prune:channels=0.25,round_to=4"), data=d,
                       calib_samples=6, batch_size=3, progress=False)) for d in (str(tmp_path), str(tmp_path.parent / "x.pt"))]
    with torch.no_grad():
        assert torch.equal(reports[0]["_model"](*example), reports[1]["_model"](*example))
    with pytest.raises(DotResizeError, match="fewer than the 8 asked"):
        data.input_batches(str(tmp_path), example, 8, 4)


def test_hand_written_gqa_keeps_other_heads_exactly():
    """repeat_interleave of kv heads: removing q heads 1 and 3 (one in each kv group) patches the repeat count
    2 → 1, and equals the model with those heads' output columns zeroed."""
    from dotresize_fx.maps import WidthMap
    from dotresize_fx.program import as_module
    from dotresize_fx.rewrite import apply
    model, inputs = models.gqa_by_hand()
    a = analyze(model, inputs)
    g = a.by_kind("heads")[0]
    assert (g.size, g.kv_heads) == (4, 2) and any(c.per == "rep" for c in g.constants)
    maps = {g.name: WidthMap.selection(g.name, 4, torch.tensor([0, 2]), 2, torch.tensor([0, 1]))}
    resized, _ = apply(as_module(a), a, maps)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for h in (1, 3):
            masked[1].o.weight[:, 8 * h:8 * (h + 1)] = 0
        assert torch.allclose(resized(*inputs), masked(*inputs), atol=1e-6)


def test_a_per_head_bias_table_follows_its_heads():
    """Swin's relative-position bias table has one column per head: removing heads removes their columns."""
    a = analyze(*vision.swin())
    g = a.by_kind("heads")[0]
    table = [m for m in g.members if m.param.endswith("relative_position_bias_table")]
    assert g.resizable and [(m.dim, m.length, m.role) for m in table] == [(1, 4, "passthrough")]
    report = run(Job(f"{FACTORY}:swin", PassSpec.parse("prune:heads=0.5"), data="random", calib_samples=4,
                     progress=False))
    params = dict(report["_model"].named_parameters())
    assert params["blocks.0.attn.relative_position_bias_table"].shape == (49, 2)


@pytest.mark.parametrize("arch", ["vit", "torch_transformer"])
def test_a_program_is_calibrated_layer_by_layer(arch):
    """The unflattened program's blocks (interpreter modules named 0, 1, …; a block may take and return symbolic
    sizes besides the hidden states) chain, so each block is calibrated on what the resized blocks before it
    produce, as in eager mode."""
    report = run(Job(f"{FACTORY}:{arch}", PassSpec.parse("prune:mlp=0.25,unmerge=ls"), data="random",
                     calib_samples=4, progress=False))
    assert report["rewrite_path"] == "program" and report["passes"][0]["layerwise"] is True


def test_upsampling_and_untagged_activations_pass_channels():
    """A U-Net-like neck: nearest upsampling, a skip concatenated on, Hardswish, bilinear interpolation and
    PReLU's per-channel slopes all follow their channels."""
    from torch import nn

    class Neck(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16)
            self.c2, self.up = nn.Conv2d(16, 32, 3, 2, 1), nn.Upsample(scale_factor=2)
            self.c3, self.c4 = nn.Sequential(nn.Conv2d(48, 16, 1), nn.Hardswish()), nn.Conv2d(16, 8, 1)

        def forward(self, x):
            a = self.act1(self.c1(x))
            y = self.c3(torch.cat([self.up(self.c2(a)), a], 1))
            return nn.functional.interpolate(self.c4(y), scale_factor=0.5, mode="bilinear")

    torch.manual_seed(0)
    model, x = Neck().eval(), (torch.randn(2, 3, 16, 16),)
    a = analyze(model, x)
    assert sorted(g.size for g in a.by_kind("channels") if g.resizable) == [16, 16, 32]
    assert any(m.param == "act1.weight" for g in a.groups for m in g.members)
    assert all(c["ok"] for c in invariance_checks(model, a, x))


def test_a_bias_added_through_the_attention_mask_ties_the_heads(tmp_path):
    """T5 adds one per-head position bias to every layer's scores through SDPA's mask: the layers' heads are one
    group holding the bias table's head columns, so a permutation of heads is exact (it was not while the mask
    was left out of the analysis) and removing heads keeps the rest."""
    from dotresize_fx.outputs import model_outputs
    model, x = models.hf_t5_encoder()
    a = analyze(model, x)
    heads = a.by_kind("heads")
    assert len(heads) == 1 and any(m.param.endswith("relative_attention_bias.weight") for m in heads[0].members)
    assert all(c["ok"] for c in invariance_checks(model, a, x))
    report = run(Job(f"{MODELS}:hf_t5_encoder", PassSpec.parse("prune:heads=0.5"), data="random", calib_samples=4,
                     out=str(tmp_path / "o"), progress=False))
    bias = report["_model"].encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert report["widths"] == {"heads.0": 2} and bias.shape[1] == 2
    with torch.no_grad():
        assert torch.equal(model_outputs(load(tmp_path / "o").model, x), model_outputs(report["_model"], x))


def test_a_hugging_face_swin_resizes_heads_mlp_and_its_second_stage():
    """Padding and rolling are positions; the first stage's stream starts at the embedding's norm (skipped and
    listed), the second stage's stream, every MLP and the heads (with their bias-table columns) shrink."""
    model, x = models.hf_swin()
    a = analyze(model, x)
    assert all(c["ok"] for c in invariance_checks(model, a, x))
    report = run(Job(f"{MODELS}:hf_swin", PassSpec.parse("prune:heads=0.5,mlp=0.25,residual=0.25,round_to=4"),
                     data="random", calib_samples=4, progress=False))
    assert report["widths"]["residual.1"] == 24 and report["widths"]["heads.1"] == 2
    params = dict(report["_model"].named_parameters())
    assert params["swin.encoder.layers.1.blocks.0.attention.relative_position_bias.relative_position_bias_table"].shape[1] == 2


def test_layer_scale_folds_into_its_producer_so_the_stream_rotates():
    """timm's LayerScale (γ · proj(h)) is no channel-wise op of the stream once γ moves into proj's rows: a
    rotation of the stream is exact, and DOTResize merges the residual (γ is all ones afterwards)."""
    model, x = vision.vit()
    a = analyze(model, x)
    residual = a.by_kind("residual")[0]
    assert residual.scales == {"blocks.0.attn.proj": "blocks.0.ls1.gamma", "blocks.0.mlp.fc2": "blocks.0.ls2.gamma",
                               "blocks.1.attn.proj": "blocks.1.ls1.gamma", "blocks.1.mlp.fc2": "blocks.1.ls2.gamma"}
    checks = invariance_checks(model, a, x)
    assert [c["name"] for c in checks if c["name"].startswith("rotation")] == ["rotation residual.0"]
    assert all(c["ok"] and c["max_abs_diff"] < 1e-12 for c in checks)
    report = run(Job(f"{FACTORY}:vit", PassSpec.parse("dotresize:residual=0.25,round_to=4"), data="random",
                     calib_samples=4, progress=False))
    params = dict(report["_model"].named_parameters())
    assert report["widths"]["residual.0"] == 24 and torch.equal(params["blocks.1.ls2.gamma"], torch.ones(24))
