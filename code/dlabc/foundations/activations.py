"""Activation functions from scratch, written to stay exact over the whole float range.

Chapter: ``book/foundations/activations.md``.

References:
- Nair & Hinton (2010), ICML (ReLU); Maas, Hannun & Ng (2013) (Leaky ReLU);
  He et al. (2015), ICCV (PReLU); Clevert, Unterthiner & Hochreiter (2016), ICLR (ELU).
- Hendrycks & Gimpel (2016), *Gaussian Error Linear Units* (GELU, and its tanh form).
- Ramachandran, Zoph & Le (2017), *Searching for Activation Functions* (Swish/SiLU).
- Misra (2020), BMVC, *Mish*. Howard et al. (2019), ICCV, *MobileNetV3* (hard swish).
- Dauphin et al. (2017), ICML (GLU); Shazeer (2020), *GLU Variants Improve Transformer*
  (SwiGLU, GeGLU).

Each function takes a tensor and returns one of the same shape (the gated units halve
the ``dim`` axis); PyTorch's autograd differentiates them. Two rules keep them exact:
never let an unused branch of ``torch.where`` overflow (its gradient, ``inf * 0``,
would be ``nan``), and never subtract two nearly equal numbers (``1 + erf(x)`` for very
negative ``x``) when a function computes the small difference directly (``erfc``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "relu",
    "leaky_relu",
    "prelu",
    "elu",
    "sigmoid",
    "softplus",
    "gelu",
    "gelu_tanh",
    "silu",
    "mish",
    "hard_sigmoid",
    "hard_swish",
    "glu",
    "swiglu",
    "geglu",
    "GatedFeedForward",
    "Activation",
]


def _input(x: object) -> torch.Tensor:
    return check_tensor(x, "x", floating=True)


def relu(x: torch.Tensor) -> torch.Tensor:
    """$\\max(0, x)$; the gradient at 0 is 0, as in PyTorch."""
    x = _input(x)
    return torch.where(x <= 0, torch.zeros_like(x), x)  # nan stays nan


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """$x$ for $x > 0$, else $a x$: negative inputs keep a small gradient $a$."""
    x = _input(x)
    a = check_number(negative_slope, "negative_slope")
    return torch.where(x > 0, x, a * x)


def prelu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU with learned slopes: one ``weight``, or one per channel (axis 1)."""
    x = _input(x)
    check_tensor(weight, "weight", ndim=1, floating=True)
    if weight.numel() == 1:
        weight = weight.reshape(())  # one slope for every element
    else:
        if x.dim() < 2 or x.shape[1] != weight.numel():
            raise ValueError(
                f"weight has {weight.numel()} slopes but x has shape {tuple(x.shape)}; "
                "give one slope, or one per channel (axis 1)"
            )
        weight = weight.view((1, -1) + (1,) * (x.dim() - 2))  # (1, C, 1, ...)
    return torch.where(x > 0, x, weight * x)


def elu(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """$x$ for $x > 0$, else $\\alpha(e^x - 1)$: smooth, bounded below by $-\\alpha$."""
    x = _input(x)
    alpha = check_number(alpha, "alpha")
    # expm1 only of the non-positive part: e^100 would overflow, and inf * 0 = nan
    return torch.where(x > 0, x, alpha * torch.expm1(x.clamp(max=0)))


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """$1 / (1 + e^{-x})$, computed from $e^{-|x|} \\le 1$ so that nothing overflows."""
    x = _input(x)
    e_neg = torch.exp(-x.clamp(min=0))  # e^{-x} where x >= 0
    e_pos = torch.exp(x.clamp(max=0))  # e^{x} where x < 0
    return torch.where(x >= 0, 1 / (1 + e_neg), e_pos / (1 + e_pos))


def softplus(x: torch.Tensor) -> torch.Tensor:
    """$\\log(1 + e^x)$, as $x + \\log(1 + e^{-x})$ for $x > 0$: no overflow."""
    x = _input(x)
    positive = x.clamp(min=0)
    negative = x.clamp(max=0)
    return torch.where(
        x > 0,
        positive + torch.log1p(torch.exp(-positive)),
        torch.log1p(torch.exp(negative)),
    )


def gelu(x: torch.Tensor) -> torch.Tensor:
    """$x\\,\\Phi(x)$ with $\\Phi$ the standard normal CDF, $\\Phi(x) = \\tfrac12
    \\operatorname{erfc}(-x/\\sqrt2)$.

    ``erfc`` keeps full relative precision for very negative ``x``; the textbook
    $\\tfrac12(1 + \\operatorname{erf}(x/\\sqrt2))$ rounds to 0 below about $x = -5.5$
    in float32.
    """
    x = _input(x)
    return x * 0.5 * torch.erfc(-x / math.sqrt(2))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU used by BERT and GPT-2.

    $\\tfrac12 x\\,\\big(1 + \\tanh(\\sqrt{2/\\pi}\\,(x + 0.044715\\,x^3))\\big)$.
    """
    x = _input(x)
    inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1 + torch.tanh(inner))


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU or Swish: $x\\,\\sigma(x)$."""
    return _input(x) * sigmoid(x)


def mish(x: torch.Tensor) -> torch.Tensor:
    """$x \\tanh(\\operatorname{softplus}(x))$."""
    return _input(x) * torch.tanh(softplus(x))


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear sigmoid: 0 below -3, 1 above 3, $x/6 + 1/2$ between.

    The gradient is $1/6$ strictly between -3 and 3 and 0 elsewhere, as in PyTorch.
    """
    x = _input(x)
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    return torch.where(x <= -3, zeros, torch.where(x >= 3, ones, x / 6 + 0.5))


def hard_swish(x: torch.Tensor) -> torch.Tensor:
    """$x \\cdot$ hard sigmoid: 0 below -3, $x$ above 3, $x(x+3)/6$ between.

    Written piecewise so that the gradient at $\\pm 3$ is PyTorch's: the middle
    piece excludes both ends (gradient 0 at -3 and 1 at 3).
    """
    x = _input(x)
    middle = x * (x + 3) / 6
    return torch.where(x <= -3, torch.zeros_like(x), torch.where(x < 3, middle, x))


def _halves(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _input(x)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is not an axis of a {x.dim()}-D input")
    if x.shape[dim] % 2:
        raise ValueError(
            f"x must have an even size along dim {dim} to split in two halves, "
            f"got shape {tuple(x.shape)}"
        )
    a, b = x.chunk(2, dim)
    return a, b


def glu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Gated linear unit: $a \\odot \\sigma(b)$ for the halves $a, b$ of ``x``."""
    a, b = _halves(x, dim)
    return a * sigmoid(b)


def swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """SwiGLU: $a \\odot \\operatorname{SiLU}(b)$ for the halves $a, b$ of ``x``."""
    a, b = _halves(x, dim)
    return a * silu(b)


def geglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """GeGLU: $a \\odot \\operatorname{GELU}(b)$ for the halves $a, b$ of ``x``."""
    a, b = _halves(x, dim)
    return a * gelu(b)


def _check_gated(d_model: int, d_hidden: int, activation: object) -> None:
    check_positive_int(d_model, "d_model")
    check_positive_int(d_hidden, "d_hidden")
    if not callable(activation):
        raise TypeError(f"activation must be callable, got {activation!r}")


def _check_features(x: object, d_model: int) -> None:
    """Metadata only (dtype, shape): no sync with a GPU."""
    check_tensor(x, "x", floating=True)
    if x.shape[-1] != d_model:
        raise ValueError(
            f"x must end with d_model={d_model}, got shape {tuple(x.shape)}"
        )


class GatedFeedForward(nn.Module):
    """The feed-forward block of Llama-style models: ``down(act(gate(x)) * up(x))``.

    With ``act = silu`` it is SwiGLU, with ``gelu`` GeGLU, with ``sigmoid`` GLU. The
    names ``gate_proj``, ``up_proj``, ``down_proj`` are those of Hugging Face's Llama.
    ``x`` ``(..., d_model)`` -> ``(..., d_model)``; no biases, as in the paper.
    """

    def __init__(self, d_model: int, d_hidden: int, activation=silu) -> None:
        super().__init__()
        _check_gated(d_model, d_hidden, activation)
        self.activation = activation
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.gate_proj.in_features)
        hidden = self.activation(self.gate_proj(x)) * self.up_proj(x)  # (..., d_hidden)
        return self.down_proj(hidden)


class Activation(nn.Module):
    """Any of this module's functions as a layer, for ``nn.Sequential``."""

    def __init__(self, fn, **kwargs) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        self.fn, self.kwargs = fn, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **self.kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))
