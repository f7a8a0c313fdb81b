"""ONNX export (torch.onnx, dynamo) and validation under onnxruntime (DESIGN §6)."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import kvcache
from .cache import cache_dir
from .errors import DotResizeError
from .outputs import main_output, model_outputs

log = logging.getLogger(__name__)

PARITY_TOL = 1e-3
PPL_REL_TOL = 0.005
LATENCY_SLACK = 0.05  # the ONNX speed-up should follow the parameters removed, up to this much
# Opset 23 has ONNX's Attention op: the dense SmolLM2 at 8×512 runs 10% faster under onnxruntime than with
# opset 18's MatMul/Softmax attention (benchmarks/onnx_opset.py). 18, the exporter's default, is for runtimes
# without opset 23.
OPSET = 23
EXTERNAL_DATA_BYTES = 1 << 30   # weights above this go to external data (protobuf's limit is 2 GB)


class _Logits(torch.nn.Module):
    """input_ids (+ attention_mask) → logits: fixed input and output names whatever the model returns."""
    def __init__(self, model, mask: bool):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, input_ids, attention_mask=None):
        if self.mask:
            return main_output(self.model(input_ids, attention_mask=attention_mask))
        return model_outputs(self.model, (input_ids,))


def takes_mask(model: torch.nn.Module, example_inputs: tuple) -> bool:
    """Token-id models whose forward has an `attention_mask` argument export it as a second input."""
    if example_inputs[0].is_floating_point():
        return False
    try:
        return "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _native_gqa():
    """Hugging Face attention hands grouped-query keys and values to SDPA as they are (`enable_gqa`) instead of
    repeating them per query head when a mask is passed, so each `Attention` node reads SmolLM2's 3 kv heads
    instead of 9 copies, and the graph loses an Unsqueeze, an Expand and a Reshape per key and value. At 8×512
    under onnxruntime the speed difference is within run-to-run noise (6.84 vs 6.96 s in one A/B, 7.16 vs
    7.10 s in `benchmarks/onnx_opset.py --repeat-kv`)."""
    key, old = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def to_onnx(model: torch.nn.Module, example_inputs: tuple, path: str | Path, opset: int = OPSET,
            external_data: bool | None = None) -> Path:
    """Export with dynamic batch and sequence (and past length: a decoder that generates is exported with its KV
    cache, `kvcache.py`); written in a staging directory, then moved into place (`staged`). `external_data`
    (default: when the weights pass EXTERNAL_DATA_BYTES) writes the weights to `<file>.data` beside the file,
    tensor by tensor, instead of one protobuf that would hold a second copy of them (and cannot pass 2 GB).

    From opset 23 on, the exporter's own graph rewrites are left out and only constant folding runs: they fuse
    rotary embeddings into `RotaryEmbedding` nodes that onnxruntime 1.32 rejects at run time (cos/sin cache
    shape check), while the `Attention` nodes come from the exporter's op mapping and stay."""
    path = Path(path)
    module, args, names, outputs, shapes = _signature(model, example_inputs)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with staged(path) as tmp:
        try:
            with torch.no_grad(), _native_gqa():
                program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=names,
                                            output_names=outputs, dynamic_shapes=shapes, verbose=False,
                                            opset_version=opset, optimize=opset < 23)
            if opset >= 23:
                import onnxscript
                program.model = onnxscript.optimizer.optimize(program.model)
            program.save(str(tmp), external_data=external_data)
        except Exception as e:
            raise DotResizeError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    return path


@contextlib.contextmanager
def staged(path: Path):
    """Yield a path in a temporary sibling directory to write an ONNX file (and its `<name>.data`) to; on
    success both are moved into place, the data first, so `path` never names a half-written model; on failure
    nothing changes."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DotResizeError(f"cannot write {path}: directory {path.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        yield Path(tmp) / path.name
        data, target = Path(tmp) / f"{path.name}.data", path.with_name(f"{path.name}.data")
        if data.exists():
            data.replace(target)
        else:
            target.unlink(missing_ok=True)   # a stale one from an earlier export of another size
        (Path(tmp) / path.name).replace(path)


def size_mb(path: Path) -> float:
    """An ONNX file's size on disk with its external data."""
    data = path.with_name(f"{path.name}.data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**20


def _signature(model, example_inputs):
    """(module to export, its example args, input names, output names, dynamic shapes)."""
    ids = example_inputs[0]
    cache = None if ids.is_floating_point() else kvcache.layout(model, ids)
    if cache is not None:
        dtype = next(model.parameters()).dtype
        decoder = kvcache.wrap(model, cache)
        return decoder, decoder.example(dtype, ids), cache.input_names, cache.output_names, decoder.dynamic_shapes()
    auto = torch.export.Dim.AUTO
    dims = {0: auto, 1: auto} if not ids.is_floating_point() else {0: auto}
    mask = takes_mask(model, example_inputs)
    args, names, shapes = (ids,), ["input_ids" if not ids.is_floating_point() else "input"], (dims,)
    if mask:
        args, names, shapes = (ids, torch.ones_like(ids)), names + ["attention_mask"], (dims, dict(dims))
    return _Logits(model, mask), args, names, ["logits"], shapes


def session(path: str | Path, threads: int = 2):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise DotResizeError(f"onnxruntime cannot load {path}: {e}") from e


def _feed(sess, ids: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """The session's inputs for `ids` (token ids, or a float input such as images): plus an attention mask
    (all ones unless given) when the file takes one, and an empty past when it has a KV cache."""
    if kvcache.past_inputs(sess):
        return kvcache.feed(sess, ids, mask)
    first = sess.get_inputs()[0]
    feed = {first.name: ids.astype(np.float32 if first.type == "tensor(float)" else np.int64)}
    if _takes_mask_input(sess):
        feed["attention_mask"] = (np.ones_like(ids) if mask is None else mask).astype(np.int64)
    return feed


def _takes_mask_input(sess) -> bool:
    return "attention_mask" in {i.name for i in sess.get_inputs()}


def ort_forward(sess):
    """ids (, mask) → logits under onnxruntime."""
    def forward(ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        feed = _feed(sess, ids.numpy(), None if mask is None else mask.numpy())
        return torch.from_numpy(sess.run(["logits"], feed)[0])
    return forward


def parity(sess, model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """max |logits_ORT − logits_torch| over the given id batches (use two shapes: dynamic dims are checked);
    when the file takes an attention mask, also with the last positions of the first row padded out."""
    worst = 0.0
    fwd = ort_forward(sess)
    with torch.no_grad():
        for ids in batches:
            worst = max(worst, (fwd(ids) - model_outputs(model, (ids,))).abs().max().item())
            if _takes_mask_input(sess) and ids.shape[1] > 2:
                mask = torch.ones_like(ids)
                mask[0, -2:] = 0
                want = main_output(model(ids, attention_mask=mask))
                worst = max(worst, (fwd(ids, mask) - want).abs().max().item())
    return worst


def latency(sessions: list, batch: int, seq: int, vocab: int, repeats: int = 7) -> list[float]:
    """Median seconds per run of each session on the same random ids. Runs interleave, in alternating order
    (a, b, b, a, a, b, …), so that the machine's drift and the slot a run takes in a round hit every session
    alike: on this project's 2-core VM single runs of one file vary by ±5–10%."""
    ids = np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int64)
    feeds = [_feed(sess, ids) for sess in sessions]
    for sess, feed in zip(sessions, feeds):
        sess.run(["logits"], feed)  # warm-up
    times = [[] for _ in sessions]
    for r in range(repeats):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            t = time.perf_counter()
            sessions[i].run(["logits"], feeds[i])
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def forward_flops(model: torch.nn.Module, batch: int, seq: int, vocab: int) -> int:
    """FLOPs of one forward on (batch, seq) ids, by torch's FlopCounterMode (matmuls, and attention scores
    through the CPU SDPA kernel, which the counter does not know by itself)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model_outputs(model, (ids,))
    return counter.get_total_flops()


def dense_onnx(model: torch.nn.Module, example_inputs: tuple, opset: int = OPSET) -> Path:
    """The reference model's ONNX file, exported once per model content and opset and cached."""
    h = hashlib.sha256(f"{type(model).__qualname__} {torch.__version__} {takes_mask(model, example_inputs)} "
                       f"{opset} native-gqa kv-cache sdpa-cache".encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode() + str(tuple(t.shape)).encode() + t.detach().cpu().contiguous().numpy().tobytes())
    path = cache_dir() / "onnx" / f"dense-{h.hexdigest()[:20]}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        to_onnx(model, example_inputs, path, opset)
    return path


def validate(model: torch.nn.Module, onnx_path: Path, windows: torch.Tensor | None, example_inputs: tuple, *,
             dense_model: torch.nn.Module | None = None, vocab: int | None = None, corpus: str = "",
             latency_shapes=((1, 512), (8, 512)), threads: int = 2, ppl_torch: float | None = None,
             opset: int = OPSET) -> dict:
    """Parity, perplexity under ORT vs torch, and latency against the dense model exported at the same `opset`
    (cached). `ppl_torch`: the model's perplexity on `windows`, when the caller has measured it already."""
    from .evaluate import perplexity
    sess = session(onnx_path, threads)
    probe = [example_inputs[0]]
    if example_inputs[0].is_floating_point():  # a second batch size: the dynamic batch dim is exercised
        probe += [torch.cat([example_inputs[0], example_inputs[0][:1]])]
    if windows is not None:
        probe += [windows[:2, : windows.shape[1] // 2]]  # a second (batch, seq): dynamic dims are exercised
    result = {"path": str(onnx_path), "max_abs_diff": parity(sess, model, probe), "tolerance": PARITY_TOL}
    if kvcache.past_inputs(sess):
        from .generate import check_generation
        prompt = (windows if windows is not None else example_inputs[0])[:2, :16]
        result["generation"] = check_generation(sess, model, prompt)
    if windows is not None:
        ppl_t = ppl_torch or perplexity(model, windows, corpus=corpus, progress=False)["ppl"]
        ppl_o = perplexity(ort_forward(sess), windows, corpus=corpus, progress=False)["ppl"]
        result.update(ppl_torch=ppl_t, ppl_ort=ppl_o, ppl_rel_diff=abs(ppl_o - ppl_t) / ppl_t)
    if dense_model is not None and vocab:
        dense_path = dense_onnx(dense_model, example_inputs, opset)
        dense = session(dense_path, threads)
        result["dense_size_mb"] = size_mb(dense_path)
        lat = {f"{b}x{s}": latency([sess, dense], b, s, vocab) for b, s in latency_shapes}
        result["latency_s"] = {k: {"compressed": c, "dense": d} for k, (c, d) in lat.items()}
        b, s = latency_shapes[-1]
        result["latency_ratio"] = lat[f"{b}x{s}"][0] / lat[f"{b}x{s}"][1]
        result["latency_threads"] = threads
        # what a perfect speed-up would give: the work that is left (an LM head and attention do not shrink)
        result["flops_ratio"] = forward_flops(model, 1, s, vocab) / forward_flops(dense_model, 1, s, vocab)
    return result


def latency_bound(result: dict, param_ratio: float) -> dict:
    """Whether the measured latency ratio follows the non-embedding parameter ratio (≤ ratio + LATENCY_SLACK).

    Not a failure when it does not (latency belongs to the machine), but the report says so, and the warning
    gives the FLOPs ratio: work that no parameter pays for (an LM head tied to the embedding, attention scores)
    keeps the forward's cost well above the parameter ratio when the cut is large.
    """
    bound = param_ratio + LATENCY_SLACK
    verdict = {"param_ratio": param_ratio, "latency_bound": bound,
               "latency_within_bound": result["latency_ratio"] <= bound}
    if not verdict["latency_within_bound"]:
        log.warning("ONNX latency ratio %.3f is above the non-embedding parameter ratio %.3f + %.2f; the "
                    "forward keeps %.3f of the dense FLOPs", result["latency_ratio"], param_ratio, LATENCY_SLACK,
                    result["flops_ratio"])
    return verdict


def check(result: dict) -> None:
    """Raise with the margin when a validation misses its tolerance."""
    if result["max_abs_diff"] > PARITY_TOL:
        raise DotResizeError(f"onnxruntime logits differ from torch by {result['max_abs_diff']:.3g} "
                             f"(tolerance {PARITY_TOL}): the ONNX file is not faithful; report it with --debug")
    gen = result.get("generation")
    if gen and not (gen["same_tokens"] and gen["cached_step_max_abs_diff"] <= PARITY_TOL):
        raise DotResizeError(f"greedy decoding through the ONNX file's KV cache differs from torch (same tokens: "
                             f"{gen['same_tokens']}, cached step max |d logits| {gen['cached_step_max_abs_diff']:.3g}"
                             f", tolerance {PARITY_TOL}): the cache is not faithful; report it with --debug")
    if result.get("ppl_rel_diff", 0) > PPL_REL_TOL:
        raise DotResizeError(f"perplexity under onnxruntime {result['ppl_ort']:.3f} vs torch {result['ppl_torch']:.3f} "
                             f"({100 * result['ppl_rel_diff']:.2f}% > {100 * PPL_REL_TOL}%)")
