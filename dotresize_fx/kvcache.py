"""The KV-cache interface of an exported decoder, and greedy decoding through it under onnxruntime.

A decoder that generates is exported with the inputs `input_ids`, `attention_mask` (past + new positions; a
Hugging Face forward's own argument, so only there), `position_ids` (when its forward takes them) and
`past_key_values.{i}.key` / `.value` (batch, kv heads, past length, head dim), and the outputs `logits` and
`present.{i}.key` / `.value` (past + new length), every length dynamic. One file serves a whole sequence (an
empty past) and each cached decoding step, as optimum's merged decoders do; the head counts and head dims are
read from the model's own cache, so resized (or per-layer) heads show in the cache shapes.

Two kinds of decoder have one:
- a Hugging Face model whose `can_generate()` is true: its own cache class is fed the past (`Decoder`);
- any module (a nanoGPT, or the captured program of one) whose attention is causal
  `scaled_dot_product_attention` without a mask: each call's keys and values are prefixed with the past, its
  causal mask offset by the past length, and `arange(seq)` (its positions) shifted by the past length, by a
  `TorchFunctionMode` around the forward (`SdpaDecoder`) — no model code is patched. A cached step is checked
  against the full sequence before this is used; attention written as explicit matmuls has no cache.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import DotResizeError
from .outputs import model_outputs

log = logging.getLogger(__name__)

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class CacheLayout:
    shapes: tuple[tuple[tuple[int, int], tuple[int, int]], ...]  # per layer: (heads, dim) of keys and of values
    positions: bool                                               # the forward takes position_ids
    hf: bool = True                                               # a Hugging Face cache (else SDPA calls)

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(len(self.shapes)) for kv in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids"] + ["attention_mask"] * self.hf + ["position_ids"] * self.positions + self.past_names

    def empty(self, batch: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """An empty past (length 0) for every key and value."""
        return [torch.zeros(batch, h, 0, d, dtype=dtype) for pair in self.shapes for h, d in pair]

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [n.replace("past_key_values", "present") for n in self.past_names]


def layout(model: torch.nn.Module, ids: torch.Tensor) -> CacheLayout | None:
    """The model's cache layout on token ids like `ids`, or None for a model that does not generate with one."""
    if generates(model):
        return _hf_layout(model, model.config.vocab_size)
    return _sdpa_layout(model, ids)


def wrap(model: torch.nn.Module, cache: CacheLayout) -> torch.nn.Module:
    """The module to export: flat cache tensors in and out."""
    return (Decoder if cache.hf else SdpaDecoder)(model, cache)


def _hf_layout(model: torch.nn.Module, vocab: int) -> CacheLayout | None:
    ids = torch.arange(2).reshape(1, 2) % vocab
    with torch.no_grad():
        layers = getattr(returned_cache(model(ids, use_cache=True)), "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    shapes = tuple(((l.keys.shape[1], l.keys.shape[3]), (l.values.shape[1], l.values.shape[3])) for l in layers)
    return CacheLayout(shapes, "position_ids" in inspect.signature(model.forward).parameters)


def generates(model: torch.nn.Module) -> bool:
    """A Hugging Face model that generates (and so takes and returns a cache)."""
    can = getattr(model, "can_generate", None)
    return bool(callable(can) and can())


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's name for the cache: `cache` from transformers 5.2x on, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The cache a Hugging Face forward returned (under either name), or None."""
    return out.get("cache") or out.get("past_key_values") if hasattr(out, "get") else None


class _Flat(torch.nn.Module):
    """Example inputs and dynamic shapes of a decoder with flat cache tensors (`CacheLayout`'s names)."""
    def __init__(self, model: torch.nn.Module, cache: CacheLayout):
        super().__init__()
        self.model, self.cache = model, cache

    def example(self, dtype: torch.dtype, ids: torch.Tensor, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
        """Inputs with lengths above 1 (torch.export specialises sizes 0 and 1); token ids taken from `ids`."""
        args = [_tokens(ids, batch, seq)]
        if self.cache.hf:
            args.append(torch.ones(batch, past + seq, dtype=torch.long))
        if self.cache.positions:
            args.append(torch.arange(past, past + seq).expand(batch, -1))
        for (hk, dk), (hv, dv) in self.cache.shapes:
            args += [torch.randn(batch, hk, past, dk).to(dtype), torch.randn(batch, hv, past, dv).to(dtype)]
        return tuple(args)

    def dynamic_shapes(self) -> tuple:
        auto = torch.export.Dim.AUTO
        tokens = {0: auto, 1: auto}
        past = tuple({0: auto, 2: auto} for _ in self.cache.past_names)
        if not self.cache.hf:
            return tokens, past
        return (tokens, dict(tokens), (dict(tokens),) * self.cache.positions + past)


class Decoder(_Flat):
    """Flat cache tensors in and out around a Hugging Face decoder (the export's fixed names and order).

    The cache is rebuilt as plain full-length layers even for sliding-window models: the model's masks still
    apply the window, and every present tensor has the past + new length, so a runtime can feed it back as is."""
    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache
        positions, past = (rest[0], rest[1:]) if self.cache.positions else (None, rest)
        kw = {"position_ids": positions} if self.cache.positions else {}
        kw[cache_kwarg(self.model)] = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kw)
        return (out.logits, *(t for layer in returned_cache(out).layers for t in (layer.keys, layer.values)))


class SdpaDecoder(_Flat):
    """Flat cache tensors in and out around a module whose attention is causal SDPA (`_Cached`)."""
    def forward(self, input_ids, *past):
        mode = _Cached(list(zip(past[0::2], past[1::2])), input_ids.shape[1])
        with mode:
            logits = model_outputs(self.model, (input_ids,))
        if len(mode.present) != len(past):
            raise DotResizeError(f"the forward called scaled_dot_product_attention {len(mode.present) // 2} times "
                                 f"where the probe saw {len(past) // 2}: its attention depends on the input")
        return (logits, *mode.present)


_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_ARANGE = (torch.arange, torch.ops.aten.arange.default, torch.ops.aten.arange.start)


def _bind(names: tuple, args: tuple, kwargs: dict | None) -> dict:
    return {**dict(zip(names, args)), **(kwargs or {})}


class _Record(TorchFunctionMode):
    """Each SDPA call's (key heads, dim), (value heads, dim), and whether it is causal without a mask."""
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SDPA:
            a = _bind(_SDPA_ARGS, args, kwargs)
            k, v = a["key"], a["value"]
            causal = bool(a.get("is_causal")) and a.get("attn_mask") is None
            self.calls.append((((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3])), causal))
        return func(*args, **(kwargs or {}))


class _Cached(TorchFunctionMode):
    """Keys and values of the i-th SDPA call prefixed with past[i] (the call's present), its causal mask
    offset by the past length P (query t sees keys ≤ P + t), and `arange(seq)` → `arange(P, P + seq)`."""
    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], seq):
        super().__init__()
        self.past, self.seq, self.present = past, seq, []
        self.start = past[0][0].shape[2]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SDPA:
            return self._attention(func, _bind(_SDPA_ARGS, args, kwargs))
        if func in _ARANGE:
            r = _bind(("start", "end", "step"), (0, *args) if len(args) == 1 else args, kwargs)
            if _is(r.pop("start", 0), 0) and _is(r.pop("step", 1), 1) and _is(r["end"], self.seq):
                return torch.arange(self.start, self.start + r.pop("end"), **r)
        return func(*args, **(kwargs or {}))

    def _attention(self, func, a: dict):
        i = len(self.present) // 2
        if i >= len(self.past):
            raise DotResizeError("the forward called scaled_dot_product_attention more often than the probe saw")
        key, value = (torch.cat([p, a[n]], dim=-2) for p, n in zip(self.past[i], ("key", "value")))
        self.present += [key, value]
        q_len, device = a["query"].shape[-2], a["query"].device
        mask = torch.arange(self.start + q_len, device=device)[None, :] <= \
            torch.arange(self.start, self.start + q_len, device=device)[:, None]
        rest = {n: a[n] for n in ("dropout_p", "scale", "enable_gqa") if n in a}
        return func(a["query"], key, value, attn_mask=mask, **rest)


def _is(x, want) -> bool:
    """x is `want` without adding a guard on a symbolic size: the same symbol, or the same plain int."""
    if isinstance(x, torch.SymInt) or isinstance(want, torch.SymInt):
        return isinstance(x, torch.SymInt) and isinstance(want, torch.SymInt) and x.node.expr == want.node.expr
    return isinstance(x, int) and isinstance(want, int) and x == want


def _tokens(ids: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """(batch, seq) token ids taken cyclically from `ids` (so valid for the model's vocabulary)."""
    flat = ids.flatten()
    return flat.repeat(batch * seq // flat.numel() + 1)[: batch * seq].reshape(batch, seq)


def _sdpa_layout(model: torch.nn.Module, ids: torch.Tensor) -> CacheLayout | None:
    """The layout of a module whose every attention is causal SDPA without a mask, when a cached step over the
    second half of `ids` (its own example ids, a shape the model takes) after the first half gives the full
    sequence's logits; else None (a warning says why when the attention was causal SDPA: its positions are not
    `arange` over the sequence, say)."""
    full, prefill = ids, ids.shape[1] // 2
    if prefill < 1:
        return None
    with torch.no_grad(), _Record() as rec:
        want = model_outputs(model, (full,))
    if not rec.calls or not all(causal for _, causal in rec.calls):
        return None
    cache = CacheLayout(tuple(shapes for shapes, _ in rec.calls), positions=False, hf=False)
    decoder, dtype = SdpaDecoder(model, cache), want.dtype
    with torch.no_grad():
        first = decoder(full[:, :prefill], *cache.empty(full.shape[0], dtype))
        got = decoder(full[:, prefill:], *first[1:])[0]
    diff = (got - want[:, prefill:]).abs().max().item()
    tol = max(1e-4, 16 * torch.finfo(dtype).eps) * max(1.0, want.abs().max().item())
    if diff > tol:
        log.warning("no KV cache for this model (its ONNX file takes the whole sequence): a cached step through "
                    "its causal attention differs from the full sequence by %.3g (are its positions not "
                    "torch.arange over the sequence?)", diff)
        return None
    return cache


def past_inputs(sess) -> list:
    return [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]


def feed(sess, ids: np.ndarray, mask: np.ndarray | None = None, past: list[np.ndarray] | None = None) -> dict:
    """A cached session's inputs for new tokens `ids` after `past` (None: an empty past; the mask covers past
    and new positions, all ones unless given)."""
    pasts = past_inputs(sess)
    if past is None:
        past = [np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), _NP.get(i.type, np.float32)) for i in pasts]
    start = past[0].shape[2] if past else 0
    total = start + ids.shape[1]
    names = {i.name for i in sess.get_inputs()}
    out = {"input_ids": ids.astype(np.int64)}
    if "attention_mask" in names:
        out["attention_mask"] = (np.ones((ids.shape[0], total)) if mask is None else mask).astype(np.int64)
    if "position_ids" in names:
        out["position_ids"] = np.broadcast_to(np.arange(start, total), ids.shape).astype(np.int64)
    out.update({i.name: p for i, p in zip(pasts, past)})
    return out


def greedy(sess, ids: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
    """Greedy tokens (batch, n) through the cache, with the prefill's seconds and the other n − 1 steps'."""
    names = [o.name for o in sess.get_outputs()]
    tokens, mask, past = [], np.ones(ids.shape, np.int64), None
    t0 = time.perf_counter()
    cur, t_prefill = ids, 0.0
    for step in range(n):
        out = sess.run(names, feed(sess, cur, mask, past))
        cur = out[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(cur)
        if step == 0:
            t_prefill = time.perf_counter() - t0
        past, mask = out[1:], np.concatenate([mask, np.ones_like(cur)], axis=1)
    return np.concatenate(tokens, axis=1), t_prefill, time.perf_counter() - t0 - t_prefill

