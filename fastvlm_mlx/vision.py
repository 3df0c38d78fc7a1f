"""FastViT "MCi" vision tower (FastViTHD) in MLX, NHWC, inference (reparameterized) form.

Parameter names follow timm's `fastvit` so the key map stays short. BatchNorm and layer
scale are folded into the neighbouring convs by the converter, so there are none here.
Device-neutral: MLX's own ops (grouped `conv2d`, `nn.gelu`, `mx.fast` attention), what MLX
runs best on a GPU. On the CPU, `fastvlm_mlx.cpu` swaps in faster versions of these modules.
"""

import mlx.core as mx
import mlx.nn as nn

from fastvlm_mlx.config import VisionConfig


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups)


class ConvAct(nn.Module):
    """timm MobileOneBlock / ReparamLargeKernelConv in inference form: conv -> GELU."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.reparam_conv = _conv(c_in, c_out, k, stride, groups)
        self.stride, self.grouped = stride, groups == c_in > 1

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.reparam_conv(x))


class PointwiseAct(nn.Module):
    """A 1x1 conv (stored as a Linear over channels) -> GELU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.reparam_conv = nn.Linear(c_in, c_out)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.reparam_conv(x))


class DepthwiseConv(nn.Module):
    """RepMixer and RepCPE in inference form: identity and layer scale are folded in."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.reparam_conv = _conv(dim, dim, k, groups=dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.reparam_conv(x)


class ConvMlp(nn.Module):
    """Depthwise 7x7 (BatchNorm folded in) -> 1x1 expand -> GELU -> 1x1 (layer scale folded)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv = _conv(dim, dim, 7, groups=dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        """x + MLP(x)."""
        return x + self.fc2(nn.gelu(self.fc1(self.conv(x))))


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, with_scores: bool = False):
        B, N, C = x.shape  # (B, N, C) tokens in row-major grid order
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        if not with_scores:
            out, received = self.attend(q, k, v), None
        else:
            probs = mx.softmax((q * self.scale) @ k.swapaxes(-1, -2), axis=-1, precise=True)
            out = probs @ v
            received = probs.mean(axis=(1, 2))  # (B, N): attention each key receives
        out = self.proj(out.transpose(0, 2, 1, 3).reshape(B, N, C))
        return out, received

    def attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """Softmax attention without scores: q, k, v (B, heads, N, head_dim)."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.token_mixer = DepthwiseConv(dim, 3)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def __call__(self, x: mx.array, with_scores: bool = False):
        return self.mlp(self.token_mixer(x)), None


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, head_dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.token_mixer = Attention(dim, head_dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def __call__(self, x: mx.array, with_scores: bool = False):
        B, H, W, C = x.shape
        mixed, received = self.token_mixer(self.norm(x).reshape(B, H * W, C), with_scores)
        return self.mlp(x + mixed.reshape(B, H, W, C)), received


class PatchEmbed(nn.Module):
    """Downsample: grouped 7x7 stride-2 conv (2 filters per channel) -> GELU -> 1x1 -> GELU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.proj = [ConvAct(c_in, c_out, 7, stride=2, groups=c_in), PointwiseAct(c_out, c_out)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj[1](self.proj[0](x))


class FastVitStage(nn.Module):
    def __init__(self, config: VisionConfig, i: int):
        super().__init__()
        dims, dim = config.embed_dims, config.embed_dims[i]
        if config.downsamples[i]:
            self.downsample = PatchEmbed(dims[i - 1], dim)
        if config.pos_embs[i]:
            self.pos_emb = DepthwiseConv(dim, 7)
        ratio = config.mlp_ratios[i]
        if config.token_mixers[i] == "attention":
            make = lambda: AttentionBlock(dim, ratio, config.head_dim, config.norm_eps)  # noqa: E731
        else:
            make = lambda: RepMixerBlock(dim, ratio)  # noqa: E731
        self.blocks = [make() for _ in range(config.layers[i])]

    def __call__(self, x: mx.array, with_scores: bool = False):
        for out in self.pieces(x, with_scores):  # noqa: B007  the last piece is the result
            pass
        return out

    def pieces(self, x: mx.array, with_scores: bool = False):
        """(activation, received) after each block, lazily; only the last block scores."""
        if "downsample" in self:
            x = self.downsample(x)
        if "pos_emb" in self:
            x = self.pos_emb(x)
        if not self.blocks:
            yield x, None
        for block in self.blocks:
            x, received = block(x, with_scores and block is self.blocks[-1])
            yield x, received


class SqueezeExcite(nn.Module):
    def __init__(self, dim: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, reduced)
        self.fc2 = nn.Linear(reduced, dim)

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.fc2(nn.relu(self.fc1(x.mean(axis=(1, 2), keepdims=True))))
        return x * mx.sigmoid(gate)


class FinalConv(nn.Module):
    """Grouped 3x3 conv expanding channels (cls_ratio), SE, GELU (timm `final_conv`)."""

    def __init__(self, dim: int, out: int, se_ratio: float):
        super().__init__()
        self.reparam_conv = _conv(dim, out, 3, groups=dim)
        self.se = SqueezeExcite(out, int(out * se_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.se(self.reparam_conv(x)))


class FastViT(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d0 = config.embed_dims[0]
        self.stem = [ConvAct(3, d0, 3, stride=2), ConvAct(d0, d0, 3, stride=2, groups=d0), PointwiseAct(d0, d0)]
        self.stages = [FastVitStage(config, i) for i in range(len(config.layers))]
        self.final_conv = FinalConv(config.embed_dims[-1], config.num_features, config.se_ratio)
        last_attention = [i for i, m in enumerate(config.token_mixers) if m == "attention"]
        self.scored_stage = last_attention[-1] if last_attention else None

    def __call__(self, pixels: mx.array, with_scores: bool = False):
        """pixels (B, H, W, 3) -> tokens (B, N, D), and attention received (B, N') or None.

        The scores come from the last attention block; with_scores=False never builds maps.
        """
        for out in self.pieces(pixels, with_scores):  # noqa: B007  the last piece is the result
            pass
        return out

    def pieces(self, pixels: mx.array, with_scores: bool = False):
        """The tower a piece at a time, lazily: yields (activation, None) after the stem and after
        every block, and last (tokens, scores) as `__call__` returns them. A caller that evaluates
        each piece can do other work between them (the server decodes between them)."""
        x = pixels
        for layer in self.stem:
            x = layer(x)
        yield x, None
        scores = None
        for i, stage in enumerate(self.stages):
            for out, received in stage.pieces(x, with_scores and i == self.scored_stage):
                scores = received if received is not None else scores
                yield out, None
            x = out
        x = self.final_conv(x)
        B, H, W, D = x.shape
        yield x.reshape(B, H * W, D), scores
