"""Passes built on the toolkit, by name. `width_config` checks a PassSpec's (`prune:mlp=0.2`) options, and every
pass class builds itself from its config and a `PassContext`; the CLI's choices and the README's list come from
these registries."""
from __future__ import annotations

from dataclasses import dataclass, fields

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
PASSES = WIDTH_PASSES | TRAIN_PASSES
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


@dataclass(frozen=True)
class PassContext:
    """What a pass is built from besides its config: the analysis of the model it will see, a probe input, the
    calibration batches, and how the job runs. `teacher` is a train pass's (dense targets, their batches)."""
    analysis: object
    inputs: tuple
    batches: list
    device: str = "cpu"
    progress: bool = False
    layerwise: bool = True
    inplace: bool = False      # a width pass may resize the model it is given (no dense copy kept)
    offload: object = None     # `offload.Offload`: weights kept on disk
    teacher: tuple | None = None


def build(spec, config, context: PassContext):
    """The pass `spec` names, configured (`config` from `width_config(spec)`)."""
    return PASSES[spec.method].build(config, context)


def build_pass(spec, analysis, probe, batches, layerwise: bool = True):
    """A width pass from its spec alone, on the CPU, without a bar (tests, benchmarks)."""
    return build(spec, width_config(spec), PassContext(analysis, probe, batches, layerwise=layerwise))
