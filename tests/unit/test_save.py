"""Saving: atomic, never pickled, never into the input; the plan replays to the same model."""
import json

import pytest
import torch

import models
from dotresize_fx.analyze import analyze
from dotresize_fx.errors import DotResizeError
from dotresize_fx.load import load
from dotresize_fx.maps import WidthMap
from dotresize_fx.rewrite import apply
from dotresize_fx.save import PLAN_FILE, check_output_dir, save


def _resized(tmp_path):
    model, inputs = models.nanogpt()
    a = analyze(model, inputs)
    g = a.by_kind("mlp")[0]
    new, _ = apply(model, a, {g.name: WidthMap.selection(g.name, g.size, torch.arange(0, g.size, 2))})
    return new, inputs


def test_save_writes_safetensors_and_a_plan_only_and_replays(tmp_path):
    new, inputs = _resized(tmp_path)
    out = save(new, tmp_path / "o", source=f"{models.__file__}:nanogpt")
    assert sorted(p.name for p in out.iterdir()) == ["buffers.safetensors", "model.safetensors", PLAN_FILE]
    assert not list(tmp_path.glob(".*"))                      # no temporary directory left behind
    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["shapes"]["blocks.0.mlp_proj.weight"] == [32, 64]
    with torch.no_grad():
        assert torch.equal(load(out).model(*inputs), new(*inputs))


def test_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    new, _ = _resized(tmp_path)
    import dotresize_fx.save as save_mod

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(save_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save(new, tmp_path / "o", source=f"{models.__file__}:nanogpt")
    assert list(tmp_path.iterdir()) == []


def test_output_dir_checks(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    with pytest.raises(DotResizeError, match="inside the input model's directory"):
        check_output_dir(src / "out", str(src), overwrite=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(DotResizeError, match="--overwrite"):
        check_output_dir(tmp_path / "taken", str(src), overwrite=False)
    check_output_dir(tmp_path / "taken", str(src), overwrite=True)
