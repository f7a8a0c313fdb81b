"""ONNX export with dynamic batch/sequence, onnxruntime parity, and the export command's errors."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

import models
from dotresize_fx.cli import main
from dotresize_fx.errors import DotResizeError
from dotresize_fx.export import PARITY_TOL, check, to_onnx


@pytest.mark.parametrize("arch", ["llama", "nanogpt"])
def test_onnx_matches_torch_at_two_shapes(arch, tmp_path):
    model, inputs = getattr(models, arch)()
    path = to_onnx(model, inputs, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 10), (3, 17)]:
        ids = torch.randint(0, 128, shape)
        got = sess.run(None, {"input_ids": ids.numpy().astype(np.int64)})[0]
        with torch.no_grad():
            out = model(ids)
            want = (out.logits if hasattr(out, "logits") else out).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < PARITY_TOL


def test_failed_validation_says_by_how_much():
    with pytest.raises(DotResizeError, match="differ from torch by 0.5"):
        check({"max_abs_diff": 0.5})


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    f = tmp_path / "f.py"
    f.write_text("import torch\ndef m():\n    return torch.nn.Linear(4, 4), (torch.zeros(2, 4),)\n")
    assert main(["export", f"{f}:m", "--out", str(tmp_path / "missing" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_verify_command_json(tmp_path):
    import json
    assert main(["verify", f"{models.__file__}:llama", "--json", str(tmp_path / "v.json")]) == 0
    checks = json.loads((tmp_path / "v.json").read_text())["checks"]
    assert [c["name"] for c in checks] == ["identity", "permutation", "rotation residual.0"]
    assert all(c["ok"] and c["max_abs_diff"] < 1e-4 for c in checks)
