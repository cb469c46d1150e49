r"""CLIP: an image encoder and a text encoder trained so that an image and its caption
land close together in one embedding space, by a symmetric contrastive loss over the
batch's $N \times N$ image-text similarities, scaled by a learned temperature. Equal to
Hugging Face's ``CLIPModel`` (``loss``, ``logits_per_image``, ``logits_per_text``) with
the same weights.

Chapter: ``book/multimodal/clip.md``.

References:
- Radford et al. (2021), *Learning Transferable Visual Models From Natural Language
  Supervision*, ICML (CLIP: Figure 3's pseudocode, the symmetric cross-entropy, the
  temperature initialised to 0.07 and clipped so that the logits are scaled by at most
  100, the pre-LN ViT with an extra LayerNorm before the encoder, the causal text
  Transformer read at the end-of-text token, zero-shot classification by prompts).
- Oord, Li & Vinyals (2018), *Representation Learning with Contrastive Predictive
  Coding* (the InfoNCE loss that each direction of CLIP's loss is).
- Zhang et al. (2020), *Contrastive Learning of Medical Visual Representations from
  Paired Images and Text* (ConVIRT: the symmetric image-text loss CLIP simplifies).
- Wu et al. (2018), *Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination*, CVPR (the temperature 0.07).
- Dosovitskiy et al. (2021), *An Image is Worth 16x16 Words* (the ViT image tower).
- Hendrycks & Gimpel (2016), *Gaussian Error Linear Units* (the sigmoid
  approximation $x \sigma(1.702 x)$, CLIP's "quick GELU").

Shapes: ``N`` pairs in a batch, ``C x H x W`` images cut into ``P x P`` patches, ``T``
tokens of text, ``d_v`` / ``d_t`` the towers' widths, ``e`` the shared embedding's size.
The parameter names are chosen so that :data:`HF_RENAMES` maps a Hugging Face
``CLIPModel`` state dict onto :class:`CLIP` (:func:`from_hf_state_dict`). The attention
is the book's :class:`dlabc.transformers.attention_with_pytorch.MultiHeadAttention`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.transformers.attention_with_pytorch import MultiHeadAttention

__all__ = [
    "CLIPConfig",
    "quick_gelu",
    "EncoderLayer",
    "VisionTower",
    "TextTower",
    "CLIP",
    "clip_loss",
    "HF_RENAMES",
    "from_hf_state_dict",
    "to_hf_config",
    "WordTokenizer",
    "caption_pairs",
    "BRIGHTNESS",
    "SIZES",
    "train_clip",
    "recall_at_k",
]


@dataclass(frozen=True)
class CLIPConfig:
    """The sizes of a CLIP model, Hugging Face's ``CLIPConfig`` names in comments."""

    image_size: int = 28  # vision_config.image_size
    patch_size: int = 7  # vision_config.patch_size
    in_channels: int = 1  # vision_config.num_channels
    vision_width: int = 64  # vision_config.hidden_size
    vision_layers: int = 2  # vision_config.num_hidden_layers
    vision_heads: int = 4  # vision_config.num_attention_heads
    vocab_size: int = 100  # text_config.vocab_size
    context_length: int = 16  # text_config.max_position_embeddings
    text_width: int = 64  # text_config.hidden_size
    text_layers: int = 2  # text_config.num_hidden_layers
    text_heads: int = 4  # text_config.num_attention_heads
    eos_id: int = 99  # text_config.eos_token_id: the token the text tower is read at
    embed_dim: int = 32  # projection_dim
    mlp_ratio: int = 4  # intermediate_size = mlp_ratio * hidden_size
    logit_scale_init: float = math.log(1 / 0.07)  # logit_scale_init_value
    eps: float = 1e-5  # layer_norm_eps

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "patch_size",
            "in_channels",
            "vision_width",
            "vision_layers",
            "vision_heads",
            "vocab_size",
            "context_length",
            "text_width",
            "text_layers",
            "text_heads",
            "embed_dim",
            "mlp_ratio",
        ):
            check_positive_int(getattr(self, name), name)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} must divide image_size={self.image_size}"
            )
        for width, heads in (
            ("vision_width", "vision_heads"),
            ("text_width", "text_heads"),
        ):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width} must be divisible by {heads}")
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id must lie in 0..{self.vocab_size - 1}")
        check_number(self.logit_scale_init, "logit_scale_init")
        check_number(self.eps, "eps", low=0, low_open=True)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    r"""CLIP's activation $x\,\sigma(1.702\,x)$, a sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class EncoderLayer(nn.Module):
    r"""A pre-LN Transformer layer, as in both of CLIP's towers:
    $z \leftarrow z + \mathrm{MSA}(\mathrm{LN}_1 z)$, then
    $z \leftarrow z + \mathrm{MLP}(\mathrm{LN}_2 z)$, the MLP with :func:`quick_gelu`.
    ``(N, T, d)`` -> ``(N, T, d)``; ``mask`` (boolean, ``True`` = may attend) as in
    :class:`MultiHeadAttention`."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = MultiHeadAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(
        self, z: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        z = z + self.attn(self.norm1(z), mask=mask)[0]  # attention sub-layer
        return z + self.fc2(quick_gelu(self.fc1(self.norm2(z))))  # MLP sub-layer


class VisionTower(nn.Module):
    r"""CLIP's ViT image encoder: patches and a class token, position embeddings, an
    extra LayerNorm *before* the layers (``pre_layrnorm``, Hugging Face's spelling),
    pre-LN layers, and a LayerNorm of the final class token (``post_layernorm``).
    ``(N, C, H, W)`` -> ``(N, d_v)``."""

    def __init__(self, c: CLIPConfig) -> None:
        super().__init__()
        d, P = c.vision_width, c.patch_size
        self.patch_embedding = nn.Conv2d(c.in_channels, d, P, stride=P, bias=False)
        n_tokens = 1 + (c.image_size // P) ** 2
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.position_embedding = nn.Parameter(torch.randn(n_tokens, d) * 0.01)
        self.pre_layrnorm = nn.LayerNorm(d, eps=c.eps)
        self.layers = nn.ModuleList(
            EncoderLayer(d, c.vision_heads, c.mlp_ratio, c.eps)
            for _ in range(c.vision_layers)
        )
        self.post_layernorm = nn.LayerNorm(d, eps=c.eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (N, HW/P², d)
        cls = self.class_embedding.expand(len(x), 1, -1)  # (N, 1, d)
        z = torch.cat([cls, x], 1) + self.position_embedding  # (N, T, d)
        z = self.pre_layrnorm(z)
        for layer in self.layers:
            z = layer(z)
        return self.post_layernorm(z[:, 0])  # the class token: (N, d)


class TextTower(nn.Module):
    r"""CLIP's text encoder: token and position embeddings, pre-LN layers with a
    causal mask (token $i$ sees tokens $0..i$), a final LayerNorm, read at each
    sequence's first end-of-text token ``eos_id``. ``(N, T)`` ids -> ``(N, d_t)``."""

    def __init__(self, c: CLIPConfig) -> None:
        super().__init__()
        d = c.text_width
        self.eos_id = c.eos_id
        self.token_embedding = nn.Embedding(c.vocab_size, d)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.position_embedding = nn.Parameter(torch.randn(c.context_length, d) * 0.01)
        self.layers = nn.ModuleList(
            EncoderLayer(d, c.text_heads, c.mlp_ratio, c.eps)
            for _ in range(c.text_layers)
        )
        self.final_layer_norm = nn.LayerNorm(d, eps=c.eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        z = self.token_embedding(tokens) + self.position_embedding[:T]  # (N, T, d)
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        for layer in self.layers:
            z = layer(z, mask=causal)
        z = self.final_layer_norm(z)
        eos = (tokens == self.eos_id).int().argmax(1)  # first end-of-text: (N,)
        return z[torch.arange(len(z), device=z.device), eos]  # (N, d)


class CLIP(nn.Module):
    r"""The two towers, their linear projections into the shared space, and the
    temperature, kept as its logarithm ``logit_scale`` $= t$, initialised to
    $\log(1 / 0.07)$. ``model(images, tokens)`` gives ``logits_per_image`` ``(N_i,
    N_t)`` $= e^t\, \hat I \hat T^\top$ and ``logits_per_text``, its transpose."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"config must be a CLIPConfig, got {type(config).__name__}")
        self.config = c = config
        self.vision = VisionTower(c)
        self.text = TextTower(c)
        self.visual_projection = nn.Linear(c.vision_width, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(N, e)`` of ``(N, C, H, W)`` images."""
        c = self.config
        check_tensor(images, "images", ndim=4, floating=True)
        if tuple(images.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"images must be (N, {c.in_channels}, {c.image_size}, "
                f"{c.image_size}), got {tuple(images.shape)}"
            )
        return self._embed(self.vision(images), self.visual_projection)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, e)`` of token ids ``(N, T)``, each row
        holding ``eos_id``."""
        c = self.config
        check_tensor(tokens, "tokens", ndim=2)
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.shape[1] > c.context_length:
            raise ValueError(
                f"tokens has {tokens.shape[1]} positions, more than "
                f"context_length={c.context_length}"
            )
        if tokens.device.type == "cpu" and len(tokens):  # reading values: CPU only
            if tokens.min() < 0 or tokens.max() >= c.vocab_size:
                raise ValueError(f"token ids must lie in 0..{c.vocab_size - 1}")
            if not (tokens == c.eos_id).any(1).all():
                raise ValueError(f"every row of tokens must hold eos_id={c.eos_id}")
        return self._embed(self.text(tokens), self.text_projection)

    @staticmethod
    def _embed(features: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        r"""Project a tower's pooled features into the shared space and normalise:
        $\hat x = W x / \lVert W x \rVert_2$."""
        x = projection(features)  # (N, e)
        return x / x.norm(dim=-1, keepdim=True)  # on the unit sphere

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeds = self.encode_image(images)  # (N_i, e)
        text_embeds = self.encode_text(tokens)  # (N_t, e)
        return self._logits(image_embeds, text_embeds)

    def _logits(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""$S = e^t\, \hat I \hat T^\top$: cosine similarities scaled by $e^t$."""
        logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.T
        return logits_per_image, logits_per_image.T  # (N_i, N_t), (N_t, N_i)


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    r"""CLIP's symmetric contrastive loss of a square ``(N, N)`` logit matrix whose
    diagonal holds the true pairs: the mean of the cross-entropies image -> text (rows)
    and text -> image (columns)."""
    check_tensor(logits_per_image, "logits_per_image", ndim=2, floating=True)
    if logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            "logits_per_image must be square (N images, N captions), got shape "
            f"{tuple(logits_per_image.shape)}"
        )
    return _clip_loss(logits_per_image)


def _clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    r"""$\mathcal L = \frac12 \big(\mathrm{CE}(S, \mathrm{diag}) +
    \mathrm{CE}(S^\top, \mathrm{diag})\big)$ for $S$ = ``logits_per_image``."""
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    loss_i = F.cross_entropy(logits_per_image, labels)  # each image picks its caption
    loss_t = F.cross_entropy(logits_per_image.T, labels)  # each caption its image
    return (loss_i + loss_t) / 2


# ------------------------------------------------------------- Hugging Face weights

#: Hugging Face ``CLIPModel``'s names -> ours, applied in order as substitutions.
HF_RENAMES: tuple[tuple[str, str], ...] = (
    ("text_model.", "text."),
    ("vision_model.", "vision."),
    ("embeddings.", ""),
    ("encoder.layers.", "layers."),
    ("self_attn.q_proj", "attn.W_q"),
    ("self_attn.k_proj", "attn.W_k"),
    ("self_attn.v_proj", "attn.W_v"),
    ("self_attn.out_proj", "attn.W_o"),
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
    ("mlp.fc", "fc"),
    ("position_embedding.weight", "position_embedding"),
)


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A Hugging Face ``CLIPModel`` state dict under :class:`CLIP`'s names."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping, got {type(state_dict).__name__}"
        )
    renamed = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # a buffer of 0, 1, 2, ...: no weight
            continue
        for old, new in HF_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def to_hf_config(config: CLIPConfig):
    """The Hugging Face ``transformers.CLIPConfig`` of the same model (imports
    transformers)."""
    if not isinstance(config, CLIPConfig):
        raise TypeError(f"config must be a CLIPConfig, got {type(config).__name__}")
    import transformers

    c = config
    text = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.text_width,
        intermediate_size=c.mlp_ratio * c.text_width,
        num_hidden_layers=c.text_layers,
        num_attention_heads=c.text_heads,
        max_position_embeddings=c.context_length,
        eos_token_id=c.eos_id,
        bos_token_id=min(1, c.vocab_size - 1),
        pad_token_id=0,
        layer_norm_eps=c.eps,
        hidden_act="quick_gelu",
    )
    vision = dict(
        hidden_size=c.vision_width,
        intermediate_size=c.mlp_ratio * c.vision_width,
        num_hidden_layers=c.vision_layers,
        num_attention_heads=c.vision_heads,
        image_size=c.image_size,
        patch_size=c.patch_size,
        num_channels=c.in_channels,
        layer_norm_eps=c.eps,
        hidden_act="quick_gelu",
    )
    return transformers.CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=c.embed_dim,
        logit_scale_init_value=c.logit_scale_init,
    )


# -------------------------------------------------------------- captions and words


class WordTokenizer:
    """Whole words as tokens: ``<pad>`` = 0, ``<sot>`` = 1, the words of ``texts`` in
    sorted order, and ``<eos>`` last. :meth:`__call__` turns captions into ``(N, T)``
    ids: ``<sot>``, the words, ``<eos>``, then padding."""

    def __init__(self, texts: Sequence[str], context_length: int = 16) -> None:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of strings")
        check_positive_int(context_length, "context_length")
        words = sorted({w for t in texts for w in t.split()})
        self.words = ["<pad>", "<sot>", *words, "<eos>"]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def eos_id(self) -> int:
        return len(self.words) - 1

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            unknown = [w for w in text.split() if w not in self.ids]
            if unknown:
                raise ValueError(f"words not in the vocabulary: {unknown}")
            ids = [1, *(self.ids[w] for w in text.split()), self.eos_id]
            if len(ids) > self.context_length:
                raise ValueError(
                    f"{text!r} needs {len(ids)} tokens, more than "
                    f"context_length={self.context_length}"
                )
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def caption_pairs(
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[Sequence[str]],
    templates: Sequence[str],
    seed: int = 0,
) -> tuple[list[str], np.ndarray]:
    """One generated caption per image, and what it says: ``(N, 3)`` integers (class,
    brightness, size). A template is filled with one of the class's ``names``
    (``{c}``), a brightness word (``{b}``: the item's mean ink, ``dark`` / ``grey`` /
    ``bright``) and a size word (``{s}``: the share of the square it covers, ``small``
    / ``large``); template and name are drawn at random (``seed``)."""
    if not (isinstance(images, np.ndarray) and images.ndim == 3):
        raise ValueError("images must be a NumPy array (N, H, W)")
    if not (isinstance(labels, np.ndarray) and labels.shape == images.shape[:1]):
        raise ValueError("labels must be a NumPy array (N,), one per image")
    if len(templates) == 0 or len(names) <= int(labels.max(initial=0)):
        raise ValueError("need at least one template and names for every label")
    rng = np.random.default_rng(seed)
    item = images > 0.1  # the item's pixels
    ink = images.sum((1, 2)) / np.maximum(item.sum((1, 2)), 1)  # mean ink on the item
    bright = np.digitize(ink, [0.55, 0.7])  # 0 dark, 1 grey, 2 bright
    size = (item.mean((1, 2)) >= 0.45).astype(int)  # 0 small, 1 large
    captions = []
    for i, y in enumerate(labels):
        template = templates[rng.integers(len(templates))]
        name = names[y][rng.integers(len(names[y]))]
        b, s = BRIGHTNESS[bright[i]], SIZES[size[i]]
        captions.append(template.format(c=name, b=b, s=s))
    return captions, np.stack([labels, bright, size], 1)


#: The words :func:`caption_pairs` computes from the pixels.
BRIGHTNESS = ("dark", "grey", "bright")
SIZES = ("small", "large")


# ------------------------------------------------------------------------ training


def train_clip(
    model: CLIP,
    images: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    r"""Train ``model`` on the pairs ``(images[i], tokens[i])`` with :func:`clip_loss`
    on random batches, AdamW with a cosine learning-rate decay, and the paper's clip of
    the temperature: after each step $t \le \log 100$. Returns the loss of every step
    and the temperature's scale $e^t$ before each step and after the last."""
    if not isinstance(model, CLIP):
        raise TypeError(f"model must be a CLIP, got {type(model).__name__}")
    check_tensor(images, "images", ndim=4, floating=True)
    check_tensor(tokens, "tokens", ndim=2)
    if len(images) != len(tokens):
        raise ValueError(f"{len(images)} images but {len(tokens)} captions")
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # not gains, t
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other}],
        lr=lr,
        weight_decay=0.0,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    losses, scales = [], []
    model.train()
    for _ in range(steps):
        scales.append(model.logit_scale.exp().item())
        batch = torch.randperm(len(images), generator=generator)[:batch_size]
        batch = batch.to(images.device)
        logits_per_image, _ = model(images[batch], tokens[batch])
        loss = clip_loss(logits_per_image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100))  # the paper's clip at 100
    scales.append(model.logit_scale.exp().item())
    model.eval()
    return losses, scales


def recall_at_k(
    similarity: torch.Tensor, relevant: torch.Tensor, k: int
) -> torch.Tensor:
    r"""Recall@k of a retrieval: the share of queries (rows of ``similarity``, ``(Q,
    G)``) whose ``k`` most similar gallery items include one marked in the boolean
    ``relevant`` ``(Q, G)``."""
    check_tensor(similarity, "similarity", ndim=2, floating=True)
    check_tensor(relevant, "relevant", ndim=2, dtype=torch.bool)
    if relevant.shape != similarity.shape:
        raise ValueError("relevant must have the shape of similarity")
    check_positive_int(k, "k")
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # (Q, k)
    return relevant.gather(1, top).any(1).float().mean()
