"""Random Llama models of three sizes for benchmarks/scale.py, as `file.py:func` factories (no download).

Sizes follow real checkpoints' shapes: ~135M (SmolLM2-135M's), ~400M, ~835M (hidden 2048, MLP 5632, 16 layers,
32 q / 4 kv heads, untied head: the shape the scale issue measured).
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIGS = {
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "400m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False),
    "835m": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False),
}


def _llama(size: str):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIGS[size], max_position_embeddings=512)).eval()
    return model, (torch.randint(0, CONFIGS[size]["vocab_size"], (1, 16)),)


def llama_135m():
    return _llama("135m")


def llama_400m():
    return _llama("400m")


def llama_835m():
    return _llama("835m")
