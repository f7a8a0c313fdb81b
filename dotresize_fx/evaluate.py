"""Perplexity under the evaluation protocol of DESIGN §7, and the parameter counts reports carry."""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from .outputs import model_outputs


def perplexity(model: torch.nn.Module | Callable, windows: torch.Tensor, *, corpus: str, batch_size: int = 4,
               progress: bool = True) -> dict:
    """exp(mean next-token NLL) over every text token of `windows` (each row: BOS + seq_len-1 tokens).

    `model` is an nn.Module or any callable mapping an id batch to logits (e.g. an onnxruntime session wrapper).
    The result carries the protocol next to the number so it is never read without it.
    """
    nll, count = 0.0, 0
    forward = model if not isinstance(model, torch.nn.Module) else (lambda ids: model_outputs(model, (ids,)))
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch",
                          disable=not progress, leave=False):
            ids = windows[start:start + batch_size]
            logits = torch.as_tensor(forward(ids)).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += ids[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "seq_len": int(windows.shape[1]),
            "windows": int(windows.shape[0]), "corpus": corpus, "bos": True}


def parameter_counts(model: torch.nn.Module) -> dict:
    """Total parameters (shared tensors once) and non-embedding = total minus the input embedding matrix.

    An LM head that is, or became, untied from the embedding counts as non-embedding (DESIGN §7).
    """
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    weight = getattr(_input_embedding(model), "weight", None)   # a vision model's "input embeddings" are a patch
    embed = weight.numel() if isinstance(weight, torch.Tensor) else 0  # conv module, counted as non-embedding
    return {"total": total, "non_embedding": total - embed}


def _input_embedding(model: torch.nn.Module):
    if hasattr(model, "get_input_embeddings"):
        try:
            return model.get_input_embeddings()
        except NotImplementedError:
            pass
    return next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
