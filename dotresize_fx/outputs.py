"""A model's main output, whatever it returns (HF output objects, tuples, tensors)."""
from __future__ import annotations

import torch


def model_outputs(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    """The model's main output tensor on `inputs` (see `main_output`)."""
    return main_output(model(*inputs))


def main_output(out) -> torch.Tensor:
    """HF `logits`, else the tensor or the first element a model returned."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out
