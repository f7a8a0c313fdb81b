"""The analysis finds the right groups on every architecture of the coverage list (DESIGN §4)."""
import pytest
import torch

import models
from dotresize_fx.analyze import analyze

# (residual groups, resizable residual, mlp groups, mlp size, heads groups, q heads, kv heads, head_dim)
EXPECTED = {
    "llama": (1, True, 2, 96, 2, 4, 2, 16),
    "qwen2": (1, True, 2, 96, 2, 4, 2, 16),
    "mistral": (1, True, 2, 96, 2, 4, 2, 16),
    "phi3": (1, True, 2, 96, 2, 4, 2, 16),
    "gemma": (1, True, 2, 96, 2, 4, 2, 16),
    "gpt2": (1, True, 2, 256, 2, 4, 4, 16),
    "opt": (1, True, 2, 96, 2, 4, 4, 16),
    "bert": (1, False, 2, 96, 2, 4, 4, 16),
    "nanogpt": (1, True, 2, 128, 2, 4, 4, 8),
    "gemma3": (1, False, 3, 96, 3, 4, 1, 16),
    "gemma2": (1, False, 2, 96, 2, 4, 2, 16),
    "qwen3": (1, True, 2, 96, 2, 4, 2, 16),
    "olmo2": (1, False, 2, 96, 2, 4, 2, 16),
    "llama_mqa": (1, True, 2, 96, 2, 4, 1, 16),
}


def summary(analysis):
    return [{"name": g.name, "kind": g.kind, "size": g.size, "unit": g.unit, "kv_heads": g.kv_heads,
             "resizable": g.resizable, "reason": g.reason, "norm_position": g.norm_position,
             "members": sorted(f"{m.param}:{m.dim}:{m.role}:{m.offset}:{m.length}" for m in g.members),
             "constants": sorted(f"{c.node}:{c.index}={c.value}" for c in g.constants)}
            for g in analysis.groups]


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_transformer_groups(arch, golden):
    model, inputs = getattr(models, arch)()
    a = analyze(model, inputs)
    res, res_ok, n_mlp, mlp_size, n_heads, q, kv, hd = EXPECTED[arch]
    assert len(a.by_kind("residual")) == res
    assert a.by_kind("residual")[0].resizable is res_ok
    assert [g.size for g in a.by_kind("mlp")] == [mlp_size] * n_mlp
    assert all(g.resizable for g in a.by_kind("mlp"))
    heads = a.by_kind("heads")
    assert [(g.size, g.kv_heads, g.unit) for g in heads] == [(q, kv, hd)] * n_heads
    assert all(g.resizable for g in heads)
    golden(f"analyze/{arch}", summary(a))


@pytest.mark.parametrize("arch", ["gemma3", "olmo2", "gemma2"])
def test_branch_output_norms_pin_the_residual_with_their_own_reason(arch):
    r = analyze(*getattr(models, arch)()).by_kind("residual")[0]
    assert not r.resizable and r.norm_position == "branch" and "post-LN" not in r.reason
    assert "a gain applied to a branch's output before the residual add" in r.reason


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_per_head_qk_norms_are_shared_members_of_their_heads_group(arch):
    a = analyze(*getattr(models, arch)())
    for i, g in enumerate(a.by_kind("heads")):
        shared = sorted(m.param for m in g.members if m.role == "shared")
        assert shared == [f"model.layers.{i}.self_attn.k_norm.weight", f"model.layers.{i}.self_attn.q_norm.weight"]
    assert not [g for g in a.groups if g.size == 16]   # no separate head_dim "groups" any more


def test_one_kv_head_is_a_heads_group_with_kv_heads_1():
    a = analyze(*models.llama_mqa())
    g = a.by_kind("heads")[0]
    lengths = {m.param.rsplit(".", 2)[-2]: m.length for m in g.members}
    assert (g.size, g.kv_heads, g.unit) == (4, 1, 16)
    assert lengths == {"q_proj": 64, "k_proj": 16, "v_proj": 16, "o_proj": 64}


def test_gqa_members_have_kv_and_q_widths():
    a = analyze(*models.llama())
    heads = a.by_kind("heads")[0]
    lengths = {m.param.rsplit(".", 2)[-2]: m.length for m in heads.members}
    assert lengths == {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64}


def test_post_ln_residual_reason_names_post_ln():
    a = analyze(*models.bert())
    assert "post-LN" in a.by_kind("residual")[0].reason
    assert a.by_kind("residual")[0].norm_position == "post"


def test_fused_qkv_segments():
    a = analyze(*models.gpt2())
    spans = sorted((m.offset, m.length) for m in a.by_kind("heads")[0].members if m.param.endswith("c_attn.weight"))
    assert spans == [(0, 64), (64, 128 - 64), (128, 64)]


def test_tied_embedding_noted():
    a = analyze(*models.nanogpt())
    assert a.tied == [["wte.weight", "lm_head.weight"]]
    assert a.by_kind("residual")[0].tied


def test_mixer_token_linear():
    a = analyze(*models.mixer())
    assert len(a.by_kind("residual")) == 1 and a.by_kind("residual")[0].size == 32
    # two MLPs per block: token mixing (hidden 24) and channel mixing (hidden 48)
    assert sorted(g.size for g in a.by_kind("mlp")) == [24, 24, 48, 48]
    tokens = [g for g in a.groups if g.size == 8]
    assert len(tokens) == 1 and not tokens[0].resizable and "input" in tokens[0].reason


def test_cnn_channels_with_batchnorm():
    a = analyze(*models.cnn())
    chans = {g.size: g for g in a.by_kind("channels")}
    assert chans[16].resizable and chans[24].resizable
    assert not chans[3].resizable and "input" in chans[3].reason
    roles = sorted((m.param, m.role) for m in chans[16].members)
    assert ("bn1.running_var", "passthrough") in roles and ("conv2.weight", "consumer") in roles


class _Unknown(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))


def test_unknown_op_pins_its_group_with_the_op_name():
    a = analyze(_Unknown().eval(), (torch.randn(2, 8),))
    hidden = [g for g in a.groups if g.size == 16][0]
    assert not hidden.resizable
    assert "aten.cumsum" in hidden.reason and "<root>" in hidden.reason


def test_channel_spaces_refuse_joining_different_static_sizes():
    import pytest
    from dotresize_fx.spaces import ChannelSpaces, SizeMismatch
    s = ChannelSpaces()
    a, b, one, seq = s.new(16), s.new(24), s.new(1), s.new(None)
    s.join(a, one)        # a broadcast dim carries no width
    s.join(a, seq)        # nor does a symbolic one
    assert s.find(a) != s.find(one) and s.find(a) != s.find(seq)
    with pytest.raises(SizeMismatch):
        s.join(a, b)


class _HigherOrder(torch.nn.Module):
    """An op without a rule (cumsum, inside a branch of torch.cond) pins the width it touches."""
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        h = torch.cond(h.sum() > 0, lambda t: t * 2, lambda t: t.cumsum(-1), (h,))
        return self.b(h)


class _Chunked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.o((q @ k.transpose(-2, -1)).softmax(-1) @ v)


def test_a_part_of_an_equal_split_cannot_change_alone():
    """chunk(3) derives each part's width from the input's: v alone (v→o) would leave the parts unequal."""
    a = analyze(_Chunked().eval(), (torch.randn(2, 5, 8),))
    vo = [g for g in a.groups if any(m.param == "o.weight" for m in g.members)][0]
    assert not vo.resizable and "equal parts" in vo.reason


def test_higher_order_ops_pin_their_widths():
    a = analyze(_HigherOrder().eval(), (torch.randn(2, 8),))
    hidden = [g for g in a.groups if g.size == 16][0]
    assert not hidden.resizable and "no rule for cond" in hidden.reason


def test_a_norm_written_inline_in_a_block_pins_the_stream_with_that_reason():
    """F.layer_norm in a block's own forward is no norm module whose gains the rewrite could fold: the stream
    stays, saying why (it used to be mistaken for post-LN), and the MLP stays resizable."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.g, self.b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
            self.up, self.down = nn.Linear(d, 32), nn.Linear(32, d)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(torch.nn.functional.layer_norm(x, (16,), self.g, self.b))))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Block(), Block(), nn.Linear(16, 4)).eval()
    a = analyze(model, (torch.randn(2, 5, 8),))
    residual = a.by_kind("residual")[0]
    assert not residual.resizable and "written inline in 1's forward" in residual.reason
    assert all(g.resizable for g in a.by_kind("mlp"))


def test_last_token_pooling_by_gather_leaves_the_width_free():
    """h.gather(1, idx) with the index expanded over the width (the last real token of each row): the tokens
    are gathered, the MLP and the stream stay resizable."""
    from torch import nn

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.up = nn.Embedding(50, 16), nn.Linear(16, 32)
            self.down, self.head = nn.Linear(32, 16), nn.Linear(16, 3)

        def forward(self, ids, lengths):
            h = self.emb(ids)
            h = h + self.down(torch.relu(self.up(h)))
            idx = (lengths - 1)[:, None, None].expand(-1, 1, h.shape[-1])
            return self.head(h.gather(1, idx).squeeze(1))

    torch.manual_seed(0)
    model = Pooled().eval()
    a = analyze(model, (torch.randint(0, 50, (2, 7)), torch.tensor([7, 4])))
    assert [g.resizable for g in a.by_kind("mlp")] == [True]
    assert all(g.resizable for g in a.groups if g.size == 16)


def test_a_consumer_read_inside_its_module_is_marked_and_observed_on_its_node():
    """`h @ self.w` in a module's own forward reads a value the module computed: a hook on the module's input
    would see x, not h, so the member says so; the program path observes the node itself and compresses."""
    from torch import nn

    class Inline(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.w = nn.Linear(8, 16), nn.Parameter(torch.randn(16, 4))

        def forward(self, x):
            return torch.relu(self.up(x)) @ self.w

    from dotresize_fx.calibrate import collect_stats
    from dotresize_fx.program import as_module
    torch.manual_seed(0)
    model, x = Inline().eval(), (torch.randn(3, 8),)
    a = analyze(model, x)
    g = a.by_kind("mlp")[0]
    assert [(m.param, m.inside) for m in g.consumers()] == [("w", True)]
    cal = collect_stats(as_module(a), a, [x], [g.name], progress=False)
    h = torch.relu(model.up(x[0])).double()
    assert torch.allclose(cal.stats[g.name].gram, h.T @ h)
