"""Passes built on the toolkit. `build_pass` turns a PassSpec (`prune:mlp=0.2`) into a configured pass."""
from __future__ import annotations

from dotresize_fx.errors import DotResizeError
from dotresize_fx.pipeline import Targets

_TARGET_KEYS = ("mlp", "heads", "residual", "round_to", "residual_maps")


def build_pass(spec, analysis, calibration, probe, batches=None, progress=None):
    opts = dict(spec.options)
    targets = Targets(**{k: opts.pop(k) for k in _TARGET_KEYS if k in opts})
    try:
        if spec.method == "prune":
            from .prune import PruneConfig, PrunePass
            return PrunePass(PruneConfig(targets=targets, **opts), analysis, calibration, probe, batches, progress)
        if spec.method == "dotresize":
            from .dotresize import DotResizeConfig, DotResizePass
            return DotResizePass(DotResizeConfig(targets=targets, **opts), analysis, calibration, probe, batches,
                                 progress)
        if spec.method == "pca":
            from .pca import PCAConfig, PCAPass
            return PCAPass(PCAConfig(targets=targets, **opts), analysis, calibration, probe, batches, progress)
    except TypeError as e:
        raise DotResizeError(f"pass {spec.method}: bad option ({e}); see 'dotresize-fx compress --help'") from e
    raise DotResizeError(f"unknown pass {spec.method!r}: use prune, dotresize or pca")
