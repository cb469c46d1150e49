r"""The Vision Transformer: an image cut into patches, each patch a token, a standard
Transformer encoder over the tokens, and a class token whose final state is classified.
Equal to Hugging Face's ``ViTModel`` / ``ViTForImageClassification`` with the same
weights.

Chapter: ``book/vision/vit.md``.

References:
- Dosovitskiy et al. (2021), *An Image is Worth 16x16 Words: Transformers for Image
  Recognition at Scale*, ICLR (eqs. 1-4: patch embedding, class token, learned 1-D
  position embeddings, pre-LN blocks with a GELU MLP; Table 1: ViT-Base, -Large, -Huge).
- Touvron et al. (2021), *Training Data-Efficient Image Transformers & Distillation
  through Attention*, ICML (DeiT: the Tiny and Small sizes).
- Vaswani et al. (2017), *Attention Is All You Need* (the encoder and its multi-head
  attention, :class:`dlabc.transformers.attention_with_pytorch.MultiHeadAttention`).
- Hendrycks & Gimpel (2016), *Gaussian Error Linear Units (GELUs)*.

Shapes: ``B`` batch, ``C`` channels, ``H x W`` pixels, ``P`` the patch side, ``N = HW /
P^2`` patches, ``d`` the width (``d_model``). The parameter names are chosen so that
:data:`HF_RENAMES`, a short table of substitutions, maps a Hugging Face state dict onto
:class:`ViT` (:func:`from_hf_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_positive_int, check_tensor
from dlabc.transformers.attention_with_pytorch import MultiHeadAttention

__all__ = [
    "ViTConfig",
    "CONFIGS",
    "patchify",
    "PatchEmbedding",
    "MLP",
    "Block",
    "ViT",
    "vit_parameter_count",
    "HF_RENAMES",
    "from_hf_state_dict",
    "position_similarity",
]


@dataclass(frozen=True)
class ViTConfig:
    """The sizes of a Vision Transformer, with Hugging Face's ``ViTConfig`` names in
    the comments. ``n_classes=0`` builds the model without a classifier."""

    image_size: int = 224  # image_size (square images)
    patch_size: int = 16  # patch_size
    in_channels: int = 3  # num_channels
    d_model: int = 768  # hidden_size
    n_layers: int = 12  # num_hidden_layers
    n_heads: int = 12  # num_attention_heads
    d_mlp: int = 3072  # intermediate_size
    n_classes: int = 1000  # num_labels
    eps: float = 1e-12  # layer_norm_eps

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "patch_size",
            "in_channels",
            "d_model",
            "n_layers",
            "n_heads",
            "d_mlp",
        ):
            check_positive_int(getattr(self, name), name)
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int):
            raise TypeError(f"n_classes must be an int, got {self.n_classes!r}")
        if self.n_classes < 0:
            raise ValueError(f"n_classes must be non-negative, got {self.n_classes}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} must divide image_size={self.image_size}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if not (isinstance(self.eps, float) and self.eps > 0):
            raise ValueError(f"eps must be a positive float, got {self.eps!r}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


#: The published sizes, all at 224 x 224 with 16 x 16 patches and a 1000-class head:
#: Base, Large and Huge from Dosovitskiy et al. (2021, Table 1; the paper's Huge uses
#: 14 x 14 patches), Tiny and Small from DeiT (Touvron et al., 2021).
CONFIGS: dict[str, ViTConfig] = {
    "ViT-Ti/16": ViTConfig(d_model=192, n_layers=12, n_heads=3, d_mlp=768),
    "ViT-S/16": ViTConfig(d_model=384, n_layers=12, n_heads=6, d_mlp=1536),
    "ViT-B/16": ViTConfig(d_model=768, n_layers=12, n_heads=12, d_mlp=3072),
    "ViT-L/16": ViTConfig(d_model=1024, n_layers=24, n_heads=16, d_mlp=4096),
    "ViT-H/16": ViTConfig(d_model=1280, n_layers=32, n_heads=16, d_mlp=5120),
}


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    r"""Cut images into non-overlapping $P \times P$ patches and flatten each one:
    ``(B, C, H, W)`` -> ``(B, N, C P^2)``, patches in reading order (row by row), the
    values of a patch in the order ``(C, P, P)``. :func:`_patchify` after checks."""
    check_tensor(images, "images", ndim=4)
    check_positive_int(patch_size, "patch_size")
    if images.shape[2] % patch_size or images.shape[3] % patch_size:
        raise ValueError(
            f"patch_size={patch_size} must divide the image size "
            f"{images.shape[2]} x {images.shape[3]}"
        )
    return _patchify(images, patch_size)


def _patchify(images: torch.Tensor, P: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, C P^2)``: the patches, row by row, flattened."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // P, P, W // P, P)  # (B, C, rows, P, cols, P)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, P, P)
    return x.reshape(B, (H // P) * (W // P), C * P * P)  # (B, N, C P^2)


class PatchEmbedding(nn.Module):
    r"""Eq. 1's $x_p^i E$ for every patch: one linear map of each flattened patch.

    A convolution with a $P \times P$ kernel and stride $P$ computes exactly that: its
    windows are the patches, which do not overlap, and its weight ``(d, C, P, P)`` is
    $E^\top$ reshaped. ``(B, C, H, W)`` -> ``(B, N, d)``.
    """

    def __init__(self, in_channels: int, d_model: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(
            in_channels, d_model, kernel_size=patch_size, stride=patch_size
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.projection(images)  # (B, d, H / P, W / P)
        return x.flatten(2).transpose(1, 2)  # (B, N, d), row by row


class MLP(nn.Module):
    r"""The block's feed-forward part, $\mathrm{fc}_2(\mathrm{GELU}(\mathrm{fc}_1 x))$,
    $d \to d_\text{mlp} \to d$, with the exact (erf) GELU."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    r"""A pre-LN encoder block (eqs. 2 and 3):

    $\begin{aligned}
    z' &= z + \mathrm{MSA}(\mathrm{LN}(z)), \\
    z'' &= z' + \mathrm{MLP}(\mathrm{LN}(z')).
    \end{aligned}$

    ``forward`` returns the new tokens ``(B, T, d)`` and the attention weights
    ``(B, heads, T, T)``.
    """

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, d_mlp)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attn(self.norm1(z))  # (B, T, d), (B, h, T, T)
        z = z + attended  # eq. 2
        z = z + self.mlp(self.norm2(z))  # eq. 3
        return z, weights


class ViT(nn.Module):
    r"""The Vision Transformer. ``model(images)`` gives the logits ``(B, n_classes)``
    (the final class token's features ``(B, d)`` when ``n_classes=0``);
    :meth:`features` gives every token's final features ``(B, 1 + N, d)`` and the
    attention weights of every layer, a list of ``(B, heads, 1 + N, 1 + N)``.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig, got {type(config).__name__}")
        self.config = c = config
        self.patch_embedding = PatchEmbedding(c.in_channels, c.d_model, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + c.n_patches, c.d_model))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.d_mlp, c.eps) for _ in range(c.n_layers)
        )
        self.norm = nn.LayerNorm(c.d_model, eps=c.eps)
        self.head = nn.Linear(c.d_model, c.n_classes) if c.n_classes else nn.Identity()

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every token's final features ``(B, 1 + N, d)``, the class token first, and
        the attention weights of every layer."""
        c = self.config
        check_tensor(images, "images", ndim=4, floating=True)
        expected = (c.in_channels, c.image_size, c.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be (B, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}"
            )
        return self._features(images)

    def _features(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embedding(images)  # (B, N, d)
        cls = self.cls_token.expand(len(x), -1, -1)  # (B, 1, d)
        z = torch.cat([cls, x], dim=1) + self.pos_embedding  # eq. 1: (B, 1 + N, d)
        attentions = []
        for block in self.blocks:  # eqs. 2 and 3, n_layers times
            z, weights = block(z)
            attentions.append(weights)
        return self.norm(z), attentions  # eq. 4's LN, for every token

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.features(images)  # (B, 1 + N, d)
        return self.head(tokens[:, 0])  # eq. 4: classify the class token


def vit_parameter_count(config: ViTConfig) -> int:
    r"""The parameters of :class:`ViT`, counted by hand.

    Patch embedding $(C P^2 + 1) d$; class token and position embeddings $(N + 2) d$;
    per block two LayerNorms ($4d$), attention ($4d^2 + 4d$) and the MLP
    ($2 d\, d_\text{mlp} + d_\text{mlp} + d$); the final LayerNorm $2d$; the head
    $(d + 1) K$.
    """
    if not isinstance(config, ViTConfig):
        raise TypeError(f"config must be a ViTConfig, got {type(config).__name__}")
    c, d = config, config.d_model
    embedding = (c.in_channels * c.patch_size**2 + 1) * d + (c.n_patches + 2) * d
    block = 4 * d + (4 * d * d + 4 * d) + (2 * d * c.d_mlp + c.d_mlp + d)
    return embedding + c.n_layers * block + 2 * d + (d + 1) * c.n_classes


#: Hugging Face's names (``ViTModel``, ``ViTForImageClassification`` in transformers
#: 5, which converts the hub's older checkpoints as it loads them) -> ours, applied
#: in order as substring substitutions after the ``vit.`` prefix is removed.
HF_RENAMES: tuple[tuple[str, str], ...] = (
    ("embeddings.patch_embeddings.", "patch_embedding."),
    ("embeddings.position_embeddings", "pos_embedding"),
    ("embeddings.cls_token", "cls_token"),
    ("layers.", "blocks."),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("attention.q_proj", "attn.W_q"),
    ("attention.k_proj", "attn.W_k"),
    ("attention.v_proj", "attn.W_v"),
    ("attention.o_proj", "attn.W_o"),
    ("layernorm.", "norm."),
    ("classifier.", "head."),
)


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A Hugging Face ViT state dict under :class:`ViT`'s names (:data:`HF_RENAMES`).

    ``ViTModel``'s pooler (a dense layer and tanh on the class token, used only by
    its pre-training head) has no counterpart here and is dropped; ``mask_token``
    (masked image modelling) likewise.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping, got {type(state_dict).__name__}"
        )
    renamed = {}
    for key, value in state_dict.items():
        key = key.removeprefix("vit.")
        if key.startswith("pooler.") or key == "embeddings.mask_token":
            continue
        for old, new in HF_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def position_similarity(pos_embedding: torch.Tensor) -> torch.Tensor:
    r"""The cosine similarity of every patch's position embedding with every other's,
    as a grid of grids: ``(1 + N, d)`` or ``(1, 1 + N, d)`` (the class token's row
    first, left out) -> ``(g, g, g, g)`` with $g = \sqrt N$; entry ``[i, j]`` is the
    map of patch ``(i, j)``'s similarity to every position (the paper's Fig. 7)."""
    check_tensor(pos_embedding, "pos_embedding", ndim=(2, 3), floating=True)
    if pos_embedding.ndim == 3 and len(pos_embedding) != 1:
        raise ValueError(
            "pos_embedding must be (1 + N, d) or (1, 1 + N, d), "
            f"got {tuple(pos_embedding.shape)}"
        )
    p = pos_embedding.detach().reshape(-1, pos_embedding.shape[-1])[1:]  # (N, d)
    g = round(len(p) ** 0.5)
    if g * g != len(p):
        raise ValueError(
            f"pos_embedding must hold 1 + a square number of rows, got {len(p) + 1}"
        )
    p = F.normalize(p, dim=-1)
    return (p @ p.T).reshape(g, g, g, g)  # (row, col) of one patch, then of the other
