r"""Quantizing a language model: 4-bit weights (round-to-nearest and GPTQ), LLM.int8's
int8 matrix product with an outlier path, and QLoRA's NF4 weights under LoRA.

Chapter: ``book/efficiency/llm_quantization.md``.

References:
- Frantar, Ashkboos, Hoefler & Alistarh (2023), *GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers*, ICLR (Algorithm 1: quantize
  the columns of $W$ one by one and spread each column's error over the columns not
  yet quantized with the inverse Hessian $H^{-1}$, $H = 2 X X^\top$, through its
  Cholesky factor; lazy updates in blocks of 128 columns; dampening).
- Dettmers, Lewis, Belkada & Zettlemoyer (2022), *LLM.int8(): 8-bit Matrix
  Multiplication for Transformers at Scale*, NeurIPS (vector-wise absmax quantization,
  one scale per row of $X$ and per column of $W^\top$; the mixed-precision
  decomposition that keeps the feature dimensions with $|x| > 6$ in 16 bits).
- Dettmers, Pagnoni, Holtzman & Zettlemoyer (2023), *QLoRA: Efficient Finetuning of
  Quantized LLMs*, NeurIPS (the 4-bit NormalFloat code book NF4 for blocks of 64
  weights with one absmax each; LoRA adapters trained through the frozen 4-bit
  weights, de-quantized on the fly).

Shapes: a linear layer's weight ``W`` is ``(out, in)`` as in ``nn.Linear``; the
inputs ``X`` that calibrate it are ``(tokens, in)``, so $H = 2 X^\top X$ is
``(in, in)``. "Groups" run along a row of ``W`` (the input dimension): ``group_size``
consecutive weights share one scale and one minimum; ``None`` means one group per row
(per-channel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "rtn_quantize",
    "grid_residual",
    "weight_bytes",
    "gptq_quantize",
    "layer_error",
    "quantize_llama",
    "absmax_quantize",
    "int8_matmul",
    "Int8Linear",
    "activation_absmax",
    "nf4_code",
    "nf4_quantize",
    "nf4_dequantize",
    "NF4Linear",
    "perplexity",
    "swap_linears",
]

# the linear layers of one LlamaBlock, grouped by the input they read: q, k, v read
# the same normalized stream, gate and up the same one, so each group shares one H
LLAMA_GROUPS = (
    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    ("attn.o_proj",),
    ("ff.gate_proj", "ff.up_proj"),
    ("ff.down_proj",),
)


# ---------------------------------------------------------------- 4-bit weights


def _check_weight(w: object, name: str = "weight") -> None:
    check_tensor(w, name, ndim=2, floating=True)


def _check_grid(bits: object, group_size: object, columns: int) -> None:
    check_positive_int(bits, "bits")
    if bits > 8:
        raise ValueError(f"bits must be at most 8, got {bits}")
    if group_size is not None:
        check_positive_int(group_size, "group_size")
        if columns % group_size:
            raise ValueError(
                f"group_size={group_size} must divide the {columns} columns"
            )


def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's min-max grid: step $s = (\\max - \\min) / (2^b - 1)$ and $\\min$."""
    low = w.amin(-1, keepdim=True)  # (..., 1)
    step = (w.amax(-1, keepdim=True) - low) / (2**bits - 1)  # (..., 1)
    return step.clamp_min(1e-12), low  # a constant row gets a tiny step


def _round_to_grid(
    w: torch.Tensor, step: torch.Tensor, low: torch.Tensor, bits: int
) -> torch.Tensor:
    """$\\hat w = m + s\\,\\mathrm{clamp}(\\lfloor (w - m)/s \\rceil, 0, 2^b-1)$,
    $m$ the minimum."""
    return low + step * torch.clamp(torch.round((w - low) / step), 0, 2**bits - 1)


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int | None = None
) -> torch.Tensor:
    r"""Round-to-nearest (RTN): every group of ``group_size`` weights of a row (the
    whole row for ``None``) onto its own grid of $2^b$ evenly spaced values from its
    minimum to its maximum (asymmetric, as GGUF's ``Q4_1``), returned de-quantized.

    $\hat w = m + s \cdot \mathrm{clamp}\big(\lfloor (w - m)/s \rceil, 0, 2^b - 1\big),
    \quad m = \min_{\text{group}} w,\ s = (\max_{\text{group}} w - m)/(2^b - 1).$
    """
    _check_weight(weight)
    _check_grid(bits, group_size, weight.shape[1])
    return _rtn(weight, bits, group_size)


def _rtn(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    out, columns = w.shape
    g = columns if group_size is None else group_size
    groups = w.reshape(out, columns // g, g)  # (out, groups, g)
    step, low = _grid(groups, bits)  # (out, groups, 1) each
    return _round_to_grid(groups, step, low, bits).reshape(out, columns)


def grid_residual(
    weight: torch.Tensor, bits: int, group_size: int, offset: int = 0
) -> torch.Tensor:
    r"""How far each weight sits from the nearest point of its group's min-max grid,
    in grid steps: $|(w - m)/s - \lfloor (w - m)/s \rceil|$, between 0 (on the grid)
    and 0.5. Groups of ``group_size`` start at column ``offset`` of each row (columns
    before it and after the last whole group are left out). Weights that were
    rounded onto exactly this grid give zeros; weights spread at random give a
    uniform spread with mean 0.25.
    """
    _check_weight(weight)
    _check_grid(bits, None, weight.shape[1])
    check_positive_int(group_size, "group_size")
    if not isinstance(offset, int) or not 0 <= offset < group_size:
        raise ValueError(f"offset must be an int in [0, {group_size}), got {offset}")
    n = (weight.shape[1] - offset) // group_size
    w = weight[:, offset : offset + n * group_size].double()
    groups = w.reshape(w.shape[0], n, group_size)  # (out, n, g)
    step, low = _grid(groups, bits)
    t = (groups - low) / step  # position in grid steps
    return (t - t.round()).abs().flatten().float()


def weight_bytes(
    shape: tuple[int, int],
    bits: int,
    group_size: int | None = None,
    constants: int = 2,
    constant_bytes: int = 2,
) -> int:
    r"""Bytes that a ``(out, in)`` weight quantized to ``bits`` takes: the codes,
    $\lceil \text{out} \cdot \text{in} \cdot b / 8 \rceil$, plus ``constants``
    numbers of ``constant_bytes`` each per group (a 16-bit step and minimum for the
    min-max grid; one 32-bit absmax for NF4)."""
    if not (isinstance(shape, tuple) and len(shape) == 2):
        raise TypeError(f"shape must be a tuple (out, in), got {shape!r}")
    out, columns = (check_positive_int(s, "shape") for s in shape)
    _check_grid(bits, group_size, columns)
    check_positive_int(constants, "constants")
    check_positive_int(constant_bytes, "constant_bytes")
    groups = out * (1 if group_size is None else columns // group_size)
    return math.ceil(out * columns * bits / 8) + groups * constants * constant_bytes


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    r"""GPTQ (Frantar et al., Algorithm 1): quantize ``weight`` ``(out, in)`` column
    by column onto the same min-max grids as :func:`rtn_quantize`, and after each
    column move the columns not yet quantized to make up for its error, as well as
    the calibration inputs allow (``hessian`` $H = 2X^\top X$, ``(in, in)``).
    ``damp`` adds $\lambda \cdot \mathrm{mean}\,\mathrm{diag}(H)$ to the diagonal;
    ``block_size`` columns are updated at a time (the result does not depend on it,
    up to rounding, when it divides ``group_size`` or is a multiple of it). Returns
    the de-quantized $\hat W$.
    """
    _check_weight(weight)
    _check_grid(bits, group_size, weight.shape[1])
    check_tensor(hessian, "hessian", ndim=2, floating=True)
    if hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(
            f"hessian must be ({weight.shape[1]}, {weight.shape[1]}) for a weight "
            f"with {weight.shape[1]} columns, got {tuple(hessian.shape)}"
        )
    check_positive_int(block_size, "block_size")
    check_number(damp, "damp", low=0)
    # one layer: a batch of one for the batched loop
    return _gptq(weight[None], hessian[None], bits, group_size, block_size, damp)[0]


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    block_size: int,
    damp: float,
) -> torch.Tensor:
    r"""$\delta_F = -\dfrac{w_q - \mathrm{quant}(w_q)}{[H_F^{-1}]_{qq}}
    \,(H_F^{-1})_{:,q}$ (eq. 2 of the paper, the optimal brain surgeon's update),
    column after column in a fixed order; the rows of the upper Cholesky factor $U$
    of $H^{-1}$ hold every $H_F^{-1}$ that the loop needs (eq. 3: $[H_F^{-1}]_{qq} =
    U_{qq}^2$ and $(H_F^{-1})_{q,F} / [H_F^{-1}]_{qq} = U_{q,F} / U_{qq}$). Any
    leading dimensions of ``weight`` ``(..., out, in)`` and ``hessian`` ``(..., in,
    in)`` are layers quantized side by side."""
    h = hessian.double().clone()  # (..., in, in)
    diag = h.diagonal(dim1=-2, dim2=-1)  # (..., in), a view
    dead = diag == 0  # inputs that were always zero: nothing to preserve
    diag.add_(dead.double())  # H_ii = 1 for them
    diag.add_(damp * diag.mean(-1, keepdim=True))  # H + lambda mean(diag H) I
    h_inverse = torch.cholesky_inverse(torch.linalg.cholesky(h.float()))
    u = torch.linalg.cholesky(h_inverse, upper=True)  # H^-1 = U^T U
    # columns of W as contiguous rows: (..., in, out); dead inputs' weights -> 0
    w = weight.float().transpose(-1, -2).masked_fill(dead[..., None], 0.0)
    q = torch.zeros_like(w)  # the quantized columns, (..., in, out)
    columns = w.shape[-2]
    g = columns if group_size is None else group_size
    for i0 in range(0, columns, block_size):  # lazy batches of columns
        i1 = min(i0 + block_size, columns)
        errors = torch.zeros_like(w[..., i0:i1, :])  # (..., i1 - i0, out)
        for i in range(i0, i1):
            if i % g == 0:  # a new group: its grid from the weights as they are now
                step, low = _grid(w[..., i : i + g, :].transpose(-1, -2), bits)
                step, low = step.squeeze(-1), low.squeeze(-1)  # (..., out)
            q[..., i, :] = _round_to_grid(w[..., i, :], step, low, bits)
            # (w_q - quant(w_q)) / U_qq, one number per output row
            error = (w[..., i, :] - q[..., i, :]) / u[..., i, i, None]  # (..., out)
            # delta_F inside the block: w_F -= U_{q,F} * error
            w[..., i + 1 : i1, :].baddbmm_(
                u[..., i, i + 1 : i1, None], error[..., None, :], alpha=-1
            )
            errors[..., i - i0, :] = error
        # the block's updates to all later columns at once
        w[..., i1:, :] -= u[..., i0:i1, i1:].transpose(-1, -2) @ errors
    return q.transpose(-1, -2).to(weight.dtype)  # (..., out, in)


def layer_error(
    weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor
) -> float:
    r"""The relative output error $\lVert (W - \hat W) X^\top \rVert_F / \lVert W
    X^\top \rVert_F$ on the calibration inputs, from $H = 2 X^\top X$ alone:
    $\lVert \Delta X^\top \rVert_F^2 = \tfrac12 \mathrm{tr}(\Delta H \Delta^\top)$."""
    _check_weight(weight)
    _check_weight(quantized, "quantized")
    check_tensor(hessian, "hessian", ndim=2, floating=True)
    if quantized.shape != weight.shape or hessian.shape != (weight.shape[1],) * 2:
        raise ValueError("weight, quantized and hessian must be (out, in) and (in, in)")
    w, delta, h = weight.double(), (weight - quantized).double(), hessian.double()
    return math.sqrt(((delta @ h) * delta).sum() / ((w @ h) * w).sum())


def _layer_errors(
    w: torch.Tensor, quantized: list[torch.Tensor], h: torch.Tensor
) -> list[torch.Tensor]:
    """:func:`layer_error` for layers stacked ``(blocks, out, in)``, in float32, one
    ``(blocks,)`` tensor for each de-quantized stack in ``quantized``."""
    w, h = w.float(), h.float()
    norm = ((w @ h) * w).sum((-2, -1))  # (blocks,)
    return [(((w - q) @ h) * (w - q)).sum((-2, -1)).div(norm).sqrt() for q in quantized]


def _hessians(
    model: nn.Module, ids: torch.Tensor, groups: tuple
) -> list[dict[str, torch.Tensor]]:
    """$H = 2 X^\top X$ of the input of each group of :data:`LLAMA_GROUPS`, in every
    block, from one forward pass of ``model`` over ``ids``."""
    hessians: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]
    handles = []
    for b, block in enumerate(model.blocks):
        for group in groups:

            def hook(module, args, out, b=b, key=group[0]):
                x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
                hessians[b][key] = 2 * x.T @ x  # (in, in), float32 as in the paper

            layer = block.get_submodule(group[0])
            handles.append(layer.register_forward_hook(hook))
    model(ids)
    for handle in handles:
        handle.remove()
    return hessians


@torch.no_grad()
def quantize_llama(
    model: nn.Module,
    calibration: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    method: str = "gptq",
    groups: tuple[tuple[str, ...], ...] = LLAMA_GROUPS,
) -> list[dict]:
    r"""Quantize every linear layer in the blocks of a
    :class:`~dlabc.improvements.modern_block.BlockLM` in place, with ``method``
    ``"gptq"`` or ``"rtn"``, and measure both.

    The Hessians come from one pass of the calibration ids ``(B, T)`` through the
    unquantized model (q, k, v share one, gate and up another), so the layers of the
    same kind in all blocks are quantized side by side in one batched loop. (The
    paper feeds each block the outputs of the blocks quantized before it; an
    exercise compares.) ``groups`` picks which of :data:`LLAMA_GROUPS` to quantize
    (all by default). Returns, per block and group of layers, the relative output
    error :func:`layer_error` of GPTQ and of RTN on the calibration inputs
    (``{"block", "layers", "gptq", "rtn"}``), whichever method was applied.
    """
    check_tensor(calibration, "calibration", ndim=2, dtype=torch.long)
    _check_grid(bits, None, 1)
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    if not groups or any(group not in LLAMA_GROUPS for group in groups):
        raise ValueError(f"groups must be some of {LLAMA_GROUPS}, got {groups!r}")
    hessians = _hessians(model, calibration, groups)
    records = []
    for group in groups:
        layers = [[block.get_submodule(n) for n in group] for block in model.blocks]
        # each block's group as one matrix, the blocks stacked: (blocks, out, in)
        w = torch.stack([torch.cat([l.weight for l in ls]) for ls in layers])
        _check_grid(bits, group_size, w.shape[-1])
        h = torch.stack([hs[group[0]] for hs in hessians])  # (blocks, in, in)
        rtn = _rtn(w.flatten(0, 1), bits, group_size).view_as(w)
        gptq = _gptq(w, h, bits, group_size, 128, 0.01)
        e_gptq, e_rtn = _layer_errors(w, [gptq, rtn], h)  # (blocks,) each
        for b in range(len(layers)):
            records.append(
                dict(block=b, layers=group, gptq=e_gptq[b].item(), rtn=e_rtn[b].item())
            )
            new = (gptq if method == "gptq" else rtn)[b]
            sizes = [l.out_features for l in layers[b]]
            for layer, part in zip(layers[b], new.split(sizes), strict=True):
                layer.weight.copy_(part)
    return records


# ---------------------------------------------------------------- LLM.int8()


def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Vector-wise absmax int8: each row of ``x`` ``(n, k)`` scaled by its own
    $c = \max_j |x_j| / 127$ and rounded, $x_{i8} = \lfloor x / c \rceil \in
    [-127, 127]$. Returns ``(codes int8 (n, k), scales (n, 1))``; a zero row gets
    scale 1."""
    check_tensor(x, "x", ndim=2, floating=True)
    return _absmax(x)


def _absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(1, keepdim=True) / 127  # (n, 1): c = max|x| / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale).to(torch.int8), scale  # codes in [-127, 127]


def _check_threshold(threshold: object) -> None:
    if threshold != math.inf:
        check_number(threshold, "threshold", low=0, low_open=True)


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, threshold: float = math.inf
) -> torch.Tensor:
    r"""LLM.int8(): $Y = X W^\top$ for ``x`` ``(n, k)`` and ``weight`` ``(m, k)``
    with a vector-wise int8 product and the mixed-precision decomposition: the
    feature dimensions (columns of $X$) where some $|x| > $ ``threshold`` go through
    a 16-bit product, the rest through int8 codes multiplied into int32.
    ``threshold=inf`` gives the plain int8 product. Returns float32 ``(n, m)``.
    """
    check_tensor(x, "x", ndim=2, floating=True)
    check_tensor(weight, "weight", ndim=2, floating=True)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x (n, {x.shape[1]}) and weight (m, {weight.shape[1]}) must share k"
        )
    _check_threshold(threshold)
    return _int8_matmul(x.float(), weight.float(), threshold)


def _integer_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """$A B^\\top$ of int8 codes ``(n, k)``, ``(m, k)``, exactly, as int32.

    A float32 holds every integer up to $2^{24}$ exactly, and a sum of 1024 products
    of int8 codes stays below $1024 \\cdot 127^2 < 2^{24}$: so each chunk of 1024
    columns is an exact float32 product (fast on any hardware), and the chunks add
    up in int32."""
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for j in range(0, a.shape[1], 1024):
        chunk = a[:, j : j + 1024].float() @ b[:, j : j + 1024].float().T  # exact
        acc += chunk.to(torch.int32)
    return acc


def _int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, threshold: float
) -> torch.Tensor:
    r"""$X W^\top \approx \sum_{h \in O} X^{16}_{:,h} (W^{16}_{:,h})^\top +
    c_x c_w^\top \odot \sum_{h \notin O} X^{i8}_{:,h} (W^{i8}_{:,h})^\top$,
    $O = \{h : \max_i |X_{ih}| > \alpha\}$ (eq. 7 of LLM.int8)."""
    outliers = (x.abs() > threshold).any(0)  # (k,): the set O of feature dims
    x_regular = x.masked_fill(outliers, 0.0)  # the int8 path never sees them
    x_codes, c_x = _absmax(x_regular)  # (n, k) int8, (n, 1): one scale per token
    w_codes, c_w = _absmax(weight)  # (m, k) int8, (m, 1): one scale per output
    acc = _integer_product(x_codes, w_codes)  # (n, m) int32, exact
    y = acc.float() * c_x * c_w.T  # de-quantize: the outer product of the scales
    h = outliers.nonzero()[:, 0]  # the outlier columns, in 16 bits
    x16, w16 = x[:, h].half().float(), weight[:, h].half().float()
    return y + x16 @ w16.T  # (n, m)


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` that multiplies with :func:`int8_matmul`
    (``threshold`` ``inf``: int8 everywhere; LLM.int8 uses 6)."""

    def __init__(self, linear: nn.Linear, threshold: float = math.inf) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            raise TypeError("linear must be an nn.Linear without bias")
        _check_threshold(threshold)
        self.weight, self.threshold = linear.weight, threshold
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        y = _int8_matmul(flat.float(), self.weight.float(), self.threshold)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


@torch.no_grad()
def activation_absmax(
    model: nn.Module, ids: torch.Tensor, threshold: float = 6.0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r"""For every linear layer in ``model.blocks``: the largest $|x|$ of each input
    feature dimension over the tokens of ``ids``, and the share of tokens whose
    $|x|$ exceeds ``threshold`` in that dimension. ``{name: (absmax (in,),
    share (in,))}``."""
    check_tensor(ids, "ids", ndim=2, dtype=torch.long)
    check_number(threshold, "threshold", low=0, low_open=True)
    found, handles = {}, []
    for name, module in model.blocks.named_modules():
        if isinstance(module, nn.Linear):

            def hook(module, args, out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).abs()  # (tokens, in)
                found[name] = (x.amax(0), (x > threshold).float().mean(0))

            handles.append(module.register_forward_hook(hook))
    model(ids)
    for handle in handles:
        handle.remove()
    return found


# ---------------------------------------------------------------- QLoRA's NF4


def nf4_code() -> torch.Tensor:
    r"""The 16 values of the 4-bit NormalFloat (QLoRA, section 3): quantiles of
    $\mathcal N(0, 1)$ normalized to $[-1, 1]$, with an exact zero. Eight positive
    values $\Phi^{-1}(p)$ for $p$ evenly spaced from $\delta$ down to $\frac12$
    (excluded) and seven negative ones $-\Phi^{-1}(p)$ for seven $p$ from $\delta$
    to $\frac12$, $\delta = \frac12\big((1 - \frac1{30}) + (1 - \frac1{32})\big)$,
    all divided by the largest, plus 0. float32, ascending."""
    normal = torch.distributions.Normal(0.0, 1.0)
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))  # 0.9677...: the outermost p
    positive = normal.icdf(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    return (values / values.max()).sort().values.float()


def nf4_quantize(
    weight: torch.Tensor, block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""NF4: each block of ``block_size`` consecutive weights (in row-major order)
    divided by its absmax and rounded to the nearest of the 16 :func:`nf4_code`
    values. Returns ``(codes uint8 (out, in) in 0..15, absmax float32 (blocks,))``."""
    _check_weight(weight)
    check_positive_int(block_size, "block_size")
    if weight.numel() % block_size:
        raise ValueError(
            f"block_size={block_size} must divide {weight.numel()} weights"
        )
    blocks = weight.float().reshape(-1, block_size)  # (blocks, block_size)
    absmax = blocks.abs().amax(1).clamp_min(1e-12)  # (blocks,)
    code = nf4_code().to(weight.device)
    normed = blocks / absmax[:, None]  # in [-1, 1]
    # the nearest code value's index: how many midpoints between neighbours lie below
    codes = torch.zeros(normed.shape, dtype=torch.uint8, device=weight.device)
    for midpoint in ((code[1:] + code[:-1]) / 2).tolist():
        codes += normed > midpoint
    return codes.reshape(weight.shape), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    r"""$\hat w = \mathrm{NF4}[c] \cdot \mathrm{absmax}_{\text{block}}$, float32,
    the shape of ``codes``."""
    check_tensor(codes, "codes", ndim=2, dtype=torch.uint8)
    check_tensor(absmax, "absmax", ndim=1, floating=True)
    if codes.numel() % absmax.numel():
        raise ValueError("absmax must have one value per block of codes")
    return _nf4_dequantize(codes, absmax, nf4_code().to(codes.device))


def _nf4_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor
) -> torch.Tensor:
    blocks = code[codes.long()].reshape(absmax.numel(), -1)  # (blocks, block_size)
    return (blocks * absmax[:, None]).reshape(codes.shape)


class NF4Linear(nn.Linear):
    r"""A frozen, bias-free linear layer stored as NF4 codes (4 bits a weight) and
    one absmax per block of ``block_size``; ``weight`` is de-quantized on the fly at
    every use, so QLoRA's :class:`~dlabc.improvements.lora.LoRALinear` can wrap it
    like any ``nn.Linear``: $h = \mathrm{deq}(W^{\mathrm{NF4}}) x + s\,BAx$."""

    def __init__(self, linear: nn.Linear, block_size: int = 64) -> None:
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            raise TypeError("linear must be an nn.Linear without bias")
        nn.Module.__init__(self)  # no float weight of its own
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, absmax = nf4_quantize(linear.weight.detach(), block_size)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)
        self.register_buffer("code", nf4_code().to(codes.device))
        self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        return _nf4_dequantize(self.codes, self.absmax, self.code)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def frozen_bytes(self) -> int:
        """Bytes of the frozen weight: two codes a byte, a float32 absmax a block."""
        return self.codes.numel() // 2 + 4 * self.absmax.numel()


# ---------------------------------------------------------------- helpers


def swap_linears(
    model: nn.Module, make: object, blocks: range | None = None
) -> nn.Module:
    """Replace every linear layer in ``model.blocks`` (or in the blocks whose
    indices ``blocks`` gives) by ``make(linear)``, in place; returns ``model``."""
    if not callable(make):
        raise TypeError("make must be callable: nn.Linear -> nn.Module")
    if blocks is not None and not isinstance(blocks, range):
        raise TypeError(f"blocks must be a range of block indices, got {blocks!r}")
    for b in range(len(model.blocks)) if blocks is None else blocks:
        block = model.blocks[b]
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = block.get_submodule(parent)
            setattr(owner, child, make(getattr(owner, child)))
    return model


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    r"""$\exp\big(-\frac1{N}\sum_t \log p(x_{t+1} \mid x_{\le t})\big)$ over the
    rows of ``ids`` ``(B, T)``, each row one window."""
    check_tensor(ids, "ids", ndim=2, dtype=torch.long)
    if ids.shape[1] < 2:
        raise ValueError("ids must have at least two tokens a row")
    logits = model(ids[:, :-1])  # (B, T-1, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    return math.exp(loss.item())
