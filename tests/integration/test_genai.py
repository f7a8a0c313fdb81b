"""`dotresize-fx genai OUT`: onnxruntime-genai's builder turns a stock compress output into a KV-cache package
whose Generator reproduces torch's greedy tokens (fp32); a non-stock output is refused with the reason."""
import json
from pathlib import Path

import pytest

from dotresize_fx.cli import main
from dotresize_fx.errors import DotResizeError
from dotresize_fx.genai import build

FACTORY = str(Path(__file__).resolve().parents[1] / "models.py")


def test_a_stock_output_becomes_a_genai_package_with_torch_tokens(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "o"
    assert main(["compress", f"{FACTORY}:llama_with_tokenizer", "--passes", "prune:mlp=0.25,heads=0.5", "--data", "random",
                 "--out", str(out)]) == 0
    assert main(["genai", str(out), "--dest", str(tmp_path / "pkg"), "--prompt-ids", "5,9,2,7",
                 "--max-new-tokens", "8", "--json", str(tmp_path / "g.json")]) == 0
    r = json.loads((tmp_path / "g.json").read_text())
    config = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())["model"]["decoder"]
    assert r["same_tokens"] and len(r["genai_tokens"]) == 8 and r["genai"]["decode_tokens_per_s"] > 0
    assert config["num_key_value_heads"] == 1   # the resized kv heads (2 → 1) are the package's cache shape
    with pytest.raises(DotResizeError, match="exists"):
        build(out, tmp_path / "pkg")


def test_a_non_stock_output_is_refused(tmp_path):
    """Our own format (non-uniform widths, a program): the plan says so, and the builder is not run."""
    pytest.importorskip("onnxruntime_genai")
    for files in ({"resize_plan.json": json.dumps({"stock": False}), "config.json": "{}"}, {}):
        out = tmp_path / f"o{len(files)}"
        out.mkdir()
        for name, text in files.items():
            (out / name).write_text(text)
        with pytest.raises(DotResizeError, match="not a stock Hugging Face checkpoint"):
            build(out, tmp_path / "pkg")
