"""Model factories for the examples: `file.py:func` specs return (module, example_inputs[, tokenizer])."""
import torch
from torch import nn


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval(), (torch.randint(0, 256, (2, 16)),)


class AudioEncoder(nn.Module):
    """Not a Hugging Face model: a 1-D conv front end, then pre-norm MLP blocks with residual adds."""
    def __init__(self, d=48, hidden=128, blocks=3, classes=12):
        super().__init__()
        self.frontend = nn.Conv1d(16, d, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.RMSNorm(d), nn.Linear(d, hidden), nn.SiLU(),
                                                  nn.Linear(hidden, d)) for _ in range(blocks))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, features):                      # (batch, 16 mel bins, frames)
        x = self.frontend(features).transpose(1, 2)   # (batch, frames, d)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x).mean(dim=1))


def audio_encoder():
    torch.manual_seed(0)
    return AudioEncoder().eval(), (torch.randn(2, 16, 20),)
