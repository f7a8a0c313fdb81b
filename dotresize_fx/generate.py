"""Greedy decoding of a saved model under torch and under onnxruntime, checked against each other.

Both sides decode through their KV cache: torch with the model's own cache (and a check that the cached step's
logits equal the full-sequence logits), onnxruntime with the file's `past_key_values.*` inputs (`kvcache.py`).
A file without them (a model that does not generate with a cache) reruns the whole prefix every step; the record
says which (`ort.kv_cache`).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from . import kvcache
from .errors import DotResizeError
from .export import _feed, session
from .load import load
from .outputs import main_output


def generate(out: str | Path, prompt_ids: list[int], max_new_tokens: int, *, onnx_file: str = "model.onnx",
             threads: int = 2, batch: int = 1) -> dict:
    """Greedy tokens under torch and under onnxruntime for one prompt (repeated `batch` times), with prefill and
    decode tokens/s."""
    if not prompt_ids:
        raise DotResizeError("the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3")
    if max_new_tokens < 1:
        raise DotResizeError(f"--max-new-tokens {max_new_tokens}: ask for at least one token")
    if batch < 1:
        raise DotResizeError(f"--batch {batch}: give at least 1")
    model, tokenizer, _ = load(out)
    path = Path(out) / onnx_file
    if not path.is_file():
        raise DotResizeError(f"{path} does not exist: compress with --onnx (or a quantize pass) first, or name "
                             "the file with --onnx-file")
    ids = torch.tensor([prompt_ids] * batch)
    torch_tokens, torch_t, cache_diff = _greedy_torch(model, ids, max_new_tokens)
    sess = session(path, threads)
    ort_tokens, *ort_t = ort_greedy(sess, ids.numpy(), max_new_tokens)
    torch_tokens, ort_tokens = torch_tokens[0].tolist(), ort_tokens[0].tolist()
    result = {"onnx": str(path), "prompt_ids": prompt_ids, "batch": batch, "torch_tokens": torch_tokens,
              "ort_tokens": ort_tokens, "same_tokens": torch_tokens == ort_tokens, "cache_max_abs_diff": cache_diff,
              "torch": speeds(batch * len(prompt_ids), batch, max_new_tokens, *torch_t),
              "ort": {**speeds(batch * len(prompt_ids), batch, max_new_tokens, *ort_t),
                      "kv_cache": bool(kvcache.past_inputs(sess))}}
    if tokenizer is not None:
        result["torch_text"] = tokenizer.decode(torch_tokens)
        result["ort_text"] = tokenizer.decode(ort_tokens)
    return result


def prompt_ids(model: str | Path, prompt: str | None, ids: str | None) -> list[int]:
    """The prompt's token ids: `ids` as "1,2,3", or `prompt` through the model's tokenizer (one of the two)."""
    if (prompt is None) == (ids is None):
        raise DotResizeError("give the prompt as --prompt TEXT or --prompt-ids 1,2,3 (one of them)")
    if ids is not None:
        try:
            return [int(t) for t in ids.split(",") if t.strip()]
        except ValueError:
            raise DotResizeError(f"--prompt-ids {ids!r}: give token ids separated by commas") from None
    tokenizer = load(model).tokenizer
    if tokenizer is None:
        raise DotResizeError("this model has no tokenizer: give --prompt-ids 1,2,3")
    return tokenizer(prompt)["input_ids"]


def speeds(prompt_tokens: int, batch: int, new: int, prefill_s: float, decode_s: float) -> dict:
    """Tokens/s of the prefill (all prompt tokens of the batch) and of the decode (batch × the n − 1 steps
    after the prefill's first token)."""
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tokens_per_s": prompt_tokens / max(prefill_s, 1e-9),
            "decode_tokens_per_s": batch * max(new - 1, 0) / max(decode_s, 1e-9)}


def ort_greedy(sess, ids: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
    """Greedy tokens (batch, n), prefill seconds and decode seconds under onnxruntime."""
    if kvcache.past_inputs(sess):
        return kvcache.greedy(sess, ids, n)
    seq, tokens = ids, []
    t0 = time.perf_counter()
    t_prefill = 0.0
    for step in range(n):
        nxt = sess.run(["logits"], _feed(sess, seq))[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        if step == 0:
            t_prefill = time.perf_counter() - t0
        tokens.append(nxt)
        seq = np.concatenate([seq, nxt], axis=1)
    return np.concatenate(tokens, axis=1), t_prefill, time.perf_counter() - t0 - t_prefill


def decode_speed(sessions: dict, prompt_len: int, new: int, vocab: int, batches=(1, 8), repeats: int = 5) -> dict:
    """Median prefill and decode tokens/s of each named session on the same random prompt, runs interleaved in
    alternating order (as `export.latency`), with each session's spread (max/min − 1 of its decode speeds): a
    speed-up beyond that spread is beyond this machine's run-to-run noise."""
    result = {}
    for batch in batches:
        ids = np.random.default_rng(0).integers(0, vocab, (batch, prompt_len), dtype=np.int64)
        runs = {name: [] for name in sessions}
        for name, sess in sessions.items():
            ort_greedy(sess, ids, 2)   # warm-up
        for r in range(repeats):
            for name in (list(sessions) if r % 2 == 0 else reversed(list(sessions))):
                _, pre, dec = ort_greedy(sessions[name], ids, new)
                runs[name].append(speeds(batch * prompt_len, batch, new, pre, dec))
        result[f"batch{batch}"] = {name: _median_speed(rs) for name, rs in runs.items()}
    return result


def _median_speed(runs: list[dict]) -> dict:
    decode = [r["decode_tokens_per_s"] for r in runs]
    return {"prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in runs),
            "decode_tokens_per_s": statistics.median(decode), "decode_spread": max(decode) / min(decode) - 1}


def check_generation(sess, model: torch.nn.Module, ids: torch.Tensor, n: int = 8) -> dict:
    """Greedy tokens through the file's cache against torch recomputing the whole sequence each step, and the
    largest |logits| difference of a cached step (after a prefill of all but the last prompt token) from
    torch's full-sequence logits."""
    tokens, _, _ = kvcache.greedy(sess, ids.numpy(), n)
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, main_output(model(seq))[:, -1].argmax(-1, keepdim=True)], dim=1)
        full = main_output(model(ids))[:, -1].numpy()
    prefill = sess.run(None, kvcache.feed(sess, ids[:, :-1].numpy()))
    step = sess.run(["logits"], kvcache.feed(sess, ids[:, -1:].numpy(), past=prefill[1:]))[0][:, -1]
    return {"tokens": n, "batch": ids.shape[0], "same_tokens": bool((tokens == seq[:, ids.shape[1]:].numpy()).all()),
            "cached_step_max_abs_diff": float(np.abs(step - full).max())}


def _greedy_torch(model, ids: torch.Tensor, n: int):
    """Tokens (batch, n), (prefill s, decode s), and max |logits of a cached step − full-sequence logits|
    (None: the model has no cache)."""
    step, cached = _torch_step(model, ids)
    tokens, diff = [], None
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits, state = step(ids, None)
        t_prefill = time.perf_counter() - t0
        seq = ids
        for i in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            seq = torch.cat([seq, nxt], dim=1)
            if i == n - 1:
                break
            logits, state = step(nxt, state) if cached else step(seq, None)
            if cached and i == 0:   # the cached step must give the logits the whole sequence gives
                diff = (logits[:, -1] - main_output(model(seq))[:, -1]).abs().max().item()
        t_decode = time.perf_counter() - t0 - t_prefill
    return torch.cat(tokens, dim=1), (t_prefill, t_decode), diff


def _torch_step(model, ids: torch.Tensor):
    """(step, cached): step(new ids, cache or None) → (logits, cache) through the model's own cache (Hugging
    Face), the SDPA cache the export uses, or none (cached False: step is given the whole sequence)."""
    if kvcache.generates(model):
        def hf(x, cache):
            out = model(x, use_cache=True, **({kvcache.cache_kwarg(model): cache} if cache is not None else {}))
            return out.logits, kvcache.returned_cache(out)
        return hf, True
    cache = kvcache.layout(model, ids)
    if cache is None:
        return (lambda x, _: (main_output(model(x)), None)), False
    decoder, empty = kvcache.wrap(model, cache), cache.empty(ids.shape[0], next(model.parameters()).dtype)

    def sdpa(x, past):
        out = decoder(x, *(empty if past is None else past))
        return out[0], out[1:]
    return sdpa, True
