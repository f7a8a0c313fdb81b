"""Every example runs at small size and checks its own round trip."""
import importlib.util
import json
from pathlib import Path

import onnx
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _main(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("name", ["compress_hf", "compress_custom_module", "compress_vision"])
def test_example_round_trip(name, tmp_path, capsys):
    assert _main(name)(["--out", str(tmp_path / "out")]) == 0
    assert "identical" in capsys.readouterr().out


def test_pipeline_example_writes_float_and_int8_onnx(tmp_path):
    assert _main("pipeline_onnx")(["--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    o = report["onnx"]
    assert o["param_ratio"] == pytest.approx(report["nonembed_params_after"] / report["nonembed_params_before"])
    assert o["latency_within_bound"] == (o["latency_ratio"] <= o["param_ratio"] + 0.05)
    q = onnx.load(str(tmp_path / "out" / "model.int8.onnx"))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in q.graph.node)
