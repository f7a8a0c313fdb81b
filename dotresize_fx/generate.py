"""Greedy decoding of a saved model under torch and under onnxruntime, checked against each other.

Torch decodes with the model's own KV cache where it has one (Hugging Face decoders) and checks that the cached
step's logits equal the full-sequence logits. The ONNX file computes logits for a whole sequence (no KV-cache
inputs yet), so under onnxruntime every step runs the whole prefix again: the tokens are comparable, the decode
speed is not what a cached runtime would reach.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .errors import DotResizeError
from .export import _feed, session
from .load import load
from .outputs import main_output


def generate(out: str | Path, prompt_ids: list[int], max_new_tokens: int, *, onnx_file: str = "model.onnx",
             threads: int = 2) -> dict:
    """Greedy tokens under torch and under onnxruntime for one prompt, with prefill and decode tokens/s."""
    if not prompt_ids:
        raise DotResizeError("the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3")
    if max_new_tokens < 1:
        raise DotResizeError(f"--max-new-tokens {max_new_tokens}: ask for at least one token")
    model, tokenizer, _ = load(out)
    path = Path(out) / onnx_file
    if not path.is_file():
        raise DotResizeError(f"{path} does not exist: compress with --onnx (or a quantize pass) first, or name "
                             "the file with --onnx-file")
    ids = torch.tensor([prompt_ids])
    torch_tokens, torch_t, cache_diff = _greedy_torch(model, ids, max_new_tokens)
    ort_tokens, ort_t = _greedy_ort(session(path, threads), ids, max_new_tokens)
    result = {"onnx": str(path), "prompt_ids": prompt_ids, "torch_tokens": torch_tokens, "ort_tokens": ort_tokens,
              "same_tokens": torch_tokens == ort_tokens, "cache_max_abs_diff": cache_diff,
              "torch": _speeds(len(prompt_ids), max_new_tokens, *torch_t),
              "ort": {**_speeds(len(prompt_ids), max_new_tokens, *ort_t), "kv_cache": False}}
    if tokenizer is not None:
        result["torch_text"] = tokenizer.decode(torch_tokens)
        result["ort_text"] = tokenizer.decode(ort_tokens)
    return result


def _speeds(prompt: int, new: int, prefill_s: float, decode_s: float) -> dict:
    return {"prefill_s": prefill_s, "decode_s": decode_s, "prefill_tokens_per_s": prompt / max(prefill_s, 1e-9),
            "decode_tokens_per_s": max(new - 1, 0) / max(decode_s, 1e-9)}


def _greedy_torch(model, ids: torch.Tensor, n: int):
    """Tokens, (prefill s, decode s), and max |logits of a cached step − full-sequence logits| (None: no cache)."""
    config = getattr(model, "config", None)
    cached = config is not None and hasattr(config, "use_cache")
    tokens, past, diff = [], None, None
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True) if cached else model(ids)
        t_prefill = time.perf_counter() - t0
        seq = ids
        for step in range(n):
            logits = main_output(out)[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            seq = torch.cat([seq, nxt], dim=1)
            if step == n - 1:
                break
            if cached:
                past = out.past_key_values
                out = model(nxt, past_key_values=past, use_cache=True)
                if step == 0:   # the cached step must give the logits the whole sequence gives
                    full = main_output(model(seq))[:, -1]
                    diff = (main_output(out)[:, -1] - full).abs().max().item()
            else:
                out = model(seq)
        t_decode = time.perf_counter() - t0 - t_prefill
    return tokens, (t_prefill, t_decode), diff


def _greedy_ort(sess, ids: torch.Tensor, n: int):
    seq = ids.numpy()
    tokens = []
    t0 = time.perf_counter()
    t_prefill = None
    for _ in range(n):
        logits = sess.run(["logits"], _feed(sess, seq))[0][:, -1]
        if t_prefill is None:
            t_prefill = time.perf_counter() - t0
        nxt = logits.argmax(-1)[:, None].astype(np.int64)
        tokens.append(int(nxt[0, 0]))
        seq = np.concatenate([seq, nxt], axis=1)
    return tokens, (t_prefill, time.perf_counter() - t0 - t_prefill)
