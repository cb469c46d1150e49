r"""One skeleton for every decoder-only language model of the book.

First shown in ``book/improvements/rope_alibi.md``; every later decoder (grouped-query
attention, the LLaMA block, mixtures of experts, latent attention, and the parts still
to come) is this skeleton with other parts plugged in.

A :class:`DecoderBlock` is two residual sublayers around an attention and a
feed-forward network, each with a norm, before the sublayer (pre-norm) or after the
residual addition (post-norm). A :class:`DecoderLM` embeds token ids, adds positions if
a ``positions`` module is given, runs ``n_layers`` blocks from ``make_block(i)``,
normalizes (optional) and reads out logits. The attention, the feed-forward network, the
norm and the cache are arguments; the names are the same everywhere: ``embed``,
``positions``, ``blocks``, ``norm``, ``head``, and in a block ``norm1``, ``attn``,
``norm2``, ``ff``.

An attention plugged into a block is called ``attn(x, cache=cache)`` with ``x``
``(B, T, d_model)``; ``cache`` is ``None`` or that layer's cache. Every layer cache has
one method set, :class:`Cache`'s: ``update(*new)`` appends the new positions and returns
the cached and new ones together, ``len(cache)`` counts the positions stored, ``seen``
those ever appended (the index of the next position), ``start`` the index of the
oldest stored one, ``nbytes()`` the bytes held.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dlabc.checks import check_positive_int, check_tensor

__all__ = ["Cache", "DecoderBlock", "DecoderLM"]


class Cache:
    r"""One layer's cache: tensors that grow along the position axis ``dim``.

    :meth:`update` appends the new positions, $C \leftarrow [C;\ C_{new}]$ for each
    stored tensor, and returns all of them; with ``keep`` the cache then forgets all
    but the last ``keep`` positions (a rolling buffer). Subclasses name the tensors
    (keys and values, or a latent) and set ``dim``.
    """

    dim = 1  # the position axis of the stored tensors
    names: tuple[str, ...] = ()  # of the stored tensors, for error messages
    ndim: int | None = None  # of each stored tensor, if fixed

    def __init__(self, keep: int | None = None) -> None:
        if keep is not None and (
            isinstance(keep, bool) or not isinstance(keep, int) or keep < 0
        ):
            raise ValueError(f"keep must be None or an int >= 0, got {keep!r}")
        self.keep = keep
        self.tensors: tuple[torch.Tensor, ...] = ()
        self.seen = 0  # positions ever appended

    def __len__(self) -> int:
        return self.tensors[0].shape[self.dim] if self.tensors else 0

    @property
    def start(self) -> int:
        """The index in the sequence of the oldest stored position."""
        return self.seen - len(self)

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append ``new`` (one tensor per stored tensor); return cached and new."""
        self._check(new)
        return self._update(*new)

    def _update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.tensors:  # C <- [C; C_new], along the position axis
            new = tuple(
                torch.cat([c, n], self.dim)
                for c, n in zip(self.tensors, new, strict=True)
            )
        self.seen += new[0].shape[self.dim] - len(self)
        total = new[0].shape[self.dim]
        stored = total if self.keep is None else min(self.keep, total)
        self.tensors = tuple(t.narrow(self.dim, total - stored, stored) for t in new)
        return new

    def nbytes(self) -> int:
        """The bytes the stored tensors take."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def _check(self, new: tuple) -> None:
        names = self.names or tuple(f"new[{i}]" for i in range(len(new)))
        if not new or (self.names and len(new) != len(names)):
            raise ValueError(f"update takes {', '.join(names) or 'tensors'}")
        for name, t in zip(names, new, strict=False):
            check_tensor(t, name, ndim=self.ndim, floating=True)
            if t.dim() <= self.dim or t.shape[: self.dim] != new[0].shape[: self.dim]:
                raise ValueError(
                    f"{name} {tuple(t.shape)} must share the axes before the "
                    f"position axis {self.dim} with {names[0]} {tuple(new[0].shape)}"
                )
            if t.shape[self.dim] != new[0].shape[self.dim]:
                raise ValueError(f"{', '.join(names)} must hold the same positions")
        for name, c, t in zip(names, self.tensors, new, strict=False):
            if t.shape[: self.dim] + t.shape[self.dim + 1 :] != (
                c.shape[: self.dim] + c.shape[self.dim + 1 :]
            ) or (t.dtype != c.dtype):
                raise ValueError(
                    f"{name} {tuple(t.shape)} {t.dtype} does not fit the cached "
                    f"{tuple(c.shape)} {c.dtype} (all axes but the positions')"
                )


class DecoderBlock(nn.Module):
    r"""A decoder block: attention and feed-forward network, each in a residual
    sublayer with a norm.

    Pre-norm (``norm_first=True``): $h = x + \mathrm{Attn}(\mathrm{N}_1(x))$,
    $y = h + \mathrm{FFN}(\mathrm{N}_2(h))$. Post-norm, the block of 2017:
    $h = \mathrm{N}_1(x + \mathrm{Attn}(x))$, $y = \mathrm{N}_2(h + \mathrm{FFN}(h))$.
    ``attn`` is called ``attn(x, cache=cache)``; ``norm()`` makes each norm.
    ``x`` ``(B, T, d_model)`` -> ``(B, T, d_model)``.
    """

    def __init__(
        self,
        attn: nn.Module,
        ff: nn.Module,
        norm: Callable[[], nn.Module],
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("attn", attn), ("ff", ff)):
            if not isinstance(value, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {value!r}")
        if not callable(norm):
            raise TypeError(f"norm must make a norm module when called, got {norm!r}")
        if not isinstance(norm_first, bool):
            raise TypeError(f"norm_first must be a bool, got {norm_first!r}")
        self.norm_first = norm_first
        self.norm1, self.attn, self.norm2, self.ff = norm(), attn, norm(), ff

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if self.norm_first:
            h = x + self.attn(self.norm1(x), cache=cache)  # h = x + Attn(N_1(x))
            return h + self.ff(self.norm2(h))  # y = h + FFN(N_2(h))
        h = self.norm1(x + self.attn(x, cache=cache))  # h = N_1(x + Attn(x))
        return self.norm2(h + self.ff(h))  # y = N_2(h + FFN(h))


class DecoderLM(nn.Module):
    r"""A decoder-only language model: embeddings, blocks, a norm and a read-out.

    $h^{(0)} = s\,E[x]\ (+\,PE)$, $h^{(\ell)} = \mathrm{Block}_\ell(h^{(\ell-1)})$,
    $\mathrm{logits} = \mathrm{N}(h^{(L)})\,W + b$.

    ``make_block(i)`` builds block ``i`` (a :class:`DecoderBlock`, or any module called
    ``block(h, cache)``). With ``scale_embedding`` $E$ starts as
    $\mathcal N(0, 1/d)$ and $s = \sqrt d$ (Vaswani et al.), otherwise $s = 1$ and
    $E \sim \mathcal N(0, 1)$. ``positions``, if given, is a module called
    ``positions(h, offset)`` that adds positions to the embeddings (the others enter
    inside the attention). ``final_norm()`` makes the last norm, ``None`` for none (a
    post-norm stack ends normalized already). ``forward(ids, cache=None)`` takes ids
    ``(B, T)`` and a list of one cache per block (:meth:`new_cache`), and returns logits
    ``(B, T, vocab_size)`` for the new positions.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        make_block: Callable[[int], nn.Module],
        final_norm: Callable[[], nn.Module] | None,
        *,
        positions: nn.Module | None = None,
        scale_embedding: bool = True,
        head_bias: bool = True,
        make_cache: Callable[[], Cache] | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.d_model = check_positive_int(d_model, "d_model")
        self.n_layers = check_positive_int(n_layers, "n_layers")
        for name, value in (("make_block", make_block), ("final_norm", final_norm)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        self.embed = nn.Embedding(vocab_size, d_model)  # E
        self.scale = math.sqrt(d_model) if scale_embedding else 1.0  # s
        if scale_embedding:
            nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        self.positions = positions
        self.blocks = nn.ModuleList(make_block(i) for i in range(n_layers))
        self.norm = None if final_norm is None else final_norm()
        self.head = nn.Linear(d_model, vocab_size, bias=head_bias)
        self.make_cache = make_cache

    def new_cache(self) -> list[Cache]:
        """An empty cache: one per block, from ``make_cache()``."""
        if self.make_cache is None:
            raise TypeError(
                "this model was built without make_cache: it keeps no cache"
            )
        return [self.make_cache() for _ in self.blocks]

    def forward(
        self, ids: torch.Tensor, cache: list[Cache] | None = None
    ) -> torch.Tensor:
        check_tensor(ids, "ids", ndim=2, dtype=torch.long)
        if ids.device.type == "cpu" and ids.numel():  # no host sync on a GPU
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"ids must lie in [0, {self.vocab_size}), got [{low}, {high}]"
                )
        if cache is not None and (
            not isinstance(cache, list) or len(cache) != self.n_layers
        ):
            raise ValueError(f"cache must be a list of {self.n_layers} caches")
        return self._forward(ids, cache)

    def _forward(self, ids: torch.Tensor, cache: list[Cache] | None) -> torch.Tensor:
        h = self.embed(ids) * self.scale  # (B, T, d_model): s E[x]
        if self.positions is not None:
            offset = 0 if cache is None else cache[0].seen  # index of the first id
            h = self.positions(h, offset)  # (B, T, d_model): + PE
        for i, block in enumerate(self.blocks):
            h = block(h, None if cache is None else cache[i])  # (B, T, d_model)
        if self.norm is not None:
            h = self.norm(h)  # (B, T, d_model)
        return self.head(h)  # (B, T, vocab_size)
