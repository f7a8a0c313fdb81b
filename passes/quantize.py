"""int8 dynamic quantization of an exported ONNX model's MatMul weights (onnxruntime.quantization).

A pass after export: it reads the float ONNX file and writes a quantized one beside it. The caller validates it
the same way as the float file (perplexity under ORT; no parity tolerance, int8 is lossy by design).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from dotresize_fx.errors import DotResizeError


@dataclass(frozen=True)
class QuantizeConfig:
    scheme: Literal["int8"] = "int8"
    per_channel: bool = False


def quantize_onnx(src: Path, dst: Path, config: QuantizeConfig = QuantizeConfig()) -> dict:
    """Quantize MatMul weights to int8 (activations quantized on the fly); returns sizes and node counts."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    if config.scheme != "int8":
        raise DotResizeError(f"quantize:{config.scheme}: only int8 is supported")
    tmp = dst.with_name(f".{dst.name}.tmp.onnx")
    try:
        quantize_dynamic(str(src), str(tmp), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=config.per_channel)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DotResizeError(f"int8 quantization of {src} failed: {type(e).__name__}: {e}") from e
    tmp.replace(dst)
    before, after = onnx.load(str(src), load_external_data=False), onnx.load(str(dst), load_external_data=False)
    matmuls = sum(n.op_type == "MatMul" for n in before.graph.node)
    quantized = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
                    for n in after.graph.node)
    return {"path": str(dst), "matmul_nodes": matmuls, "quantized_nodes": quantized,
            "size_mb_before": src.stat().st_size / 2**20, "size_mb_after": dst.stat().st_size / 2**20}
