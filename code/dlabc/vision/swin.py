r"""The Swin Transformer: self-attention inside non-overlapping local windows, windows
that shift by half a window from one block to the next, a learnt bias for every
relative position inside a window, and patch merging that halves the grid between
stages, so that the network builds a pyramid of feature maps as a CNN does; equal to
Hugging Face's ``SwinModel`` with the same weights.

Chapter: ``book/vision/swin.md``.

References:
- Liu et al. (2021), *Swin Transformer: Hierarchical Vision Transformer using Shifted
  Windows*, ICCV (everything here: windows, shifted windows and their mask, the
  relative position bias, patch merging, the Swin-T/S/B/L configurations, and the
  costs of global and window attention, their equations (1) and (2)).
- Dosovitskiy et al. (2021), *An Image is Worth 16x16 Words*, ICLR (the Vision
  Transformer, whose global attention Swin restricts to windows).
- Vaswani et al. (2017), *Attention Is All You Need*, NeurIPS (multi-head attention;
  :class:`WindowAttention` reuses the book's ``MultiHeadAttention`` projections).

Shapes: ``B`` batch, ``H, W`` the grid of tokens of a stage (one token per patch),
``C`` channels, ``M`` the side of a window, ``N = M * M`` tokens per window, ``nW``
windows per image, ``h`` heads. Token grids are ``(B, H, W, C)`` inside a block and
``(B, H * W, C)`` (row by row) between blocks. The parameter names keep the book's
attention names (``W_q`` ... ``W_o``) and otherwise the paper's code's; the renaming
table :data:`HF_RENAMES` maps Hugging Face's names onto them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.transformers.attention_from_scratch import merge_heads, split_heads
from dlabc.transformers.attention_with_pytorch import MultiHeadAttention

__all__ = [
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_mask",
    "WindowAttention",
    "MLP",
    "SwinBlock",
    "PatchMerging",
    "PatchEmbedding",
    "SwinStage",
    "SwinConfig",
    "CONFIGS",
    "SwinTransformer",
    "HF_RENAMES",
    "swin_from_hf_state_dict",
    "attention_cost",
    "multiply_adds",
]


# ---------------------------------------------------------------- windows


def _check_grid(x: object, window_size: int) -> None:
    """``x`` is a ``(B, H, W, C)`` grid whose sides are multiples of the window."""
    check_tensor(x, "x", ndim=4)
    check_positive_int(window_size, "window_size")
    if x.shape[1] % window_size or x.shape[2] % window_size:
        raise ValueError(
            f"the grid x {tuple(x.shape)} must have H and W divisible by "
            f"window_size={window_size} (pad it first)"
        )


def _check_windows(windows: object, window_size: int, H: int, W: int) -> None:
    """``windows`` ``(B * nW, M * M, C)``: the windows of whole ``H x W`` grids."""
    check_tensor(windows, "windows", ndim=3)
    check_positive_int(window_size, "window_size")
    check_positive_int(H, "H")
    check_positive_int(W, "W")
    M = window_size
    if H % M or W % M:
        raise ValueError(f"H={H} and W={W} must be divisible by window_size={M}")
    per_image = (H // M) * (W // M)
    if windows.shape[1] != M * M or windows.shape[0] % per_image:
        raise ValueError(
            f"windows {tuple(windows.shape)} must be (B * {per_image}, {M * M}, C) "
            f"for a {H} x {W} grid cut into windows of {M} x {M}"
        )


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a grid of tokens into non-overlapping ``M x M`` windows.

    ``x`` ``(B, H, W, C)`` -> ``(B * nW, M * M, C)``: the windows of the first image
    row by row, then those of the next image; inside a window, its tokens row by row.
    Every window becomes a short sequence for attention.
    """
    _check_grid(x, window_size)
    B, H, W, C = x.shape
    M = window_size
    x = x.view(B, H // M, M, W // M, M, C)  # (B, window row, row, window col, col, C)
    return x.transpose(2, 3).reshape(-1, M * M, C)  # (B * nW, N, C)


def window_reverse(
    windows: torch.Tensor, window_size: int, H: int, W: int
) -> torch.Tensor:
    """Put windows back into their grid, undoing :func:`window_partition`.

    ``windows`` ``(B * nW, M * M, C)`` -> ``(B, H, W, C)``.
    """
    _check_windows(windows, window_size, H, W)
    M = window_size
    C = windows.shape[-1]
    x = windows.view(-1, H // M, W // M, M, M, C)  # (B, window row, window col, ...)
    return x.transpose(2, 3).reshape(-1, H, W, C)  # (B, H, W, C)


def relative_position_index(window_size: int) -> torch.Tensor:
    r"""For every (query, key) pair of tokens of a window, the row of the bias table
    that holds their offset.

    Two tokens of an $M \times M$ window are between $-(M - 1)$ and $M - 1$ rows and
    columns apart, so there are $(2M - 1)^2$ offsets; offset $(\delta_r, \delta_c)$ is
    row $(\delta_r + M - 1)(2M - 1) + (\delta_c + M - 1)$ of the table.
    Returns ``(N, N)`` integers in ``0 .. (2M - 1)**2 - 1``.
    """
    M = window_size
    rows, cols = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (N,): where each token sits
    d_row = rows[:, None] - rows[None, :]  # (N, N): query's row minus key's row
    d_col = cols[:, None] - cols[None, :]
    return (d_row + M - 1) * (2 * M - 1) + (d_col + M - 1)  # (N, N)


def shifted_window_mask(H: int, W: int, window_size: int, shift: int) -> torch.Tensor:
    """Which tokens may attend to which inside each window of the rolled grid.

    After rolling the grid up and left by ``shift``, the last row of windows holds the
    image's bottom ``M - shift`` rows above its top ``shift`` rows, which were not
    neighbours; the same holds for the last column. Along each axis, three bands: the
    windows that did not wrap (0), the part of the last window that stayed (1), the
    part that wrapped around (2). Tokens attend only within their (row band, column
    band) region. Returns ``(nW, N, N)`` booleans, ``True`` = may attend.
    """
    M, s = window_size, shift
    r, c = torch.arange(H), torch.arange(W)
    band_r = (r >= H - M).long() + (r >= H - s).long()  # (H,): 0, 1 or 2
    band_c = (c >= W - M).long() + (c >= W - s).long()  # (W,)
    region = 3 * band_r[:, None] + band_c[None, :]  # (H, W): nine regions
    region = window_partition(region[None, :, :, None], M)[..., 0]  # (nW, N)
    return region[:, :, None] == region[:, None, :]  # (nW, N, N)


# ---------------------------------------------------------------- the block


class WindowAttention(MultiHeadAttention):
    r"""Multi-head self-attention inside each window, plus a learnt bias for each
    relative position (Liu et al., equation (4)):

    $\mathrm{Attention}(Q, K, V) = \mathrm{SoftMax}\big(QK^\top/\sqrt{d} + B\big)V .$

    $B$ (``(h, N, N)``, one matrix per head) is read from a table of $(2M - 1)^2$
    learnt values per head by :func:`relative_position_index`. The projections
    ``W_q`` ... ``W_o`` are the book's ``MultiHeadAttention``'s.
    """

    def __init__(self, d_model: int, n_heads: int, window_size: int) -> None:
        super().__init__(d_model, n_heads)
        check_positive_int(window_size, "window_size")
        self.window_size = window_size
        # zeros: no preference for any offset until one is learnt (Hugging Face's
        # initialisation; the paper's code draws from a normal of std 0.02)
        table = torch.zeros((2 * window_size - 1) ** 2, n_heads)
        self.relative_position_bias_table = nn.Parameter(table)
        index = relative_position_index(window_size)
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` ``(B * nW, N, C)``, the windows of :func:`window_partition`; ``mask``
        ``(nW, N, N)`` booleans or ``None`` -> ``(B * nW, N, C)``."""
        h, N = self.n_heads, x.shape[1]
        q = split_heads(self.W_q(x), h)  # (B * nW, h, N, d)
        k = split_heads(self.W_k(x), h)
        v = split_heads(self.W_v(x), h)
        bias = self.relative_position_bias_table[self.relative_position_index]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # (B * nW, h, N, N)
        scores = scores + bias.permute(2, 0, 1)  # + B: (h, N, N), from (N, N, h)
        if mask is not None:  # the same mask for the windows of every image
            scores = scores.view(-1, mask.shape[0], h, N, N)  # (B, nW, h, N, N)
            scores = scores.masked_fill(~mask[:, None], float("-inf")).view(-1, h, N, N)
        weights = F.softmax(scores, dim=-1)  # (B * nW, h, N, N)
        return self.W_o(merge_heads(weights @ v))  # (B * nW, N, C)


class MLP(nn.Module):
    """The two-layer MLP of a Transformer block with GELU, as in ViT:
    ``C -> mlp_ratio * C -> C``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    r"""A Swin Transformer block: (shifted) window attention and an MLP, each after a
    LayerNorm and inside a residual connection (Liu et al., equation (3)):

    $\begin{aligned}
    \hat z &= \text{(S)W-MSA}\big(\mathrm{LN}(z)\big) + z, \\
    z' &= \mathrm{MLP}\big(\mathrm{LN}(\hat z)\big) + \hat z .
    \end{aligned}$

    With ``shift_size`` $s > 0$ the grid is rolled up and left by $s$ before the
    windows are cut (and rolled back after), so the windows straddle the previous
    block's window borders; the mask of :func:`shifted_window_mask` keeps apart the
    tokens that the roll brought together from opposite edges. A grid whose sides are
    not multiples of $M$ is padded with zeros after the norm (as Hugging Face's and
    the paper's detection code do); where one window spans the grid's height or width,
    nothing is shifted, as in the paper's code and Hugging Face's. (The paper's code
    also shrinks the window, and its bias table, to a grid smaller than it; this block
    pads the grid to one window instead and keeps the table.)
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        window_size: int,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_number(shift_size, "shift_size", low=0, high=window_size - 1)
        check_number(mlp_ratio, "mlp_ratio", low=0, low_open=True)
        self.window_size, self.shift_size = window_size, int(shift_size)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, n_heads, window_size)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(mlp_ratio * dim))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``x`` ``(B, H * W, C)`` -> ``(B, H * W, C)``."""
        M, s = self.window_size, self.shift_size
        if min(H, W) <= M:
            s = 0  # one window spans a side of the grid: the paper does not shift
        B, _, C = x.shape
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        Hp, Wp = -(-H // M) * M, -(-W // M) * M  # whole windows
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, C), zeros
        mask = None
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))  # the cyclic shift
            mask = shifted_window_mask(Hp, Wp, M, s).to(x.device)
        windows = self.attn(window_partition(x, M), mask)  # (B * nW, N, C)
        x = window_reverse(windows, M, Hp, Wp)  # (B, Hp, Wp, C)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))  # and back
        x = shortcut + x[:, :H, :W].reshape(B, H * W, C)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------- the hierarchy


class PatchMerging(nn.Module):
    r"""Halve the grid and double the channels: concatenate the features of each
    $2 \times 2$ group of neighbours ($4C$), normalise, and project linearly to $2C$.

    ``x`` ``(B, H * W, C)`` -> ``(B, \lceil H/2 \rceil \lceil W/2 \rceil, 2C)``; an
    odd side is padded with a row or column of zeros.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, _, C = x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))  # even sides
        # the four neighbours, in the order of the paper's code (the reduction's
        # weights depend on it): top-left, bottom-left, top-right, bottom-right
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
            dim=-1,
        )  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x.flatten(1, 2)))  # (B, H/2 * W/2, 2C)


class PatchEmbedding(nn.Module):
    """Split the image into ``P x P`` patches and project each linearly to ``C``
    channels (a convolution with stride ``P``), then LayerNorm.

    ``images`` ``(B, channels, H_px, W_px)`` -> tokens ``(B, H * W, C)`` and the grid
    ``(H, W)``; sides that are not multiples of ``P`` are padded with zeros.
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        P = self.patch_size
        pad_h, pad_w = -images.shape[2] % P, -images.shape[3] % P
        x = self.proj(F.pad(images, (0, pad_w, 0, pad_h)))  # (B, C, H, W)
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W  # (B, H * W, C)


class SwinStage(nn.Module):
    """``depth`` Swin blocks at one resolution, the odd ones shifted by ``M // 2``,
    then (except in the last stage) a patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        n_heads: int,
        window_size: int,
        downsample: bool,
        mlp_ratio: float = 4.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_positive_int(depth, "depth")
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim, n_heads, window_size, (i % 2) * (window_size // 2), mlp_ratio, eps
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, int, int]:
        for block in self.blocks:
            x = block(x, H, W)  # W-MSA, SW-MSA, W-MSA, ...
        if self.downsample is None:
            return x, H, W
        return self.downsample(x, H, W), -(-H // 2), -(-W // 2)


@dataclass(frozen=True)
class SwinConfig:
    """A Swin Transformer, with Hugging Face's ``SwinConfig`` names in comments."""

    embed_dim: int = 96  # embed_dim, C
    depths: tuple[int, ...] = (2, 2, 6, 2)  # depths
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # num_heads
    window_size: int = 7  # window_size, M
    patch_size: int = 4  # patch_size
    in_channels: int = 3  # num_channels
    mlp_ratio: float = 4.0  # mlp_ratio
    n_classes: int = 1000  # num_labels; 0: no classifier, the pooled features
    eps: float = 1e-5  # layer_norm_eps

    def __post_init__(self) -> None:
        for name in ("embed_dim", "window_size", "patch_size", "in_channels"):
            check_positive_int(getattr(self, name), name)
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int):
            raise TypeError(f"n_classes must be an int, got {self.n_classes!r}")
        if self.n_classes < 0:
            raise ValueError(f"n_classes must be >= 0, got {self.n_classes}")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(
                f"depths {self.depths} and num_heads {self.num_heads} must be "
                "non-empty and of the same length (one entry per stage)"
            )
        for i, (depth, heads) in enumerate(
            zip(self.depths, self.num_heads, strict=True)
        ):
            check_positive_int(depth, f"depths[{i}]")
            check_positive_int(heads, f"num_heads[{i}]")
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(
                    f"stage {i} has {self.embed_dim * 2**i} channels, not divisible "
                    f"by num_heads[{i}]={heads}"
                )
        check_number(self.mlp_ratio, "mlp_ratio", low=0, low_open=True)
        check_number(self.eps, "eps", low=0, low_open=True)

    @property
    def num_features(self) -> int:
        """The channels of the last stage, ``C * 2 ** (stages - 1)``."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)


#: The four ImageNet models of Liu et al. (2021), Table 1: Swin-T, S, B and L
#: (224 x 224 images, patches of 4 x 4, windows of 7 x 7).
CONFIGS: dict[str, SwinConfig] = {
    "swin-t": SwinConfig(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin-s": SwinConfig(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin-b": SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin-l": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


class SwinTransformer(nn.Module):
    """The Swin Transformer: patch embedding, stages of Swin blocks joined by patch
    merging (the grid halves and the channels double from stage to stage), a final
    LayerNorm, the average over the tokens, and a linear classifier (none when
    ``n_classes == 0``: :meth:`forward` then returns the pooled features).

    ``images`` ``(B, in_channels, H_px, W_px)`` of any size -> logits ``(B,
    n_classes)``; :meth:`features` returns the final tokens ``(B, H * W, C_last)``
    too, as Hugging Face's ``last_hidden_state``.
    """

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        if not isinstance(config, SwinConfig):
            raise TypeError(f"config must be a SwinConfig, got {type(config).__name__}")
        self.config = c = config
        self.patch_embed = PatchEmbedding(c.patch_size, c.in_channels, c.embed_dim)
        self.stages = nn.ModuleList(
            SwinStage(
                c.embed_dim * 2**i,
                depth,
                heads,
                c.window_size,
                downsample=i < len(c.depths) - 1,
                mlp_ratio=c.mlp_ratio,
                eps=c.eps,
            )
            for i, (depth, heads) in enumerate(zip(c.depths, c.num_heads, strict=True))
        )
        self.norm = nn.LayerNorm(c.num_features, eps=c.eps)
        self.head = nn.Linear(c.num_features, c.n_classes) if c.n_classes else None

    def _check(self, images: object) -> None:
        check_tensor(images, "images", ndim=4, floating=True)
        if images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"images must be (B, {self.config.in_channels}, H, W), "
                f"got shape {tuple(images.shape)}"
            )

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final tokens ``(B, H * W, C_last)`` (after the norm) and their average
        ``(B, C_last)``."""
        self._check(images)
        return self._features(images)

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, H, W = self.patch_embed(images)  # (B, H * W, C)
        for stage in self.stages:
            x, H, W = stage(x, H, W)  # the grid halves, the channels double
        x = self.norm(x)  # (B, H * W, C_last)
        return x, x.mean(dim=1)  # the tokens, and their average

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        pooled = self._features(images)[1]  # (B, C_last)
        return pooled if self.head is None else self.head(pooled)  # (B, n_classes)


# ---------------------------------------------------------------- Hugging Face names

#: Hugging Face's ``SwinModel`` / ``SwinForImageClassification`` names -> ours, as
#: (regular expression, replacement) pairs applied in order.
HF_RENAMES: list[tuple[str, str]] = [
    (r"^swin\.", ""),  # SwinForImageClassification's backbone
    (r"^classifier\.", "head."),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^encoder\.layers\.", "stages."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.([qkvo])_proj\.", r".attn.W_\1."),
    (
        r"\.attention\.relative_position_bias\.relative_position_bias_table$",
        ".attn.relative_position_bias_table",
    ),
    (r"^layernorm\.", "norm."),
]


def swin_from_hf_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A Hugging Face ``SwinModel`` or ``SwinForImageClassification`` state dict
    under :class:`SwinTransformer`'s names (:data:`HF_RENAMES`); the relative position
    indices, which both compute from the window size, are dropped."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    renamed = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue
        for pattern, replacement in HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


# ---------------------------------------------------------------- cost


def attention_cost(tokens: int, dim: int, window_size: int | None = None) -> int:
    r"""The multiply-adds of one multi-head self-attention over ``tokens`` $= hw$
    tokens of ``dim`` $= C$ channels (Liu et al., equations (1) and (2)):

    $\begin{aligned}
    \Omega(\text{MSA}) &= 4hwC^2 + 2(hw)^2C, \\
    \Omega(\text{W-MSA}) &= 4hwC^2 + 2M^2hwC .
    \end{aligned}$

    $4hwC^2$ are the four projections; the second term the products $QK^\top$ and
    (weights)$V$, over the whole image or inside windows of $M^2$ tokens
    (``window_size=None``: global attention).
    """
    check_positive_int(tokens, "tokens")
    check_positive_int(dim, "dim")
    partners = tokens if window_size is None else window_size**2  # keys per query
    return 4 * tokens * dim**2 + 2 * partners * tokens * dim


def multiply_adds(fn: Callable[[], object]) -> int:
    """The multiply-adds of the matrix products and convolutions that ``fn()`` runs,
    counted by PyTorch's ``FlopCounterMode`` (which counts two FLOPs per
    multiply-add). Run it on the ``meta`` device to count without computing."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2
