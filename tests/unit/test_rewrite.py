"""Identity, permutation and residual-rotation maps reproduce every architecture's outputs (DESIGN §6)."""
import pytest
import torch

import models
from dotresize_fx.analyze import analyze
from dotresize_fx.maps import WidthMap
from dotresize_fx.rewrite import apply
from dotresize_fx.verify import VERIFY_TOL, invariance_checks


FLOAT64_THROUGHOUT = {"gpt2", "bert", "nanogpt", "mixer", "cnn"}   # no float32 ops in their forward


@pytest.mark.parametrize("arch", models.ALL)
def test_invariance_checks_pass(arch):
    model, inputs = getattr(models, arch)()
    checks = invariance_checks(model, analyze(model, inputs), inputs)
    names = [c["name"] for c in checks]
    assert names[:2] == ["identity", "permutation"]
    for c in checks:
        assert c["ok"] and c["max_abs_diff"] <= VERIFY_TOL[torch.float32], c
    # models that compute in float64 throughout are held to float64's floor
    assert all(c["compute_dtype"] == ("torch.float64" if arch in FLOAT64_THROUGHOUT else "torch.float32")
               for c in checks)
    if arch not in ("bert", "cnn", "mixer", "gemma3", "gemma2", "olmo2"):  # streams that rotate: the rotations run
        assert {"rotation residual.0", "per-layer rotation residual.0"} <= set(names)


def test_a_wrong_map_is_caught():
    """The check can fail: a map that is not a permutation changes the outputs."""
    model, inputs = models.llama()
    a = analyze(model, inputs)
    mlp = a.by_kind("mlp")[0]
    M = torch.eye(mlp.size, dtype=torch.float64)
    M[0, 1] = 0.5
    new, _ = apply(model, a, {mlp.name: WidthMap(mlp.name, M, torch.eye(mlp.size, dtype=torch.float64))})
    with torch.no_grad():
        assert (new(*inputs).logits - model(*inputs).logits).abs().max() > 1e-3


def test_apply_does_not_modify_the_input_and_updates_config():
    model, inputs = models.llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = analyze(model, inputs)
    mlp = a.by_kind("mlp")
    keep = torch.arange(0, 96, 2)
    maps = {g.name: WidthMap.selection(g.name, g.size, keep) for g in mlp}
    new, report = apply(model, a, maps)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert new.config.intermediate_size == 48 and report.stock
    assert new.model.layers[0].mlp.down_proj.in_features == 48
    with torch.no_grad():
        assert new(*inputs).logits.shape == model(*inputs).logits.shape
