"""Pass construction: checked options, registries, target planning, and the pass contract."""
from pathlib import Path

import pytest
import torch

import models
from dotresize_fx import fit
from dotresize_fx.analyze import analyze
from dotresize_fx.compress import PassSpec
from dotresize_fx.errors import DotResizeError
from dotresize_fx.options import choices
from dotresize_fx.targets import Targets, plan_widths
from passes import EXPORT_PASSES, TRAIN_PASSES, WIDTH_PASSES, build_pass, width_config
from passes import ot as dot


def _config(text):
    return width_config(PassSpec.parse(text)[0])


def test_options_are_typed_and_checked():
    c = _config("dotresize:mlp=0.25,cost=cosine,refine=0,reg=1,pure_producers=true")
    assert (c.cost, c.refine, c.reg, c.pure_producers, c.targets.mlp) == ("cosine", False, 1.0, True, 0.25)
    for text, words in [("dotresize:mlp=0.2,cost=l3", "l2, cosine"), ("prune:mlp=0.2,unmerge=ot", "select, ls"),
                        ("prune:mlp=0.2,round_to=x", "expected a int"), ("pca:mlp=0.2", "residual stream only")]:
        with pytest.raises(DotResizeError, match=words):
            _config(text)


def test_registries_drive_choices_and_adding_an_importance_is_one_entry(monkeypatch):
    from dotresize_fx.cli import _choices
    methods, importances, unmerges = _choices()
    assert methods == list(WIDTH_PASSES) and importances == list(fit.IMPORTANCES)
    assert set(unmerges) == {"select", "ls", "ot", "pinv"}
    assert choices(WIDTH_PASSES["dotresize"].Config, "cost") == tuple(dot.COSTS)


def test_readme_lists_every_registered_choice():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    names = [*WIDTH_PASSES, *TRAIN_PASSES, *EXPORT_PASSES, *fit.IMPORTANCES, *dot.COSTS, *dot.MARGINALS]
    missing = [n for n in names if f"`{n}" not in readme and f"{n}`" not in readme and f"|{n}" not in readme]
    assert not missing, missing


def test_plan_refuses_targets_that_match_nothing_or_change_nothing():
    a = analyze(*models.cnn())
    with pytest.raises(DotResizeError, match="matches no group: this model has .*channels"):
        plan_widths(a, Targets(mlp=0.25))
    a = analyze(*models.llama())
    with pytest.raises(DotResizeError, match="rounds to no change"):
        plan_widths(a, Targets(mlp=0.01))
    with pytest.raises(DotResizeError, match="no targets"):
        plan_widths(a, Targets())
    plan = plan_widths(a, Targets(mlp=0.3, heads=0.3))
    assert [w for n, w in plan.widths.items() if n.startswith("mlp")] == [(64, None)] * 2


def test_a_pass_needs_batches_and_the_analysis_of_its_model():
    model, inputs = models.llama()
    a = analyze(model, inputs)
    spec = PassSpec.parse("prune:mlp=0.25")[0]
    with pytest.raises(DotResizeError, match="calibration batches"):
        build_pass(spec, a, inputs, [])
    with pytest.raises(DotResizeError, match="analysis is of another model"):
        build_pass(spec, analyze(*models.nanogpt()), inputs, [inputs])(model)
    result = build_pass(spec, a, inputs, [inputs])(model)
    assert result.modified and result.graph_module.model.layers[0].mlp.down_proj.in_features == 72
    assert model.model.layers[0].mlp.down_proj.in_features == 96      # the input model is left alone


def test_channel_targets_prune_a_cnn():
    model, inputs = models.cnn()
    a = analyze(model, inputs)
    result = build_pass(PassSpec.parse("prune:channels=0.25,round_to=4")[0], a, inputs, [inputs])(model)
    new = result.graph_module
    assert (new.conv1.out_channels, new.bn1.num_features, new.conv2.in_channels) == (12, 12, 12)
    assert (new.conv2.out_channels, new.bn2.running_var.shape[0], new.fc.in_features) == (16, 16, 16)
    with torch.no_grad():
        assert new(*inputs).shape == model(*inputs).shape


def test_the_report_names_the_transport_that_ran():
    model, inputs = models.llama()
    a = analyze(model, inputs)
    for text, words in [("dotresize:mlp=0.25", "semi-relaxed"), ("dotresize:mlp=0.25,marginals=uniform,solver=emd",
                                                                 "balanced OT (uniform marginals), emd")]:
        p = build_pass(PassSpec.parse(text)[0], a, inputs, [inputs])
        p(model)
        assert words in p.report["transport"]
