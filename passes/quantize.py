"""Quantization of an exported ONNX model's MatMul weights with onnxruntime.quantization (a pass after export).

It reads the float ONNX file and writes a quantized one beside it (`model.<scheme>.onnx`); the caller validates
it the same way as the float file (perplexity under ORT; no parity tolerance, quantization is lossy by design).
  int8  dynamic int8 (`quantize_dynamic`): weights per tensor, or per output channel with `per_channel=1`;
        activations quantized on the fly. With `weight_only=1`: 8-bit block-wise weights (MatMulNBits, as int4)
        and float activations
  int4  weight-only, block-wise (`MatMulNBitsQuantizer` → MatMulNBits nodes): `block_size` weights share a
        scale; `algo=rtn` (round to nearest, min-max per block), `hqq` (half-quadratic, 4 bits only) or
        `gptq` (`passes.gptq`: rounding errors compensated on `samples` calibration windows of the job's
        data, asymmetric blocks); `accuracy_level` picks MatMulNBits' compute type (0: unset, 1: fp32,
        2: fp16, 3: bf16, 4: int8; only 4 decodes fast on CPUs)
`head=0` keeps the last MatMul (the LM head) in float; embeddings are Gather ops and stay float. A head tied to
the embedding reads it through a Transpose (the exporter does not fold a shared weight), which no quantizer
touches: to quantize such a head, its transposed weight becomes an initializer of its own first (the embedding
keeps the float one). The report lists the MatMuls left in float (`float_matmuls`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
import torch

from dotresize_fx.errors import DotResizeError
from dotresize_fx.export import size_mb, staged
from passes.gptq import quantize_gptq

_QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits")


@dataclass(frozen=True)
class QuantizeConfig:
    scheme: Literal["int8", "int4"] = "int8"
    per_channel: bool = False           # dynamic int8: one scale per output channel instead of per tensor
    weight_only: bool = False           # int8: block-wise 8-bit weights (MatMulNBits); int4 always is
    block_size: int = 128               # MatMulNBits (int4, int8 weight_only)
    algo: Literal["rtn", "hqq", "gptq"] = "rtn"  # MatMulNBits
    samples: int = 64                   # gptq: calibration windows (of the job's --seq-len)
    accuracy_level: int = 0             # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    head: bool = True                   # quantize the LM head too

    @property
    def name(self) -> str:
        """The scheme as reports and tables name it: int8 (dynamic), int8-weight, int4."""
        return "int8-weight" if self.scheme == "int8" and self.weight_only else self.scheme

    @property
    def bits(self) -> int | None:
        """MatMulNBits' bits, or None for dynamic int8."""
        return 4 if self.scheme == "int4" else 8 if self.weight_only else None

    def __post_init__(self):
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise DotResizeError(f"quantize block_size={self.block_size}: use a power of two ≥ 16 (32, 64, 128)")
        if not 0 <= self.accuracy_level <= 4:
            raise DotResizeError(f"quantize accuracy_level={self.accuracy_level}: use 0..4")
        if self.samples != 64 and self.algo != "gptq":
            raise DotResizeError("quantize samples applies to algo=gptq (the others need no calibration)")
        if self.samples < 1:
            raise DotResizeError(f"quantize samples={self.samples}: use at least 1 calibration window")
        blockwise = (self.block_size, self.algo, self.accuracy_level) != (128, "rtn", 0)
        if self.bits is None and blockwise:   # accepted and ignored would be worse than refused
            raise DotResizeError("quantize block_size, algo and accuracy_level apply to block-wise weights: use "
                                 "int4, or int8 with weight_only=1")
        if self.bits is not None and self.per_channel:
            raise DotResizeError("quantize per_channel applies to dynamic int8; block-wise weights already have "
                                 "a scale per block of each channel (block_size)")
        if self.algo == "hqq" and self.bits != 4:
            raise DotResizeError("quantize algo=hqq is 4-bit only: use int4, or algo=rtn")


def quantize_onnx(src: Path, dst: Path, config: QuantizeConfig = QuantizeConfig(),
                  calibration: Callable[[int], list[torch.Tensor]] | None = None) -> dict:
    """Quantize MatMul weights by `config`; returns sizes and node counts. A source with external data (a large
    model) gets a quantized file with external data too. `calibration(n)`: n calibration input batches (the
    file's first input), for `algo=gptq`."""
    if config.algo == "gptq" and calibration is None:
        raise DotResizeError("quantize algo=gptq calibrates on data: run it in `compress` (which passes its "
                             "--data), or give calibration batches to quantize_onnx")
    src, dst = Path(src), Path(dst)
    external = src.with_name(f"{src.name}.data").exists()
    model = onnx.load(str(src))
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    exclude = [matmuls[-1].name] if matmuls and not config.head else []
    if matmuls and config.head:
        _own_head_weight(model, matmuls[-1])
    with staged(dst) as tmp:
        try:
            if config.bits is None:
                from onnxruntime.quantization import QuantType, quantize_dynamic
                quantize_dynamic(model, str(tmp), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                                 per_channel=config.per_channel, nodes_to_exclude=exclude,
                                 use_external_data_format=external)
            else:
                _nbits(model, tmp, config, exclude, external, src.parent, calibration)
        except Exception as e:
            raise DotResizeError(f"{config.scheme} quantization of {src} failed: {type(e).__name__}: {e}") from e
    after = onnx.load(str(dst), load_external_data=False)
    left = [n.name for n in after.graph.node if n.op_type == "MatMul"]
    return {"path": str(dst), "scheme": config.scheme, "name": config.name, "bits": config.bits,
            "algo": config.algo if config.bits else None, "block_size": config.block_size if config.bits else None,
            "calib_samples": config.samples if config.algo == "gptq" else None, "matmul_nodes": len(matmuls),
            "quantized_nodes": sum(n.op_type in _QUANTIZED_OPS for n in after.graph.node),
            "head_quantized": bool(matmuls) and matmuls[-1].name not in left, "float_matmuls": left,
            "size_mb_before": size_mb(src), "size_mb_after": size_mb(dst)}


def _own_head_weight(model, head) -> None:
    """Give a head that reads an initializer through a Transpose its own transposed copy of it."""
    from onnx import numpy_helper
    producer = next((n for n in model.graph.node if head.input[1] in n.output), None)
    inits = {i.name: i for i in model.graph.initializer}
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
        return
    perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), None)
    weight = numpy_helper.to_array(inits[producer.input[0]]).transpose(perm)
    name = f"{producer.input[0]}.transposed"
    model.graph.initializer.append(numpy_helper.from_array(weight.copy(), name))
    head.input[1] = name
    if not any(producer.output[0] in n.input for n in model.graph.node):
        model.graph.node.remove(producer)


def _nbits(model, tmp: Path, config: QuantizeConfig, exclude: list[str], external: bool, base_dir: Path,
           calibration) -> None:
    if config.algo == "gptq":
        quantize_gptq(model, exclude, calibration(config.samples), base_dir, config.bits, config.block_size,
                      config.accuracy_level)
        onnx.save(model, str(tmp), save_as_external_data=external, location=f"{tmp.name}.data")
        return
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    level = config.accuracy_level or None
    algo = (nbits.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=config.bits) if config.algo == "hqq"
            else nbits.DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=True,
                                                    accuracy_level=level, bits=config.bits))
    quant = nbits.MatMulNBitsQuantizer(model, bits=config.bits, block_size=config.block_size, is_symmetric=True,
                                       accuracy_level=level, nodes_to_exclude=exclude, algo_config=algo)
    quant.process()
    quant.model.save_model_to_file(str(tmp), use_external_data_format=external)
