"""dotresize_fx: graph transforms that resize the width of PyTorch models.

    import dotresize_fx
    analysis = dotresize_fx.analyze(model, example_inputs)      # WidthGroups
    report = dotresize_fx.compress("smollm2-135m", "dotresize:mlp=0.25", data="sotu", out="out/d")
    model, tokenizer, inputs = dotresize_fx.load("out/d")       # any model spec, or a compress output
"""
from .analyze import analyze
from .compress import Job, Pipeline, compress
from .errors import DotResizeError
from .load import load

__all__ = ["analyze", "compress", "load", "Pipeline", "Job", "DotResizeError"]
