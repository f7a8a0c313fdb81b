"""Vision and speech models written the way their authors write them (timm, torchvision, ConvNeXt, Whisper,
torch.nn.TransformerEncoder), tiny.

Each builder returns (model, example_inputs). torchvision and timm do not import beside this project's CPU torch,
so the layouts are reproduced here: fused qkv reshaped to (3, heads, head_dim) and unbound, class tokens, layer
scale, BasicBlock/Bottleneck with downsample shortcuts, inverted residuals with depthwise convs, a VGG classifier
over flattened feature maps, a Whisper encoder (conv front end, then transformer blocks), PyTorch's own
nn.TransformerEncoderLayer (nn.MultiheadAttention folds its heads into the batch dim), DenseNet's growing
concatenation of features, a U-Net (transposed-conv upsampling, skip concatenated onto the decoder), a Conformer
block (einsum attention, a GLU conv module), PoolFormer (GroupNorm, pooling as token mixer), an MLP-Mixer
(a token-mixing MLP over the patch grid) and Swin (shifted windows, a relative-position bias table per head).
"""
import torch
from torch import nn


class Attention(nn.Module):
    """timm's ViT attention."""
    def __init__(self, dim, num_heads=4, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class LayerScale(nn.Module):
    def __init__(self, dim, init=1e-1):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, qk_norm=False, layer_scale=True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, qk_norm)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, img=16, patch=4, dim=32, depth=2, heads=4, classes=10, qk_norm=False, layer_scale=True):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim).normal_(std=0.02))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, dim).normal_(std=0.02))
        self.blocks = nn.Sequential(*[Block(dim, heads, qk_norm, layer_scale) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


def _images(batch=2, size=16):
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def vit():
    torch.manual_seed(0)
    return VisionTransformer().eval(), _images()


def vit_qk_norm():
    torch.manual_seed(0)
    return VisionTransformer(qk_norm=True, layer_scale=False).eval(), _images()


class BasicBlock(nn.Module):
    """torchvision's BasicBlock."""
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(planes), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, widths=(16, 32), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        layers, inplanes = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and inplanes == w else nn.Sequential(
                nn.Conv2d(inplanes, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            layers.append(nn.Sequential(BasicBlock(inplanes, w, stride, down), BasicBlock(w, w)))
            inplanes = w
        self.layer1, self.layer2 = layers
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(inplanes, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def resnet():
    torch.manual_seed(0)
    return _randomise_bn(ResNet()).eval(), _images()


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: 7×7 depthwise conv, channels-last LayerNorm, Linear MLP, layer scale."""
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm, self.pwconv1 = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim)
        self.act, self.pwconv2 = nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-1 * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dim=16, depth=2, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.stages = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean((-2, -1))))


def convnext():
    torch.manual_seed(0)
    return ConvNeXt().eval(), _images()


class InvertedResidual(nn.Module):
    """MobileNetV2: 1×1 expand, 3×3 depthwise, 1×1 project."""
    def __init__(self, c, expand=4):
        super().__init__()
        h = c * expand
        self.conv = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
                                  nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                  nn.ReLU6(inplace=True), nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, c=8, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(c), InvertedResidual(c))
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        return self.classifier(self.blocks(self.stem(x)).mean((2, 3)))


def mobilenet():
    torch.manual_seed(0)
    return _randomise_bn(MobileNetV2()).eval(), _images()


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet-50 and up): 1×1 reduce, 3×3, 1×1 expand."""
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def resnet_bottleneck():
    torch.manual_seed(0)
    down = lambda i, o, s: nn.Sequential(nn.Conv2d(i, o, 1, s, bias=False), nn.BatchNorm2d(o))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                          Bottleneck(16, 8, 1, down(16, 32, 1)), Bottleneck(32, 8),
                          Bottleneck(32, 16, 2, down(32, 64, 2)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10))
    return _randomise_bn(model).eval(), _images()


def vgg():
    """A classifier over flattened feature maps: each channel is 4×4 consecutive inputs of the first Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    return model.eval(), _images()


class WhisperAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.q_proj(x) * self.head_dim ** -0.5), split(self.k_proj(x)), split(self.v_proj(x))
        o = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.out_proj(o.transpose(1, 2).reshape(b, t, -1))


class WhisperLayer(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = WhisperAttention(d, heads), nn.LayerNorm(d)
        self.fc1, self.fc2, self.final_layer_norm = nn.Linear(d, ff), nn.Linear(ff, d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Whisper's encoder: two Conv1d over mel frames, learned positions, pre-LN transformer layers."""
    def __init__(self, n_mels=16, d=32, heads=4, ff=64, layers=2, ctx=20):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(ctx, d)
        self.layers = nn.ModuleList(WhisperLayer(d, heads, ff) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, input_features):
        x = nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(input_features)))).permute(0, 2, 1)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


def whisper():
    torch.manual_seed(0)
    return WhisperEncoder().eval(), (torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(0)),)


class TorchTransformer(nn.Module):
    """A token classifier on PyTorch's nn.TransformerEncoder (pre-LN, no final norm)."""
    def __init__(self, d=32, heads=4, ff=64, layers=2, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.encoder(self.emb(ids)))


def torch_transformer():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    return TorchTransformer().eval(), (ids,)


class DenseLayer(nn.Module):
    """DenseNet: BN-ReLU-conv, its new features concatenated onto its input's."""
    def __init__(self, cin, growth):
        super().__init__()
        self.norm, self.relu = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


def densenet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), DenseLayer(16, 8), DenseLayer(24, 8),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False), nn.AvgPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return _randomise_bn(model).eval(), _images()


class UNet(nn.Module):
    """A one-level U-Net: the decoder reads the upsampled features and the encoder's skip, concatenated."""
    def __init__(self, c=8):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        skip = self.enc(x)
        return self.out(self.dec(torch.cat([self.up(self.down(skip)), skip], dim=1)))


def unet():
    torch.manual_seed(0)
    return UNet().eval(), _images()


class EinsumAttention(nn.Module):
    """Attention as lucidrains-style code writes it: chunked qkv and einsum products."""
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.to_qkv, self.to_out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = torch.einsum("bhid,bhjd->bhij", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        return self.to_out(torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, d))


class ConformerBlock(nn.Module):
    """Half-step feed-forward, attention, a GLU/depthwise conv module, final LayerNorm."""
    def __init__(self, d=32, heads=4, k=5):
        super().__init__()
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        self.norm_attn, self.attn = nn.LayerNorm(d), EinsumAttention(d, heads)
        self.norm_conv, self.pw1 = nn.LayerNorm(d), nn.Conv1d(d, 2 * d, 1)
        self.dw, self.bn, self.pw2 = nn.Conv1d(d, d, k, padding=k // 2, groups=d), nn.BatchNorm1d(d), nn.Conv1d(d, d, 1)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x):
        x = x + 0.5 * self.ff(x)
        x = x + self.attn(self.norm_attn(x))
        y = nn.functional.glu(self.pw1(self.norm_conv(x).transpose(1, 2)), dim=1)
        x = x + self.pw2(nn.functional.silu(self.bn(self.dw(y)))).transpose(1, 2)
        return self.norm_out(x)


def conformer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), ConformerBlock(), ConformerBlock(), nn.Linear(32, 7))
    return model.eval(), (torch.randn(2, 10, 12, generator=torch.Generator().manual_seed(0)),)


class PoolFormerBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.pool = nn.GroupNorm(1, d), nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.norm2, self.fc1, self.fc2 = nn.GroupNorm(1, d), nn.Conv2d(d, 4 * d, 1), nn.Conv2d(4 * d, d, 1)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.pool(y) - y
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def poolformer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 4, 4), PoolFormerBlock(16), PoolFormerBlock(16), nn.GroupNorm(1, 16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return model.eval(), _images()


class MixerBlock(nn.Module):
    def __init__(self, tokens, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.tokens = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channels = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class MlpMixer(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.stem, self.blocks = nn.Conv2d(3, d, 4, 4), nn.Sequential(MixerBlock(16, d), MixerBlock(16, d))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

    def forward(self, x):
        x = self.blocks(self.stem(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


def mlp_mixer():
    torch.manual_seed(0)
    return MlpMixer().eval(), _images()


class WindowAttention(nn.Module):
    """Swin's window attention: a (2w−1)² × heads bias table gathered per token pair by a fixed index."""
    def __init__(self, dim, window, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(0.02 * torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim=32, heads=4, window=4, shift=0):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, window, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x):   # (B, H, W, C)
        b, h, w, c = x.shape
        s, ws = self.norm1(x), self.window
        if self.shift:
            s = torch.roll(s, (-self.shift, -self.shift), (1, 2))
        s = s.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        s = self.attn(s).view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shift:
            s = torch.roll(s, (self.shift, self.shift), (1, 2))
        x = x + s
        return x + self.mlp(self.norm2(x))


class Swin(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.blocks = nn.Sequential(SwinBlock(dim), SwinBlock(dim, shift=2))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.blocks(self.patch_embed(x).permute(0, 2, 3, 1))
        return self.head(self.norm(x).mean((1, 2)))


def swin():
    torch.manual_seed(0)
    return Swin().eval(), _images()
