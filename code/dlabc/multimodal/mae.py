r"""Masked autoencoders: hide most of an image's patches, encode the few that remain
with a Vision Transformer, and train a light decoder to paint the hidden ones back.
Equal to Hugging Face's ``ViTMAEForPreTraining`` with the same weights and the same
masking noise.

Chapter: ``book/multimodal/mae.md``.

References:
- He et al. (2022), *Masked Autoencoders Are Scalable Vision Learners*, CVPR
  (section 3: random masking of 75 % of the patches, an encoder that sees only the
  visible patches, mask tokens and a light decoder, the mean squared error on the
  masked patches only, optionally of per-patch normalised pixels; fixed 2-D sin-cos
  position embeddings, as in their code).
- Dosovitskiy et al. (2021), *An Image is Worth 16x16 Words* (the encoder: the book's
  :class:`dlabc.vision.vit.ViT`, whose patch embedding, blocks and final norm are
  reused here as they are).
- Vaswani et al. (2017), *Attention Is All You Need* (the sinusoids).

Shapes: ``B`` batch, ``C`` channels, ``P`` the patch side, ``N`` patches, ``K`` the
patches kept visible, ``d`` the encoder's width, ``d'`` the decoder's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.train import History, endless_minibatches, train_steps
from dlabc.vision.vit import Block, ViT, ViTConfig, _patchify, from_hf_state_dict

__all__ = [
    "MAEConfig",
    "MAEOutput",
    "sincos_position_embedding",
    "random_masking",
    "MAE",
    "unpatchify",
    "mae_from_hf_state_dict",
    "train_mae",
]


@dataclass(frozen=True)
class MAEConfig:
    """The sizes of a masked autoencoder, with Hugging Face's ``ViTMAEConfig`` names in
    the comments (the defaults are theirs: a ViT-Base encoder and the paper's decoder of
    8 blocks of width 512)."""

    image_size: int = 224  # image_size
    patch_size: int = 16  # patch_size
    in_channels: int = 3  # num_channels
    d_model: int = 768  # hidden_size
    n_layers: int = 12  # num_hidden_layers
    n_heads: int = 12  # num_attention_heads
    d_mlp: int = 3072  # intermediate_size
    decoder_d_model: int = 512  # decoder_hidden_size
    decoder_n_layers: int = 8  # decoder_num_hidden_layers
    decoder_n_heads: int = 16  # decoder_num_attention_heads
    decoder_d_mlp: int = 2048  # decoder_intermediate_size
    mask_ratio: float = 0.75  # mask_ratio
    norm_pix_loss: bool = False  # norm_pix_loss
    eps: float = 1e-12  # layer_norm_eps

    def __post_init__(self) -> None:
        for name in ("decoder_d_model", "decoder_n_layers", "decoder_n_heads"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.decoder_d_mlp, "decoder_d_mlp")
        for name in ("d_model", "decoder_d_model"):
            if getattr(self, name) % 4:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be divisible by 4 "
                    "(the 2-D sin-cos position embedding has four parts)"
                )
        if self.decoder_d_model % self.decoder_n_heads:
            raise ValueError(
                f"decoder_d_model={self.decoder_d_model} is not divisible by "
                f"decoder_n_heads={self.decoder_n_heads}"
            )
        check_number(self.mask_ratio, "mask_ratio", low=0, high=1, high_open=True)
        if not isinstance(self.norm_pix_loss, bool):
            raise TypeError(f"norm_pix_loss must be a bool, got {self.norm_pix_loss!r}")
        _ = self.encoder  # the ViT's own checks: sizes, divisibility, eps

    @property
    def encoder(self) -> ViTConfig:
        """The encoder: a :class:`ViTConfig` without a classifier."""
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_mlp=self.d_mlp,
            n_classes=0,
            eps=self.eps,
        )

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_keep(self) -> int:
        """How many patches stay visible: ``int(N (1 - mask_ratio))``, as HF rounds."""
        return int(self.n_patches * (1 - self.mask_ratio))


class MAEOutput(NamedTuple):
    """What :class:`MAE` returns: the loss, the predicted pixels of every patch
    ``(B, N, P^2 C)``, the mask ``(B, N)`` (1 = hidden) and ``ids_restore``
    ``(B, N)``."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def sincos_position_embedding(grid_size: int, dim: int) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding of a ``grid_size x grid_size`` patch
    grid, ``(1 + N, dim)``, with a zero row first for the class token.
    :func:`_sincos_position_embedding` after checks."""
    check_positive_int(grid_size, "grid_size")
    check_positive_int(dim, "dim")
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    return _sincos_position_embedding(grid_size, dim)


def _sincos_position_embedding(grid_size: int, dim: int) -> torch.Tensor:
    r"""Eq. (eq-mae-sincos): a quarter of the features are $\sin(x\,\omega_k)$, a
    quarter $\cos(x\,\omega_k)$ for the patch's column $x$, the other half the same for
    its row $y$, with $\omega_k = 10000^{-k / (d/4)}$, $k = 0, \dots, d/4 - 1$."""
    k = torch.arange(dim // 4, dtype=torch.float64)
    omega = 10000.0 ** (-k / (dim // 4))  # (d/4,) the frequencies
    y, x = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64),
        torch.arange(grid_size, dtype=torch.float64),
        indexing="ij",
    )  # (g, g) each: the row and column of every patch
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega  # (N, d/4)
    patches = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (N, d)
    cls = torch.zeros(1, dim, dtype=torch.float64)  # the class token has no place
    return torch.cat([cls, patches]).float()  # (1 + N, d)


def random_masking(
    x: torch.Tensor, n_keep: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ``n_keep`` random tokens of each sequence ``x`` ``(B, N, d)``: returns the
    kept tokens ``(B, n_keep, d)``, the mask ``(B, N)`` (1 = hidden, in the original
    order) and ``ids_restore`` ``(B, N)``. ``noise`` ``(B, N)`` decides which (uniform
    random when ``None``). :func:`_random_masking` after checks."""
    check_tensor(x, "x", ndim=3, floating=True)
    check_positive_int(n_keep, "n_keep")
    if n_keep > x.shape[1]:
        raise ValueError(f"n_keep={n_keep} exceeds the {x.shape[1]} tokens of x")
    noise = _check_noise(noise, x)
    return _random_masking(x, n_keep, noise)


def _check_noise(noise: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if noise is None:
        return torch.rand(x.shape[:2], device=x.device)
    check_tensor(noise, "noise", ndim=2, floating=True)
    if noise.shape != x.shape[:2]:
        raise ValueError(
            f"noise must be (B, N) = {tuple(x.shape[:2])}, got {tuple(noise.shape)}"
        )
    return noise


def _random_masking(
    x: torch.Tensor, n_keep: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample shuffling: sort each row's noise; the ``n_keep`` tokens with the
    smallest noise stay visible. ``ids_restore`` is the inverse permutation, which
    puts a shuffled sequence back in the patches' order."""
    ids_shuffle = noise.argsort(dim=1)  # (B, N): a random permutation per sample
    ids_restore = ids_shuffle.argsort(dim=1)  # (B, N): its inverse
    ids_keep = ids_shuffle[:, :n_keep]  # (B, K)
    index = ids_keep[:, :, None].expand(-1, -1, x.shape[2])  # (B, K, d)
    visible = x.gather(1, index)  # (B, K, d)
    mask = torch.ones_like(noise)  # 1 = hidden, in shuffled order ...
    mask[:, :n_keep] = 0
    mask = mask.gather(1, ids_restore)  # ... (B, N) back in the patches' order
    return visible, mask, ids_restore


def _pixel_targets(images: torch.Tensor, P: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, P^2 C)``, each patch's values in the order
    ``(P, P, C)`` (MAE's and HF's; the ViT chapter's :func:`patchify` uses ``(C, P,
    P)``, the same for one channel)."""
    x = _patchify(images, P)  # (B, N, C P^2), values (C, P, P)
    B, N, _ = x.shape
    x = x.reshape(B, N, images.shape[1], P * P).transpose(2, 3)  # (B, N, P^2, C)
    return x.reshape(B, N, -1)  # (B, N, P^2 C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """The inverse of MAE's patch order: ``(B, N, P^2 C)`` -> ``(B, C, H, W)``, for
    square images, to draw predicted pixels."""
    check_tensor(patches, "patches", ndim=3)
    check_positive_int(patch_size, "patch_size")
    check_positive_int(channels, "channels")
    B, N, D = patches.shape
    g = math.isqrt(N)
    if g * g != N or D != patch_size**2 * channels:
        raise ValueError(
            f"patches must be (B, g^2, {patch_size**2 * channels}) for patch_size="
            f"{patch_size} and channels={channels}, got {tuple(patches.shape)}"
        )
    P, C = patch_size, channels
    x = patches.reshape(B, g, g, P, P, C)  # (B, rows, cols, P, P, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, rows, P, cols, P)
    return x.reshape(B, C, g * P, g * P)


class MAE(nn.Module):
    r"""The masked autoencoder. ``model(images, noise=None)`` returns an
    :class:`MAEOutput`; ``model.encoder`` is a :class:`~dlabc.vision.vit.ViT` (no
    classifier) whose :meth:`~dlabc.vision.vit.ViT.features` embeds whole images after
    pre-training. Its position embeddings are the fixed sin-cos ones, not learned.
    """

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        if not isinstance(config, MAEConfig):
            raise TypeError(f"config must be a MAEConfig, got {type(config).__name__}")
        self.config = c = config
        g, d, dd = c.image_size // c.patch_size, c.d_model, c.decoder_d_model
        self.encoder = ViT(c.encoder)  # patch embedding, class token, blocks, norm
        self.encoder.pos_embedding.requires_grad_(False)
        with torch.no_grad():
            self.encoder.pos_embedding.copy_(_sincos_position_embedding(g, d)[None])
            # the patch embedding is initialised as a linear layer (MAE's code)
            nn.init.xavier_uniform_(
                self.encoder.patch_embedding.projection.weight.view(d, -1)
            )
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_pos_embed = nn.Parameter(
            _sincos_position_embedding(g, dd)[None], requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(dd, c.decoder_n_heads, c.decoder_d_mlp, c.eps)
            for _ in range(c.decoder_n_layers)
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=c.eps)
        self.decoder_pred = nn.Linear(dd, c.patch_size**2 * c.in_channels)

    def forward(
        self, images: torch.Tensor, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        c = self.config
        check_tensor(images, "images", ndim=4, floating=True)
        expected = (c.in_channels, c.image_size, c.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be (B, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}"
            )
        noise = _check_noise(noise, images.new_empty(len(images), c.n_patches, 0))
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(images, pred, mask)
        return MAEOutput(loss, pred, mask, ids_restore)

    def forward_encoder(
        self, images: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed every patch, keep a random ``1 - mask_ratio`` of them, and run the
        ViT's blocks on those (and the class token) only."""
        vit, pos = self.encoder, self.encoder.pos_embedding  # pos: (1, 1 + N, d)
        x = vit.patch_embedding(images) + pos[:, 1:]  # (B, N, d), with their places
        x, mask, ids_restore = _random_masking(
            x, self.config.n_keep, noise
        )  # (B, K, d)
        cls = (vit.cls_token + pos[:, :1]).expand(len(x), -1, -1)  # (B, 1, d)
        z = torch.cat([cls, x], dim=1)  # (B, 1 + K, d)
        for block in vit.blocks:
            z, _ = block(z)
        return vit.norm(z), mask, ids_restore  # (B, 1 + K, d)

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor
    ) -> torch.Tensor:
        """Fill the hidden places with the shared mask token, unshuffle, add the
        positions, and predict every patch's pixels ``(B, N, P^2 C)``."""
        z = self.decoder_embed(latent)  # (B, 1 + K, d')
        B, N = ids_restore.shape
        masked = self.mask_token.expand(B, N - z.shape[1] + 1, -1)  # (B, N - K, d')
        z_ = torch.cat([z[:, 1:], masked], dim=1)  # (B, N, d'), in shuffled order
        index = ids_restore[:, :, None].expand(-1, -1, z.shape[2])
        z_ = z_.gather(1, index)  # (B, N, d'): unshuffled, every patch in its place
        z = torch.cat([z[:, :1], z_], dim=1) + self.decoder_pos_embed  # (B, 1 + N, d')
        for block in self.decoder_blocks:
            z, _ = block(z)
        return self.decoder_pred(self.decoder_norm(z))[:, 1:]  # (B, N, P^2 C)

    def forward_loss(
        self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Eq. (eq-mae-loss): the mean squared error per patch, averaged over the
        hidden patches only; with ``norm_pix_loss`` the target is each patch's pixels
        standardised by the patch's own mean and variance."""
        target = _pixel_targets(images, self.config.patch_size)  # (B, N, P^2 C)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's code
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).square().mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum()  # the hidden patches only


def mae_from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A Hugging Face ``ViTMAEForPreTraining`` state dict under :class:`MAE`'s names:
    the encoder's (``vit.*``) through the ViT chapter's
    :func:`~dlabc.vision.vit.from_hf_state_dict` under ``encoder.``, the decoder's
    (``decoder.*``) through the same renaming table."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping, got {type(state_dict).__name__}"
        )
    encoder = {k: v for k, v in state_dict.items() if k.startswith("vit.")}
    decoder = {
        k.removeprefix("decoder."): v
        for k, v in state_dict.items()
        if k.startswith("decoder.")
    }
    other = set(state_dict) - set(encoder) - {"decoder." + k for k in decoder}
    if other:
        raise ValueError(f"unexpected keys in state_dict: {sorted(other)[:5]}")
    renamed = {"encoder." + k: v for k, v in from_hf_state_dict(encoder).items()}
    renamed.update(from_hf_state_dict(decoder))  # decoder_layers -> decoder_blocks...
    return renamed


def train_mae(
    images: torch.Tensor,
    config: MAEConfig,
    steps: int,
    *,
    batch_size: int = 128,
    lr: float = 2e-3,
    warmup: int = 50,
    seed: int = 0,
) -> tuple[MAE, History]:
    """Pre-train an :class:`MAE` on ``images`` ``(n, C, H, W)`` (on their device) with
    AdamW (betas 0.9 and 0.95, weight decay 0.05, as the paper), a linear warm-up over
    ``warmup`` steps and a cosine decay; the masks are drawn afresh every step."""
    check_tensor(images, "images", ndim=4, floating=True)
    if not isinstance(config, MAEConfig):
        raise TypeError(f"config must be a MAEConfig, got {type(config).__name__}")
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    check_positive_int(warmup, "warmup")
    torch.manual_seed(seed)
    model = MAE(config).to(images.device)
    model(images[:1])  # the shapes are checked once, here, not on every step
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def schedule(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return (
            lr
            * 0.5
            * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        )

    def loss_fn(model: MAE, index: torch.Tensor) -> torch.Tensor:
        x = images[index]
        noise = torch.rand(len(x), config.n_patches, device=x.device)
        latent, mask, ids_restore = model.forward_encoder(x, noise)
        return model.forward_loss(x, model.forward_decoder(latent, ids_restore), mask)

    generator = torch.Generator().manual_seed(seed)
    history = train_steps(
        model,
        optimizer,
        (
            i.to(images.device)
            for i in endless_minibatches(len(images), batch_size, generator)
        ),
        loss_fn,
        steps=steps,
        lr_schedule=schedule,
    )
    return model, history
