"""Model specs and their errors: one line naming the cause, no traceback (DESIGN §9)."""
import pytest
import torch

from dotresize_fx.cli import main
from dotresize_fx.errors import DotResizeError
from dotresize_fx.evaluate import parameter_counts, perplexity
from dotresize_fx.load import load


def _write(tmp_path, body):
    f = tmp_path / "f.py"
    f.write_text("import torch\n" + body)
    return f


def test_factory_spec_loads(tmp_path):
    f = _write(tmp_path, "def make():\n    return torch.nn.Linear(3, 4), (torch.zeros(1, 3),)\n")
    model, tok, inputs = load(f"{f}:make")
    assert isinstance(model, torch.nn.Linear) and tok is None and inputs[0].shape == (1, 3)


@pytest.mark.parametrize("body, message", [
    ("def make():\n    raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
    ("def make():\n    return 3\n", "returned int"),
    ("def make():\n    return torch.nn.Linear(3, 4), 'x'\n", "not a tuple of tensors"),
    ("x = 1\n", "no callable 'make'"),
])
def test_bad_factories(tmp_path, body, message):
    f = _write(tmp_path, body)
    with pytest.raises(DotResizeError, match=message):
        load(f"{f}:make")


@pytest.mark.parametrize("spec, message", [("no-such-model", "unknown model spec"),
                                           ("missing.gguf", "does not exist"),
                                           ("missing.py:f", "does not exist")])
def test_bad_specs_exit_2_with_one_line(spec, message, capsys):
    assert main(["eval", spec, "--data", "sotu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_perplexity_of_a_uniform_model_is_the_vocabulary():
    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 50)
    windows = torch.randint(0, 50, (3, 9))
    r = perplexity(Uniform(), windows, corpus="x", progress=False)
    assert abs(r["ppl"] - 50) < 1e-3 and r["tokens"] == 24 and r["seq_len"] == 9 and r["corpus"] == "x"


def test_parameter_counts_exclude_input_embedding_only():
    import models
    model, _ = models.nanogpt()   # tied head: counted once, inside the embedding
    counts = parameter_counts(model)
    assert counts["total"] - counts["non_embedding"] == model.wte.weight.numel()
