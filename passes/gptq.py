"""GPTQ weight quantization of an ONNX file's MatMuls, written as onnxruntime MatMulNBits nodes.

GPTQ (Frantar et al., 2022) quantizes a weight W ∈ R^{K×N} (x·W, K inputs) one input row at a time and moves
each row's rounding error onto the rows not yet quantized, so that the layer's output on calibration inputs X
stays close: it minimises ‖XW − XŴ‖² greedily with H = XᵀX. Codes are asymmetric and block-wise: every
`block` consecutive inputs of one output column share a scale s and a zero point z (ŵ = (q − z)·s, q ∈
[0, 2^bits − 1]), the layout MatMulNBits reads; s and z come from the block's min and max, shrunk by the
grid value with the least rounding error, set from W before any update (act-order, the default) or when GPTQ
reaches the block. H is accumulated from onnxruntime running the float file itself (every MatMul's input as an
extra output), so the pass needs nothing but the file and calibration inputs.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from dotresize_fx.errors import DotResizeError
from dotresize_fx.export import _feed, session


def input_grams(model: onnx.ModelProto, names: list[str], batches: Iterable[torch.Tensor], base_dir: Path,
                threads: int = 2) -> dict[str, torch.Tensor]:
    """H = Σ XᵀX (float64) of each named tensor over the calibration batches, under onnxruntime. The named
    tensors become extra graph outputs of a temporary copy of the file (written beside `base_dir`'s data)."""
    outputs = list(model.graph.output)
    known = {o.name for o in outputs}
    model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in known)
    try:
        with tempfile.TemporaryDirectory(dir=base_dir) as tmp:
            path = Path(tmp) / "grams.onnx"
            onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 2**31 - 2**26)
            sess = session(path, threads)
            grams: dict[str, torch.Tensor] = {}
            for ids in batches:
                for name, x in zip(names, sess.run(names, _feed(sess, ids.numpy()))):
                    x = torch.from_numpy(x).reshape(-1, x.shape[-1]).to(torch.float64)
                    grams[name] = grams.get(name, 0) + x.T @ x
    finally:
        del model.graph.output[:]
        model.graph.output.extend(outputs)
    if not grams:
        raise DotResizeError("gptq quantization needs calibration batches: none were given")
    return grams


def _gram_chunks(targets: list, inits: dict) -> list[list]:
    """The MatMuls in graph order, cut where their inputs' K × K float64 Grams would pass `GRAM_BYTES` (MatMuls
    that share an input stay in one chunk)."""
    chunks, current, seen, size = [], [], set(), 0
    for node in targets:
        K = inits[node.input[1]].dims[0]
        extra = 0 if node.input[0] in seen else 8 * K * K
        if current and node.input[0] not in seen and size + extra > GRAM_BYTES:
            chunks.append(current)
            current, seen, size = [], set(), 0
        current.append(node)
        seen.add(node.input[0])
        size += extra
    return chunks + [current] if current else chunks


SHRINKS = tuple(1 - 0.02 * i for i in range(11))   # 1.0 … 0.8


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 4, block: int = 32, damp: float = 0.01,
         act_order: bool = True, lazy: int = 128, shrinks: tuple[float, ...] = SHRINKS
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q (N × K', uint8), scales s and zero points z (N × K'/block) of W ∈ R^{K×N} for inputs with Gram
    H ∈ R^{K×K}; K' is K padded to a multiple of `block` (padded rows are zero).

    With H⁻¹ = UᵀU (U upper Cholesky), input row k is rounded, q_k = clamp(round(w_k/s) + z), and its error
    e_k = (w_k − ŵ_k) / U_kk updates the rows after it, w_j ← w_j − e_k·U_kj (j > k): the optimal
    compensation for the remaining rows under ‖X(W − Ŵ)‖². `damp`·mean(diag H) is added to H's diagonal.
    `act_order`: rows go in order of decreasing H_kk (the inputs with the most energy first, while the most
    rows are left to absorb their error); the blocks' s and z are then set from W before any update (static
    groups), so the file keeps MatMulNBits' plain block layout. Updates are applied `lazy` rows at a time."""
    K, N = W.shape
    pad = -K % block
    Wt = torch.cat([W.T.to(torch.float64), torch.zeros(N, pad, dtype=torch.float64)], 1)
    H = torch.block_diag(H.to(torch.float64), torch.zeros(pad, pad, dtype=torch.float64))
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    Wt[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    Kp, maxq, lazy = K + pad, 2 ** bits - 1, max(lazy // block, 1) * block
    scales = torch.zeros(N, Kp // block, dtype=torch.float64)
    zeros = torch.zeros(N, Kp // block, dtype=torch.float64)
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(Kp)
    if act_order:
        for g in range(Kp // block):
            scales[:, g], zeros[:, g] = minmax_params(Wt[:, g * block:(g + 1) * block], maxq, shrinks)
    Wt, H = Wt[:, order], H[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(N, Kp, dtype=torch.uint8)
    for i1 in range(0, Kp, lazy):
        i2 = min(i1 + lazy, Kp)
        W1, E1, U1 = Wt[:, i1:i2].clone(), torch.zeros(N, i2 - i1, dtype=torch.float64), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            k = int(order[i1 + i])
            if not act_order and k % block == 0:   # lazy is a multiple of block: the block lies in W1
                scales[:, k // block], zeros[:, k // block] = minmax_params(W1[:, i:i + block], maxq, shrinks)
            s, z = scales[:, k // block], zeros[:, k // block]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            codes[:, k] = q.to(torch.uint8)
            e = (w - (q - z) * s) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        Wt[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, scales, zeros


def minmax_params(block: torch.Tensor, maxq: int, shrinks: tuple[float, ...] = (1.0,)
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `block`: s = p·(max − min)/maxq over a range that includes 0, z = round(−p·min/s) (s = 1 for
    a constant row); p is the shrink of `shrinks` whose rounding error Σ|w − ŵ|^2.4 is least (GPTQ's grid;
    p = 1 is plain min-max, as round to nearest sets it)."""
    lo = block.min(1).values.clamp_max(0)
    hi = block.max(1).values.clamp_min(0)
    best_s = best_z = best_err = None
    for p in shrinks:
        s = torch.where(hi > lo, p * (hi - lo) / maxq, torch.ones_like(hi))
        z = torch.clamp(torch.round(-p * lo / s), 0, maxq)
        q = torch.clamp(torch.round(block / s[:, None]) + z[:, None], 0, maxq)
        err = ((q - z[:, None]) * s[:, None] - block).abs().pow(2.4).sum(1)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
        else:
            better = err < best_err
            best_s, best_z, best_err = torch.where(better, s, best_s), torch.where(better, z, best_z), \
                torch.minimum(err, best_err)
    return best_s, best_z


def matmul_nbits(node: onnx.NodeProto, K: int, N: int, codes: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bits: int, block: int, accuracy_level: int
                 ) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The MatMulNBits node (com.microsoft) that replaces `node`, and its initializers: B (N × blocks × bytes),
    scales (N × blocks) and packed zero points (N × ⌈blocks·bits/8⌉), low nibble first."""
    n_blocks = codes.shape[1] // block
    q = codes.numpy().reshape(N, n_blocks, block)
    zp = zeros.numpy().astype(np.uint8)
    if bits == 4:
        q = q[..., ::2] | (q[..., 1::2] << 4)
        if n_blocks % 2:
            zp = np.concatenate([zp, np.full((N, 1), 8, np.uint8)], 1)
        zp = zp[:, ::2] | (zp[:, 1::2] << 4)
    base = node.input[1]
    inits = [numpy_helper.from_array(np.ascontiguousarray(q), f"{base}_Q{bits}G{block}_gptq"),
             numpy_helper.from_array(scales.numpy().astype(np.float32), f"{base}_scale_gptq"),
             numpy_helper.from_array(np.ascontiguousarray(zp), f"{base}_zp_gptq")]
    attrs = {"K": K, "N": N, "bits": bits, "block_size": block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    new = helper.make_node("MatMulNBits", [node.input[0]] + [t.name for t in inits], list(node.output),
                           name=f"{node.name}_Q{bits}", domain="com.microsoft", **attrs)
    return new, inits


GRAM_BYTES = 1 << 30   # float64 Grams held at once; more inputs are calibrated in further passes


def quantize_gptq(model: onnx.ModelProto, exclude: list[str], batches: list[torch.Tensor], base_dir: Path,
                  bits: int, block: int, accuracy_level: int, damp: float = 0.01) -> int:
    """Replace every MatMul with a 2-d initializer weight (except `exclude`) by its GPTQ MatMulNBits node, in
    place; returns the number replaced. The inputs' Grams are taken `GRAM_BYTES` at a time (each chunk one
    onnxruntime pass over the batches: every Gram is of the float model's inputs, so the chunks do not
    change the result, only the memory)."""
    inits = {i.name: i for i in model.graph.initializer}
    targets = [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in exclude
               and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    replaced = {}
    for chunk in _gram_chunks(targets, inits):
        grams = input_grams(model, sorted({n.input[0] for n in chunk}), batches, base_dir)
        for node in chunk:
            W = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]], base_dir=str(base_dir)).copy())
            codes, scales, zeros = gptq(W, grams[node.input[0]], bits, block, damp)
            replaced[node.name], tensors = matmul_nbits(node, *W.shape, codes, scales, zeros, bits, block,
                                                        accuracy_level)
            model.graph.initializer.extend(tensors)
        del grams
    nodes = [replaced.get(n.name, n) if n.op_type == "MatMul" else n for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    still = {i for n in model.graph.node for i in n.input}
    for name in {n.input[1] for n in targets} - still:
        model.graph.initializer.remove(inits[name])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(targets)
