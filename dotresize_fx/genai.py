"""An onnxruntime-genai package of a compressed decoder, built by onnxruntime-genai's own model builder and checked
against torch.

A compress output that is a stock Hugging Face checkpoint (uniform widths: Llama, Mistral, Qwen, Gemma, Phi, …)
is what the builder reads; it writes `model.onnx` with a KV cache, `genai_config.json` and the tokenizer, in
fp32 or with int4 weights (its own round to nearest), and onnxruntime-genai's `Generator` runs it. Greedy tokens of
the package are compared with torch's on the same prompt: an fp32 package must reproduce them.
Needs `pip install onnxruntime-genai` (the `genai` extra).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .cache import atomic_dir
from .errors import DotResizeError
from .generate import _greedy_torch, speeds
from .load import load
from .save import PLAN_FILE

PRECISIONS = ("fp32", "int4")


def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise DotResizeError("onnxruntime-genai is not installed: pip install 'dotresize_fx[genai]' "
                             "(or pip install onnxruntime-genai)") from None
    return og


def build(out: str | Path, dest: str | Path, precision: str = "fp32", overwrite: bool = False) -> Path:
    """Run onnxruntime-genai's builder on the checkpoint in `out` and write the package to `dest` (atomically)."""
    _genai()
    if precision not in PRECISIONS:
        raise DotResizeError(f"genai precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    plan = Path(out) / PLAN_FILE
    stock = (Path(out) / "config.json").is_file() and (not plan.is_file() or json.loads(plan.read_text())["stock"])
    if not stock:
        raise DotResizeError(f"{out} is not a stock Hugging Face checkpoint (its widths are not uniform, or it is "
                             "not a Hugging Face model): onnxruntime-genai's builder reads only those; use "
                             "`compress --onnx` and `dotresize-fx generate` instead")
    if Path(dest).exists() and not overwrite:
        raise DotResizeError(f"{dest} exists: pass --overwrite or choose another --dest")
    with atomic_dir(Path(dest), overwrite=overwrite) as tmp, tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(out), "-o", str(tmp),
               "-p", precision, "-e", "cpu", "-c", cache]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not (tmp / "genai_config.json").is_file():
            tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-5:])
            raise DotResizeError(f"onnxruntime-genai's builder could not convert {out} ({precision}):\n{tail}")
    return Path(dest)


def genai_greedy(package: str | Path, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens of the package's Generator after the prompt, and the prefill and decode seconds."""
    og = _genai()
    model = og.Model(str(package))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    t = time.perf_counter()
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    gen.generate_next_token()
    prefill = time.perf_counter() - t
    while not gen.is_done():
        gen.generate_next_token()
    decode = time.perf_counter() - t - prefill
    return [int(x) for x in gen.get_sequence(0)][len(prompt_ids):], prefill, decode


def check(out: str | Path, package: str | Path, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """The package's greedy tokens against torch's on the compressed model in `out`."""
    model, tokenizer, _ = load(out)
    torch_tokens, torch_t, _ = _greedy_torch(model, torch.tensor([prompt_ids]), max_new_tokens)
    torch_tokens = torch_tokens[0].tolist()
    tokens, *genai_t = genai_greedy(package, prompt_ids, max_new_tokens)
    agree = next((i for i, (a, b) in enumerate(zip(tokens, torch_tokens)) if a != b), len(torch_tokens))
    result = {"package": str(package), "prompt_ids": prompt_ids, "torch_tokens": torch_tokens,
              "genai_tokens": tokens, "same_tokens": tokens == torch_tokens, "same_prefix": agree,
              "torch": speeds(len(prompt_ids), 1, max_new_tokens, *torch_t),
              "genai": speeds(len(prompt_ids), 1, max_new_tokens, *genai_t)}
    if tokenizer is not None:
        result["torch_text"], result["genai_text"] = tokenizer.decode(torch_tokens), tokenizer.decode(tokens)
    return result
