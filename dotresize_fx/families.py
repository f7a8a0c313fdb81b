"""What the graph cannot tell about a model family: attribute and config names, kept in small maps.

The analysis finds widths from the graph alone; the rewrite then has to keep Python-side state in step with the
new parameters (a head count an attention module reads in `forward`, a config key `save_pretrained` writes,
an attribute that restates a weight's shape). Each such name lives here and nowhere else.
"""
from __future__ import annotations

import math

import torch

# module attributes that hold a heads group's q / kv head counts (HF Llama family, GPT-2, nanoGPT, Phi-3, …)
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
KV_GROUP_ATTR = "num_key_value_groups"          # q heads per kv head
FUSED_SPLIT_ATTR = "split_size"                 # GPT-2 splits its fused qkv by q's width
COUNT_ATTRS = HEAD_COUNT_ATTRS + KV_COUNT_ATTRS + (KV_GROUP_ATTR, FUSED_SPLIT_ATTR)
# head counts that modules read from their own config copy (Phi-3 reads config.num_key_value_heads in forward)
MODULE_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads")

# HF config keys per group kind: written when every group of the kind has one width
CONFIG_WIDTH_KEYS = {"residual": ("hidden_size",), "mlp": ("intermediate_size", "ffn_dim", "n_inner")}
HEADS_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim")

# the positional argument of a decoder block that carries the hidden states when it is passed by keyword
HIDDEN_STATES_ARG = "hidden_states"

# Gemma-style embeddings multiply by sqrt(hidden_size), which a stock config recomputes from the new width
EMBED_SCALE_BUFFER, EMBED_SCALE_FLOAT = "embed_scale", "scalar_embed_scale"


def _linear(mod, w):
    mod.out_features, mod.in_features = w.shape


def _transposed_linear(mod, w):   # HF GPT-2 Conv1D: weight (in, out); forward reads self.nf
    mod.nx, mod.nf = w.shape


def _embedding(mod, w):
    mod.num_embeddings, mod.embedding_dim = w.shape


def _norm(mod, w):
    mod.normalized_shape = tuple(w.shape)


def _conv(mod, w):
    """(out, in/groups, k…), or (in, out/groups, k…) when transposed; a depthwise conv (groups = channels)
    keeps one filter per channel."""
    if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:
        mod.groups = mod.in_channels = mod.out_channels = w.shape[0]
    elif mod.transposed:
        mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
    else:
        mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups


def _batch_norm(mod, w):
    mod.num_features = w.shape[0]


def _group_norm(mod, w):
    if mod.num_groups == mod.num_channels:   # one group per channel stays so
        mod.num_groups = w.shape[0]
    mod.num_channels = w.shape[0]


def _shape_attrs() -> list[tuple[type, object]]:
    table = [(torch.nn.Linear, _linear), (torch.nn.Embedding, _embedding),
             ((torch.nn.LayerNorm, torch.nn.RMSNorm), _norm), (torch.nn.modules.conv._ConvNd, _conv),
             (torch.nn.modules.batchnorm._BatchNorm, _batch_norm), (torch.nn.GroupNorm, _group_norm)]
    try:
        from transformers.pytorch_utils import Conv1D
        table.append((Conv1D, _transposed_linear))
    except ImportError:
        pass
    return table


def sync_shapes(model: torch.nn.Module) -> None:
    """Module attributes that restate a parameter's shape (in_features, normalized_shape, …)."""
    table = _shape_attrs()
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        for cls, update in table:
            if isinstance(mod, cls):
                update(mod, w)
                break


def rescale_embedding(mod: torch.nn.Module, n: int, m: int) -> float:
    """A sqrt(hidden_size) embedding scale, set to sqrt(m); returns the factor the weights take so that
    nothing changes (1.0 for a module without such a scale)."""
    scale = getattr(mod, EMBED_SCALE_BUFFER, None)
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or abs(scale.item() - math.sqrt(n)) > 1e-4:
        return 1.0
    with torch.no_grad():
        scale.fill_(math.sqrt(m))
    if isinstance(getattr(mod, EMBED_SCALE_FLOAT, None), float):
        setattr(mod, EMBED_SCALE_FLOAT, math.sqrt(m))
    return math.sqrt(n / m)
