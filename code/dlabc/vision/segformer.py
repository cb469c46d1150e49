r"""SegFormer: semantic segmentation with a hierarchical Transformer and an all-MLP
decoder, equal to Hugging Face's ``SegformerForSemanticSegmentation`` with the same
weights.

Chapter: ``book/vision/segformer.md``.

References:
- Xie, Wang, Yu, Anandkumar, Alvarez & Luo (2021), *SegFormer: Simple and Efficient
  Design for Semantic Segmentation with Transformers*, NeurIPS (overlapping patch
  embeddings, efficient self-attention with a reduction ratio, Mix-FFN, the Mix
  Transformer encoders MiT-B0 to B5, the all-MLP decoder).
- Wang et al. (2021), *Pyramid Vision Transformer*, ICCV (the four-stage pyramid and
  the spatial reduction of keys and values that SegFormer keeps).
- Zheng et al. (2021), *Rethinking Semantic Segmentation from a Sequence-to-Sequence
  Perspective with Transformers*, CVPR (SETR: a plain ViT encoder for segmentation).

Shapes: ``B`` batch, ``C`` channels of a stage, ``H, W`` the size of a stage's feature
map, ``N = H W`` its tokens, ``K`` classes. Stage ``i`` works at ``1/4, 1/8, 1/16,
1/32`` of the image. The parameter names map onto Hugging Face's through
:data:`HF_RENAMES` (:func:`segformer_from_hf_state_dict`); the attention's
``W_q, W_k, W_v, W_o`` are those of the book's
:class:`~dlabc.transformers.attention_with_pytorch.MultiHeadAttention`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.transformers.attention_with_pytorch import MultiHeadAttention

__all__ = [
    "SegFormerConfig",
    "CONFIGS",
    "OverlapPatchEmbed",
    "EfficientSelfAttention",
    "MixFFN",
    "MiTBlock",
    "MiTStage",
    "MixTransformer",
    "AllMLPDecoder",
    "SegFormer",
    "segmentation_loss",
    "coarse_truth",
    "HF_RENAMES",
    "segformer_from_hf_state_dict",
]


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SegFormerConfig:
    """The sizes of a SegFormer: one entry per stage for the tuples.

    The defaults are MiT-B0 with the ADE20K head (150 classes). ``sr_ratios`` are the
    spatial reduction ratios $r$ of the keys and values (the paper's $R = r^2$ counts
    tokens). ``eps`` is the LayerNorms' epsilon (PyTorch's default, as in Hugging
    Face's model). ``dropout`` is applied before the classifier, in training only.
    """

    hidden_sizes: tuple[int, ...] = (32, 64, 160, 256)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    n_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratio: int = 4
    decoder_width: int = 256
    in_channels: int = 3
    n_classes: int = 150
    dropout: float = 0.1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        n = len(self.hidden_sizes)
        if n == 0:
            raise ValueError("hidden_sizes must name at least one stage")
        for name in (
            "hidden_sizes",
            "depths",
            "n_heads",
            "sr_ratios",
            "patch_sizes",
            "strides",
        ):
            values = getattr(self, name)
            if not isinstance(values, tuple) or len(values) != n:
                raise ValueError(
                    f"{name} must be a tuple with one entry per stage ({n}), "
                    f"got {values!r}"
                )
            for value in values:
                check_positive_int(value, name)
        for c, h in zip(self.hidden_sizes, self.n_heads, strict=True):
            if c % h:
                raise ValueError(
                    f"hidden_sizes {self.hidden_sizes} must be divisible by n_heads "
                    f"{self.n_heads}, stage by stage"
                )
        for name in ("mlp_ratio", "decoder_width", "in_channels", "n_classes"):
            check_positive_int(getattr(self, name), name)
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {self.n_classes}")
        check_number(self.dropout, "dropout", low=0, high=1, high_open=True)
        check_number(self.eps, "eps", low=0, low_open=True)


def _mit(hidden_sizes: tuple[int, ...], depths: tuple[int, ...], decoder: int):
    return SegFormerConfig(
        hidden_sizes=hidden_sizes, depths=depths, decoder_width=decoder
    )


#: The six SegFormers of the paper (Xie et al. 2021), with the
#: 150 classes of ADE20K: the encoders MiT-B0 to B5 and the decoder widths.
CONFIGS: dict[str, SegFormerConfig] = {
    "b0": _mit((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": _mit((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": _mit((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": _mit((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": _mit((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": _mit((64, 128, 320, 512), (3, 6, 40, 3), 768),
}


# ---------------------------------------------------------------- tokens and maps


def to_map(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Tokens ``(B, H W, C)`` in row-major order as a feature map ``(B, C, H, W)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], H, W)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """A feature map ``(B, C, H, W)`` as tokens ``(B, H W, C)``, row by row."""
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------- the encoder


class OverlapPatchEmbed(nn.Module):
    r"""Overlapping patches: a $k \times k$ convolution with stride $s < k$, then a
    LayerNorm over the channels.

    $k = 7, s = 4$ makes the first stage's tokens from $7 \times 7$ patches that overlap
    their neighbours by three pixels (ViT's patches do not overlap: $k = s$); the
    later stages use $k = 3, s = 2$. Padding $\lfloor k/2 \rfloor$ makes the output
    $\lceil H/s \rceil \times \lceil W/s \rceil$.
    """

    def __init__(
        self, in_channels: int, d_model: int, patch_size: int, stride: int, eps: float
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_channels, d_model, patch_size, stride, padding=patch_size // 2
        )
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, H / s, W / s)
        H, W = x.shape[-2:]
        return self.norm(to_tokens(x)), H, W  # (B, N, C)


class EfficientSelfAttention(MultiHeadAttention):
    r"""Multi-head self-attention whose keys and values come from a smaller map.

    The queries are all $N = HW$ tokens; the keys and values are computed from the map
    shrunk by $r$ along each axis, by a convolution with kernel and stride $r$ (the
    paper's reshape of $N/R$ groups of $R = r^2$ tokens followed by a linear map) and
    a LayerNorm:

    $\hat X = \operatorname{LN}\big(\operatorname{Conv}_{r \times r,\,
    \text{stride } r}(X)\big), \qquad
    \operatorname{Attention}(X W^Q, \hat X W^K, \hat X W^V) .$

    The score matrix is $N \times N / r^2$ instead of $N \times N$.
    """

    def __init__(self, d_model: int, n_heads: int, sr_ratio: int, eps: float) -> None:
        super().__init__(d_model, n_heads)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(d_model, d_model, sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(
        self, x: torch.Tensor, H: int, W: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv = x  # (B, N, C)
        if self.sr_ratio > 1:
            kv = self.sr(to_map(x, H, W))  # (B, C, H / r, W / r)
            kv = self.sr_norm(to_tokens(kv))  # (B, N / r^2, C)
        # (B, N, C) and the weights (B, heads, N, N / r^2)
        return super().forward(x, kv, kv)


class MixFFN(nn.Module):
    r"""The feed-forward network with a $3 \times 3$ depthwise convolution inside.

    $\operatorname{MixFFN}(x) = \operatorname{MLP}_2\Big(\operatorname{GELU}\big(
    \operatorname{Conv}_{3 \times 3}(\operatorname{MLP}_1(x))\big)\Big)$

    The convolution mixes each hidden channel over a token's eight neighbours. With its
    zero padding it also tells a token where the border is, which is all the position
    information SegFormer has: there are no position embeddings.
    """

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.dwconv = nn.Conv2d(d_hidden, d_hidden, 3, padding=1, groups=d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.fc1(x)  # (B, N, 4C)
        x = to_tokens(self.dwconv(to_map(x, H, W)))  # (B, N, 4C)
        return self.fc2(F.gelu(x))  # (B, N, C)


class MiTBlock(nn.Module):
    r"""A pre-LN Transformer block with the two sublayers above:

    $x \leftarrow x + \operatorname{Attn}(\operatorname{LN}(x)), \qquad
    x \leftarrow x + \operatorname{MixFFN}(\operatorname{LN}(x)) .$
    """

    def __init__(
        self, d_model: int, n_heads: int, sr_ratio: int, mlp_ratio: int, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = EfficientSelfAttention(d_model, n_heads, sr_ratio, eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MixFFN(d_model, mlp_ratio * d_model)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), H, W)[0]  # (B, N, C)
        return x + self.mlp(self.norm2(x), H, W)  # (B, N, C)


class MiTStage(nn.Module):
    """One stage of the Mix Transformer: overlapping patch embedding, ``depth``
    blocks, a LayerNorm; returns the stage's feature map ``(B, C, H, W)``."""

    def __init__(self, config: SegFormerConfig, i: int) -> None:
        super().__init__()
        c = config.hidden_sizes
        self.patch_embed = OverlapPatchEmbed(
            config.in_channels if i == 0 else c[i - 1],
            c[i],
            config.patch_sizes[i],
            config.strides[i],
            config.eps,
        )
        self.blocks = nn.ModuleList(
            MiTBlock(
                c[i],
                config.n_heads[i],
                config.sr_ratios[i],
                config.mlp_ratio,
                config.eps,
            )
            for _ in range(config.depths[i])
        )
        self.norm = nn.LayerNorm(c[i], eps=config.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, H, W = self.patch_embed(x)  # (B, N, C)
        for block in self.blocks:
            x = block(x, H, W)
        return to_map(self.norm(x), H, W)  # (B, C, H, W)


class MixTransformer(nn.Module):
    """The hierarchical encoder (MiT): the stages one after the other, each taking
    the previous one's map; returns all their maps, finest first."""

    def __init__(self, config: SegFormerConfig) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            MiTStage(config, i) for i in range(len(config.hidden_sizes))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H / 2^(i+2), W / 2^(i+2)) for the paper's strides
            features.append(x)
        return features


# ---------------------------------------------------------------- the decoder


class AllMLPDecoder(nn.Module):
    r"""The all-MLP decoder: every stage's map to a common width, upsampled to the
    first stage's size, concatenated, fused and classified.

    $\begin{gathered}
    \hat F_i = \operatorname{Up}\big(\operatorname{Linear}(C_i, C)(F_i)\big), \\
    F = \operatorname{Linear}(4C, C)\big([\hat F_4, \hat F_3, \hat F_2, \hat F_1]\big),
    \qquad M = \operatorname{Linear}(C, K)(F)
    \end{gathered}$

    Every "Linear" acts on each pixel's channels alone (the fusing one is a
    $1 \times 1$ convolution, followed by BatchNorm and ReLU); $\operatorname{Up}$ is
    bilinear. The logits $M$ are at $1/4$ of the image's size.
    """

    def __init__(self, config: SegFormerConfig) -> None:
        super().__init__()
        C = config.decoder_width
        self.linear_c = nn.ModuleList(nn.Linear(c, C) for c in config.hidden_sizes)
        n = len(config.hidden_sizes)
        self.linear_fuse = nn.Conv2d(n * C, C, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(C)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Conv2d(C, config.n_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]  # H / 4, W / 4
        upsampled = []
        for f, linear in zip(features, self.linear_c, strict=True):
            f = linear(f.movedim(1, -1)).movedim(-1, 1)  # (B, C, H_i, W_i)
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            upsampled.append(f)  # (B, C, H / 4, W / 4)
        fused = self.linear_fuse(torch.cat(upsampled[::-1], dim=1))  # coarsest first
        fused = F.relu(self.batch_norm(fused))  # (B, C, H / 4, W / 4)
        return self.classifier(self.dropout(fused))  # (B, K, H / 4, W / 4)


class SegFormer(nn.Module):
    """The Mix Transformer encoder and the all-MLP decoder: images ``(B, C_in, H, W)``
    to logits ``(B, K, H / 4, W / 4)`` (for the paper's strides)."""

    def __init__(self, config: SegFormerConfig) -> None:
        super().__init__()
        if not isinstance(config, SegFormerConfig):
            raise TypeError(
                f"config must be a SegFormerConfig, got {type(config).__name__}"
            )
        self.config = config
        self.encoder = MixTransformer(config)
        self.decode_head = AllMLPDecoder(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", ndim=4, floating=True)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must have {self.config.in_channels} channels on axis 1, "
                f"got shape {tuple(x.shape)}"
            )
        return self.decode_head(self.encoder(x))


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    r"""Cross-entropy at the masks' full resolution: the logits ``(B, K, h, w)`` are
    first upsampled bilinearly to the masks' ``(B, H, W)``, as Hugging Face's model
    does with ``labels``.

    $L = -\frac{1}{BHW}\sum_{b, p} \log \operatorname{softmax}\big(
    \operatorname{Up}(M)_{b, p}\big)_{y_{b, p}}$
    """
    check_tensor(logits, "logits", ndim=4, floating=True)
    check_tensor(masks, "masks", ndim=3, dtype=torch.long)
    if masks.shape[0] != logits.shape[0]:
        raise ValueError(
            "logits and masks must have the same batch size, got "
            f"{tuple(logits.shape)} and {tuple(masks.shape)}"
        )
    return _loss(logits, masks)


def _loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(logits, masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, masks)  # (B, K, H, W) against (B, H, W)


def coarse_truth(masks: torch.Tensor, n_classes: int, factor: int = 4) -> torch.Tensor:
    """The true masks ``(B, H, W)`` seen through a map ``factor`` times coarser: the
    one-hot masks averaged over ``factor`` x ``factor`` blocks, upsampled bilinearly
    like SegFormer's logits, and the largest class taken per pixel.

    What a decoder that knew every block's class shares exactly would predict at
    full size: a yardstick for what the coarse output costs (not a bound, since
    logits can be sharper than shares). ``H`` and ``W`` must divide by ``factor``.
    """
    check_tensor(masks, "masks", ndim=3, dtype=torch.long)
    check_positive_int(n_classes, "n_classes")
    check_positive_int(factor, "factor")
    if masks.shape[1] % factor or masks.shape[2] % factor:
        raise ValueError(
            f"the height and width of masks must divide by factor={factor}, "
            f"got shape {tuple(masks.shape)}"
        )
    one_hot = F.one_hot(masks, n_classes).movedim(-1, 1).double()  # (B, K, H, W)
    shares = F.avg_pool2d(one_hot, factor)  # (B, K, H / factor, W / factor)
    up = F.interpolate(shares, masks.shape[-2:], mode="bilinear", align_corners=False)
    return up.argmax(1)  # (B, H, W)


# ---------------------------------------------------------------- Hugging Face's names

#: Hugging Face's parameter names (``SegformerForSemanticSegmentation``, transformers
#: 5) to ours, as ``(pattern, replacement)`` regular expressions applied in order.
HF_RENAMES: list[tuple[str, str]] = [
    (r"^segformer\.stages\.", "encoder.stages."),
    (r"\.patch_embeddings\.layer_norm\.", ".patch_embed.norm."),
    (r"\.patch_embeddings\.", ".patch_embed."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attn.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attn.sr_norm."),
    (r"\.attention\.([qkvo])_proj\.", r".attn.W_\1."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"^(encoder\.stages\.\d+)\.layer_norm\.", r"\1.norm."),
    (r"^decode_head\.linear_projections\.(\d+)\.proj\.", r"decode_head.linear_c.\1."),
]


def segformer_from_hf_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A state dict of Hugging Face's ``SegformerForSemanticSegmentation`` with our
    names (:data:`HF_RENAMES`), ready for ``SegFormer.load_state_dict``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    renamed = {}
    for name, tensor in state_dict.items():
        new = name
        for pattern, replacement in HF_RENAMES:
            new = re.sub(pattern, replacement, new)
        renamed[new] = tensor
    return renamed
