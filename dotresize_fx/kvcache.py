"""The KV-cache interface of an exported decoder, and greedy decoding through it under onnxruntime.

A decoder that generates (a Hugging Face model whose `can_generate()` is true and whose forward returns a cache)
is exported with the inputs `input_ids`, `attention_mask` (past + new positions), `position_ids` (when its
forward takes them) and `past_key_values.{i}.key` / `.value` (batch, kv heads, past length, head dim), and the
outputs `logits` and `present.{i}.key` / `.value` (past + new length), every length dynamic. One file serves a
whole sequence (an empty past) and each cached decoding step, as optimum's merged decoders do; the head counts
and head dims are read from the model's own cache, so resized (or per-layer) heads show in the cache shapes.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import numpy as np
import torch

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class CacheLayout:
    shapes: tuple[tuple[tuple[int, int], tuple[int, int]], ...]  # per layer: (heads, dim) of keys and of values
    positions: bool                                               # the forward takes position_ids

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(len(self.shapes)) for kv in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + ["position_ids"] * self.positions + self.past_names

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [n.replace("past_key_values", "present") for n in self.past_names]


def layout(model: torch.nn.Module, vocab: int) -> CacheLayout | None:
    """The model's cache layout, or None for a model that does not generate with a cache."""
    if not generates(model):
        return None
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


class Decoder(torch.nn.Module):
    """Flat cache tensors in and out around a Hugging Face decoder (the export's fixed names and order).

    The cache is rebuilt as plain full-length layers even for sliding-window models: the model's masks still
    apply the window, and every present tensor has the past + new length, so a runtime can feed it back as is."""
    def __init__(self, model: torch.nn.Module, cache: CacheLayout):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache
        positions, past = (rest[0], rest[1:]) if self.cache.positions else (None, rest)
        kw = {"position_ids": positions} if self.cache.positions else {}
        kw[cache_kwarg(self.model)] = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kw)
        return (out.logits, *(t for layer in returned_cache(out).layers for t in (layer.keys, layer.values)))

    def example(self, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
        """Inputs with lengths above 1 (torch.export specialises sizes 0 and 1)."""
        ids = torch.arange(batch * seq).reshape(batch, seq) % self.model.config.vocab_size
        args = [ids, torch.ones(batch, past + seq, dtype=torch.long)]
        if self.cache.positions:
            args.append(torch.arange(past, past + seq).expand(batch, -1))
        for (hk, dk), (hv, dv) in self.cache.shapes:
            args += [torch.randn(batch, hk, past, dk).to(dtype), torch.randn(batch, hv, past, dv).to(dtype)]
        return tuple(args)

    def dynamic_shapes(self) -> tuple:
        auto = torch.export.Dim.AUTO
        tokens = {0: auto, 1: auto}
        past = tuple({0: auto, 2: auto} for _ in self.cache.past_names)
        return (tokens, dict(tokens), (dict(tokens),) * self.cache.positions + past)


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
    out = {"input_ids": ids.astype(np.int64),
           "attention_mask": (np.ones((ids.shape[0], total)) if mask is None else mask).astype(np.int64)}
    if "position_ids" in {i.name for i in sess.get_inputs()}:
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

