"""Tiny random models built in code: Hugging Face configs and modules that are not Hugging Face.

Each builder returns (model, example_inputs). Sizes are small so the whole suite runs in minutes on 2 cores.
"""
import math

import torch
from torch import nn

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _ids(batch=2, seq=10, vocab=VOCAB):
    return (torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)),)


def _hf(config_cls, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_cls(**kw)).eval(), _ids()


def llama():
    from transformers import LlamaConfig
    return _hf(LlamaConfig, **SMALL)


def qwen2():
    from transformers import Qwen2Config
    return _hf(Qwen2Config, **SMALL)


def mistral():
    from transformers import MistralConfig
    return _hf(MistralConfig, **SMALL)


def phi3():
    from transformers import Phi3Config
    return _hf(Phi3Config, **SMALL, pad_token_id=0)


def gemma():
    from transformers import GemmaConfig
    return _hf(GemmaConfig, **SMALL, head_dim=16)


def gpt2():
    from transformers import GPT2Config
    return _hf(GPT2Config, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
               eos_token_id=0)


def opt():
    from transformers import OPTConfig
    return _hf(OPTConfig, vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, word_embed_proj_dim=64)


def bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=False).eval(), _ids()


class _NanoBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.n_head = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT-style: fused qkv, explicit attention math, tied head."""
    def __init__(self, vocab=VOCAB, d=32, heads=4, layers=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_NanoBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def embed(self, idx):
        return self.wte(idx)

    def forward(self, idx):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def nanogpt():
    torch.manual_seed(0)
    return NanoGPT().eval(), _ids()


class _SdpaBlock(_NanoBlock):
    def attn(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoGPTSdpa(NanoGPT):
    """nanoGPT as it is written today: causal SDPA, learned positions from `torch.arange(t)`, tied head."""
    def __init__(self, vocab=VOCAB, d=32, heads=4, layers=2, positions=64):
        super().__init__(vocab, d, heads, layers)
        self.blocks = nn.ModuleList(_SdpaBlock(d, heads) for _ in range(layers))
        self.wpe = nn.Embedding(positions, d)

    def embed(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        return self.wte(idx) + self.wpe(pos)


def nanogpt_sdpa():
    torch.manual_seed(0)
    return NanoGPTSdpa().eval(), _ids()


def _rope(x, pos):
    half = x.shape[-1] // 2
    angle = pos[:, None].float() / 10000 ** (torch.arange(half, dtype=torch.float32) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], -1)


class _RopeBlock(nn.Module):
    def __init__(self, d=32, heads=4, kv=2, hidden=64):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, kv * self.hd), nn.Linear(d, kv * self.hd)
        self.o, self.n1, self.n2 = nn.Linear(d, d), nn.RMSNorm(d), nn.RMSNorm(d)
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x, pos):
        B, T, C = x.shape
        y = self.n1(x)
        q, k, v = (p(y).view(B, T, h, self.hd).transpose(1, 2)
                   for p, h in ((self.q, self.heads), (self.k, self.kv), (self.v, self.kv)))
        a = nn.functional.scaled_dot_product_attention(_rope(q, pos), _rope(k, pos), v, is_causal=True,
                                                       enable_gqa=True, scale=0.3)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, C))
        y = self.n2(x)
        return x + self.down(nn.functional.silu(self.gate(y)) * self.up(y))


class RopeGqaSdpa(nn.Module):
    """A hand-written Llama: rotary positions from `torch.arange`, grouped-query SDPA (`enable_gqa`, own scale)."""
    def __init__(self, vocab=VOCAB, d=32, layers=2):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.blocks = nn.ModuleList(_RopeBlock(d) for _ in range(layers))

    def forward(self, ids):
        pos, x = torch.arange(ids.shape[1], device=ids.device), self.embed(ids)
        for b in self.blocks:
            x = b(x, pos)
        return self.head(x)


def rope_gqa_sdpa():
    torch.manual_seed(0)
    return RopeGqaSdpa().eval(), _ids()


class MixerBlock(nn.Module):
    """MLP-Mixer: an nn.Linear across the token dimension, then one across channels."""
    def __init__(self, tokens, d, token_hidden, channel_hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(d, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, d))

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, tokens=8, patch=12, d=32, blocks=2, classes=10):
        super().__init__()
        self.embed = nn.Linear(patch, d)
        self.blocks = nn.ModuleList(MixerBlock(tokens, d, 24, 48) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, patches):
        x = self.embed(patches)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(dim=1))


def mixer():
    torch.manual_seed(0)
    return Mixer().eval(), (torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(0)),)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def cnn():
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics, so a wrong BN rewrite shows
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval(), (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def gemma3():
    """Gemma 3: one kv head, q/k norms, sandwich norms, sliding-window and global layers with their own RoPE."""
    from transformers import Gemma3TextConfig
    return _hf(Gemma3TextConfig, **{**SMALL, "num_hidden_layers": 3, "num_key_value_heads": 1}, head_dim=16,
               sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"])


def gemma2():
    """Gemma 2: sandwich norms, soft-capped attention and logits, alternating sliding windows."""
    from transformers import Gemma2Config
    return _hf(Gemma2Config, **SMALL, head_dim=16, sliding_window=4)


def qwen3():
    from transformers import Qwen3Config
    return _hf(Qwen3Config, **SMALL, head_dim=16)


def olmo2():
    """OLMo-2: norms on the full q/k width and on each branch's output, none before the branches."""
    from transformers import Olmo2Config
    return _hf(Olmo2Config, **SMALL, pad_token_id=0, eos_token_id=0, bos_token_id=0)


def llama_mqa():
    from transformers import LlamaConfig
    return _hf(LlamaConfig, **{**SMALL, "num_key_value_heads": 1})


HF = ["llama", "qwen2", "mistral", "gpt2", "opt", "phi3", "gemma", "bert", "gemma3", "gemma2", "qwen3", "olmo2",
      "llama_mqa"]
NON_HF = ["nanogpt", "mixer", "cnn"]
ALL = HF + NON_HF


def llama_gqa8():
    """8 q heads in 2 kv groups: removing a quarter of the heads keeps both groups (3 q heads each)."""
    from transformers import LlamaConfig
    return _hf(LlamaConfig, **{**SMALL, "num_attention_heads": 8})


def llama_mha():
    from transformers import LlamaConfig
    return _hf(LlamaConfig, **{**SMALL, "num_key_value_heads": 4})


def _duplicate_rows(W, dst, src, dim=0):
    with torch.no_grad():
        W.index_copy_(dim, dst, W.index_select(dim, src))


def llama_duplicated_neurons():
    """float64 Llama whose MLP neurons 72…95 copy neurons 0…23 (gate and up rows); their down_proj columns are
    small, so they rank last and the 72 originals are the targets."""
    model, inputs = llama()
    model = model.double()
    src, dst = torch.arange(24), torch.arange(72, 96)
    for layer in model.model.layers:
        _duplicate_rows(layer.mlp.gate_proj.weight, dst, src)
        _duplicate_rows(layer.mlp.up_proj.weight, dst, src)
        with torch.no_grad():
            layer.mlp.down_proj.weight[:, dst] *= 0.01
    return model, inputs


def llama_duplicated_heads():
    """float64 multi-head Llama whose head 3 copies head 0 (q, k, v rows); its o_proj columns are small."""
    model, inputs = llama_mha()
    model = model.double()
    hd = SMALL["hidden_size"] // 4
    src, dst = torch.arange(hd), torch.arange(3 * hd, 4 * hd)
    for layer in model.model.layers:
        for proj in ("q_proj", "k_proj", "v_proj"):
            _duplicate_rows(getattr(layer.self_attn, proj).weight, dst, src)
        with torch.no_grad():
            layer.self_attn.o_proj.weight[:, dst] *= 0.01
    return model, inputs


def llama_tiny_eps():
    from transformers import LlamaConfig
    return _hf(LlamaConfig, **SMALL, rms_norm_eps=1e-12)


def gpt2_tiny_eps():
    from transformers import GPT2Config
    return _hf(GPT2Config, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
               eos_token_id=0, layer_norm_epsilon=1e-12)


class _Residual(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(self.norm(x))))


class OutsideResidual(nn.Module):
    """Blocks return only their branch; the residual is added outside them, so the blocks do not chain."""
    def __init__(self, vocab=VOCAB, d=32, ff=64, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Residual(d, ff) for _ in range(layers))
        self.out = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


def outside_residual():
    torch.manual_seed(0)
    return OutsideResidual().eval(), _ids()


class _WindowBlock(nn.Module):
    """A block that attends within a window given by its caller (as sliding-window layers do)."""
    def __init__(self, d, ff):
        super().__init__()
        self.norm, self.o = nn.LayerNorm(d), nn.Linear(d, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x, mask):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + self.o(att @ v)
        return x + self.down(torch.relu(self.up(x)))


class AlternatingWindows(nn.Module):
    """Even layers see 2 tokens back, odd layers the whole causal prefix: each block needs its own mask."""
    def __init__(self, vocab=VOCAB, d=32, ff=64, layers=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_WindowBlock(d, ff) for _ in range(layers))
        self.out = nn.Linear(d, vocab)

    def forward(self, idx):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        causal = pos[None, :] <= pos[:, None]
        local = causal & (pos[:, None] - pos[None, :] < 2)
        x = self.emb(idx)
        for i, b in enumerate(self.blocks):
            x = b(x, local if i % 2 == 0 else causal)
        return self.out(x)


def alternating_windows():
    torch.manual_seed(0)
    return AlternatingWindows().eval(), _ids()


def _word_tokenizer(vocab=VOCAB):
    """A word-level tokenizer over a fixed vocabulary (no downloads): w0 … w{vocab-3}, <bos>, <unk>."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {f"w{i}": i for i in range(vocab - 2)} | {"<bos>": vocab - 2, "<unk>": vocab - 1}
    tok = Tokenizer(tm.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")


def llama_with_tokenizer():
    model, inputs = llama()
    return model, inputs, _word_tokenizer()


def _hf_image(model_cls, config, size=16):
    torch.manual_seed(0)
    return model_cls(config).eval(), (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def hf_vit():
    """Transformers' ViT: its checkpoints keep the original weight names, which save_pretrained maps back to."""
    from transformers import ViTConfig, ViTForImageClassification
    return _hf_image(ViTForImageClassification, ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=5))


def hf_convnext():
    """Transformers' ConvNeXt: depthwise convs whose `groups` follow their channels, two stages."""
    from transformers import ConvNextConfig, ConvNextForImageClassification
    return _hf_image(ConvNextForImageClassification, ConvNextConfig(
        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5), size=32)


class HandGQA(nn.Module):
    """Grouped-query attention written by hand: fused k‖v, kv heads repeated with repeat_interleave."""
    def __init__(self, d=32, heads=4, kv=2):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, d // heads
        self.q, self.kvp, self.o = nn.Linear(d, d), nn.Linear(d, 2 * kv * self.hd), nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k, v = (z.transpose(1, 2).repeat_interleave(self.heads // self.kv, dim=1)
                for z in self.kvp(x).view(b, t, 2, self.kv, self.hd).unbind(2))
        return self.o(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
                      .reshape(b, t, -1))


def gqa_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 32), HandGQA(), nn.Linear(32, VOCAB)).eval()
    return model, _ids()


def hf_t5_encoder():
    """T5's encoder: one relative-position bias (buckets × heads), computed in the first layer and added to
    every layer's scores as SDPA's mask."""
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval(), _ids()


def hf_swin():
    """Transformers' Swin: windows padded and shifted, a bias table per head, two stages joined by patch merging."""
    from transformers import SwinConfig, SwinForImageClassification
    return _hf_image(SwinForImageClassification, SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5),
        size=32)
