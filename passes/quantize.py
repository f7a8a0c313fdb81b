"""Quantization of an exported ONNX model's MatMul weights with onnxruntime.quantization (a pass after export).

It reads the float ONNX file and writes a quantized one beside it (`model.<scheme>.onnx`); the caller validates
it the same way as the float file (perplexity under ORT; no parity tolerance, quantization is lossy by design).
  int8  dynamic int8 (`quantize_dynamic`): weights per tensor, or per output channel with `per_channel=1`;
        activations quantized on the fly
  int4  weight-only, block-wise (`MatMulNBitsQuantizer` → MatMulNBits nodes): `block_size` weights share a
        scale; `algo=rtn` (round to nearest, min-max per block) or `hqq` (half-quadratic); `accuracy_level`
        picks MatMulNBits' compute type (0: unset, 1: fp32, 2: fp16, 3: bf16, 4: int8)
`head=0` keeps the last MatMul (the LM head) in float; embeddings are Gather ops and stay float.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from dotresize_fx.errors import DotResizeError

_QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits")


@dataclass(frozen=True)
class QuantizeConfig:
    scheme: Literal["int8", "int4"] = "int8"
    per_channel: bool = False           # int8: one scale per output channel instead of per tensor
    block_size: int = 128               # int4
    algo: Literal["rtn", "hqq"] = "rtn"  # int4
    accuracy_level: int = 0             # int4: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    head: bool = True                   # quantize the LM head too

    def __post_init__(self):
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise DotResizeError(f"quantize block_size={self.block_size}: use a power of two ≥ 16 (32, 64, 128)")
        if not 0 <= self.accuracy_level <= 4:
            raise DotResizeError(f"quantize accuracy_level={self.accuracy_level}: use 0..4")


def quantize_onnx(src: Path, dst: Path, config: QuantizeConfig = QuantizeConfig()) -> dict:
    """Quantize MatMul weights by `config`; returns sizes and node counts."""
    tmp = dst.with_name(f".{dst.name}.tmp.onnx")
    model = onnx.load(str(src))
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    exclude = [matmuls[-1].name] if matmuls and not config.head else []
    try:
        if config.scheme == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(str(src), str(tmp), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=config.per_channel, nodes_to_exclude=exclude)
        else:
            _int4(model, tmp, config, exclude)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DotResizeError(f"{config.scheme} quantization of {src} failed: {type(e).__name__}: {e}") from e
    tmp.replace(dst)
    after = onnx.load(str(dst), load_external_data=False)
    return {"path": str(dst), "scheme": config.scheme, "matmul_nodes": len(matmuls),
            "quantized_nodes": sum(n.op_type in _QUANTIZED_OPS for n in after.graph.node),
            "head_quantized": config.head, "size_mb_before": src.stat().st_size / 2**20,
            "size_mb_after": dst.stat().st_size / 2**20}


def _int4(model, tmp: Path, config: QuantizeConfig, exclude: list[str]) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    algo = (nbits.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4) if config.algo == "hqq" else
            nbits.DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=True,
                                               accuracy_level=config.accuracy_level or None, bits=4))
    quant = nbits.MatMulNBitsQuantizer(model, bits=4, block_size=config.block_size, is_symmetric=True,
                                       accuracy_level=config.accuracy_level or None, nodes_to_exclude=exclude,
                                       algo_config=algo)
    quant.process()
    quant.model.save_model_to_file(str(tmp), use_external_data_format=False)
