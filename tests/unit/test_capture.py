"""Capture: torch.export with dynamic batch and sequence, checked against the eager model."""
import pytest
import torch

import models
from dotresize_fx.capture import capture
from dotresize_fx.errors import DotResizeError
from dotresize_fx.outputs import model_outputs


def test_capture_is_dynamic_in_batch_and_sequence():
    model, inputs = models.llama()
    c = capture(model, inputs)
    ids = torch.randint(0, models.VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model_outputs(c.program.module(), (ids,)), model(ids).logits, atol=1e-5)
    assert "model.layers.0.mlp.down_proj.weight" in c.input_param.values()
    assert any(m == "model.layers.0.mlp.down_proj" for m in c.node_module.values())


class _Noisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + torch.rand_like(x)


def test_a_capture_that_changes_the_function_is_refused():
    with pytest.raises(DotResizeError, match="differs from the eager model"):
        capture(_Noisy().eval(), (torch.randn(2, 4),))
