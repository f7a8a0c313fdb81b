"""Passes built on the toolkit, by name. `build_pass` turns a PassSpec (`prune:mlp=0.2`) into a configured pass;
the CLI's choices and the README's list come from these registries."""
from __future__ import annotations

from dataclasses import fields

from dotresize_fx.errors import DotResizeError
from dotresize_fx.options import build_config
from dotresize_fx.targets import Targets

from .distill import DistillPass
from .dotresize import DotResizePass
from .pca import PCAPass
from .prune import PrunePass
from .quantize import QuantizeConfig

WIDTH_PASSES = {p.name: p for p in (PrunePass, DotResizePass, PCAPass)}
TRAIN_PASSES = {p.name: p for p in (DistillPass,)}   # change weights, not widths: after a width pass
EXPORT_PASSES = {"quantize": QuantizeConfig}      # run on the exported ONNX file
_TARGET_KEYS = {f.name for f in fields(Targets)}


def width_config(spec):
    """The checked config of a width or train pass spec (unknown pass, option or value: DotResizeError with the
    choices)."""
    cls = WIDTH_PASSES.get(spec.method)
    where = f"pass {spec.method}"
    if spec.method in TRAIN_PASSES:
        return build_config(TRAIN_PASSES[spec.method].Config, spec.options, where)
    if cls is None:
        raise DotResizeError(f"unknown pass {spec.method!r}: use one of "
                             f"{', '.join([*WIDTH_PASSES, *TRAIN_PASSES, *EXPORT_PASSES])}")
    targets = build_config(Targets, {k: v for k, v in spec.options.items() if k in _TARGET_KEYS}, where)
    return build_config(cls.Config, {k: v for k, v in spec.options.items() if k not in _TARGET_KEYS}, where,
                        targets=targets)


def export_config(spec):
    cls = EXPORT_PASSES.get(spec.method)
    if cls is None:
        raise DotResizeError(f"unknown export pass {spec.method!r}: use one of {', '.join(EXPORT_PASSES)}")
    return build_config(cls, spec.options, f"pass {spec.method}")


def build_pass(spec, analysis, probe, batches, progress=None, layerwise: bool = True):
    config = width_config(spec)
    return WIDTH_PASSES[spec.method](config, analysis, probe, batches, progress, layerwise)
