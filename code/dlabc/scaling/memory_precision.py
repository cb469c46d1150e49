"""Memory and precision: what training holds in memory, activation checkpointing, and
mixed precision with bfloat16 and float16 with loss scaling.

Chapter: ``book/scaling/memory_precision.md``.

References:
- Rajbhandari, Rasley, Ruwase & He (2020), *ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models* (the 16 bytes per parameter of mixed-precision Adam,
  :func:`training_memory`).
- Korthikanti, Casper, Lym, McAfee, Andersch, Shoeybi & Catanzaro (2022), *Reducing
  Activation Recomputation in Large Transformer Models* (the activations of one
  transformer layer, :func:`activation_memory`).
- Chen, Xu, Zhang & Guestrin (2016), *Training Deep Nets with Sublinear Memory Cost*
  (activation checkpointing, :class:`Checkpoint`, :func:`checkpoint_sequential`).
- Micikevicius et al. (2018), *Mixed Precision Training* (float32 master weights, loss
  scaling, :class:`DynamicLossScaler`).
- Kalamkar et al. (2019), *A Study of BFLOAT16 for Deep Learning Training* (bfloat16:
  float32's range with fewer mantissa bits, :func:`float_formats`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "training_memory",
    "activation_memory",
    "state_bytes",
    "master_weights",
    "master_step",
    "Checkpoint",
    "checkpoint",
    "checkpoint_sequential",
    "deep_mlp",
    "float_formats",
    "underflow_fraction",
    "DynamicLossScaler",
    "train_scaled",
]

# ---------------------------------------------------------------------------------
# 1. The memory budget of training with Adam
# ---------------------------------------------------------------------------------

#: Bytes per parameter that training with Adam keeps, by precision (ZeRO, section 3.1).
BYTES_PER_PARAMETER = {
    # float32 weights, float32 gradients, Adam's first and second moments in float32
    "fp32": {"weights": 4, "gradients": 4, "adam_moments": 8, "master_weights": 0},
    # 16-bit weights and gradients, float32 master weights and moments
    "mixed": {"weights": 2, "gradients": 2, "adam_moments": 8, "master_weights": 4},
}


def training_memory(n_params: int, precision: str = "mixed") -> dict[str, int]:
    r"""Bytes that training a model of ``n_params`` parameters with Adam holds besides
    its activations: weights, gradients, Adam's two moments $m$ and $v$, and in mixed
    precision a float32 master copy of the weights.

    $M = N\,(2 + 2 + 4 + 4 + 4) = 16N$ bytes in mixed precision,
    $M = N\,(4 + 4 + 4 + 4) = 16N$ bytes in float32.

    Returns the bytes of each part and their ``"total"``.
    """
    check_positive_int(n_params, "n_params")
    if precision not in BYTES_PER_PARAMETER:
        raise ValueError(
            f"precision must be one of {sorted(BYTES_PER_PARAMETER)}, got {precision!r}"
        )
    parts = {k: b * n_params for k, b in BYTES_PER_PARAMETER[precision].items()}
    return {**parts, "total": sum(parts.values())}


def activation_memory(
    seq_len: int,
    batch: int,
    hidden: int,
    n_heads: int,
    n_layers: int = 1,
    recompute: bool = False,
) -> int:
    r"""Bytes of activations a GPT-style transformer keeps for its backward pass, with
    16-bit activations and no model parallelism (Korthikanti et al., 2022, eq. 1):

    $M_{\text{act}} = L\, s b h \left(34 + 5 \frac{a s}{h}\right)$

    for sequence length $s$, batch $b$, hidden size $h$, $a$ heads and $L$ layers; the
    $5as/h$ term is, for every head, the $s \times s$ softmax output, its dropout mask
    and the dropped-out probabilities that multiply $V$.
    With ``recompute=True`` (every layer checkpointed) only each layer's input stays:
    $2sbh$ bytes per layer.
    """
    for name, value in (
        ("seq_len", seq_len),
        ("batch", batch),
        ("hidden", hidden),
        ("n_heads", n_heads),
        ("n_layers", n_layers),
    ):
        check_positive_int(value, name)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    s, b, h, a = seq_len, batch, hidden, n_heads
    per_layer = 2 * s * b * h if recompute else s * b * h * 34 + 5 * a * s * s * b
    return n_layers * per_layer


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_model_optimizer(model: object, optimizer: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What training state actually holds, counted tensor by tensor
    (``numel * element_size``): the model's weights and gradients, the optimizer's
    parameters when they are other tensors than the model's (float32 master weights),
    and the optimizer's state (Adam's ``exp_avg`` and ``exp_avg_sq`` as
    ``"adam_moments"``; the rest of its state, such as Adam's one-number step
    counters or SGD's momentum buffers, as ``"other_state"``)."""
    _check_model_optimizer(model, optimizer)
    params = list(model.parameters())
    own = {id(p) for p in params}
    optimized = [p for g in optimizer.param_groups for p in g["params"]]
    master = [p for p in optimized if id(p) not in own]
    state = [t for s in optimizer.state.values() for t in s.values()]
    moments = [
        s[key]
        for s in optimizer.state.values()
        for key in ("exp_avg", "exp_avg_sq")
        if key in s
    ]
    return {
        "weights": _tensor_bytes(params),
        "gradients": _tensor_bytes([p.grad for p in params if p.grad is not None]),
        "adam_moments": _tensor_bytes(moments),
        "master_weights": _tensor_bytes(master),
        "master_gradients": _tensor_bytes(
            [p.grad for p in master if p.grad is not None]
        ),
        "other_state": _tensor_bytes(state) - _tensor_bytes(moments),
    }


def master_weights(model: nn.Module) -> list[torch.Tensor]:
    """Float32 copies of ``model``'s (16-bit) parameters, in order: the weights that
    the optimizer updates in mixed precision."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [p.detach().float().clone() for p in model.parameters()]


def master_step(
    model: nn.Module, master: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer
) -> None:
    """One mixed-precision update (Micikevicius et al., 2018, section 3.1): the 16-bit
    gradients go to the float32 master weights, the optimizer updates those, and the
    16-bit weights are rounded from them for the next forward pass."""
    params = list(model.parameters())
    for p, w in zip(params, master, strict=True):
        w.grad = p.grad.float()  # the 16-bit gradient, in float32
    optimizer.step()  # Adam on the float32 master weights
    with torch.no_grad():
        for p, w in zip(params, master, strict=True):
            w.grad = None  # the float32 gradient is not kept
            p.copy_(w)  # round to 16 bits


# ---------------------------------------------------------------------------------
# 2. Activation checkpointing
# ---------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> torch.Tensor:
    """The random-number state that dropout on ``device`` draws from."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state: torch.Tensor) -> Iterator[None]:
    """Run a block from the random-number ``state`` of ``device`` (so dropout draws the
    same masks again), and leave the generator as it was before the block."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if cuda:
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


class Checkpoint(torch.autograd.Function):
    r"""Run ``function(*inputs)`` without keeping its intermediate activations; the
    backward pass runs the forward again to rebuild them (Chen et al., 2016).

    ``forward`` computes under ``torch.no_grad()``, so autograd records nothing inside
    ``function``, and saves only the inputs (the parameters are kept anyway), and the
    random-number state, so that dropout draws the same masks twice. ``backward``
    recomputes the output with autograd on and backpropagates the incoming gradient
    through it, to the inputs and to the parameters.
    """

    @staticmethod
    def forward(ctx, function: Callable, n_inputs: int, *tensors: torch.Tensor):
        ctx.function, ctx.n_inputs = function, n_inputs
        ctx.device = tensors[0].device
        ctx.rng_state = _rng_state(ctx.device)  # what dropout will draw from
        ctx.save_for_backward(*tensors)  # the inputs, then the parameters
        with torch.no_grad():  # no graph, no activations kept
            return function(*tensors[:n_inputs])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = ctx.saved_tensors
        inputs = [
            x.detach().requires_grad_(x.requires_grad) for x in saved[: ctx.n_inputs]
        ]
        tensors = [*inputs, *saved[ctx.n_inputs :]]  # the inputs, then the parameters
        with _replayed_rng(ctx.device, ctx.rng_state), torch.enable_grad():
            output = ctx.function(*inputs)  # recompute, recording the graph this time
        needed = [t for t in tensors if t.requires_grad]
        grads = iter(
            torch.autograd.grad(output, needed, grad_output, allow_unused=True)
        )
        return None, None, *(next(grads) if t.requires_grad else None for t in tensors)


def checkpoint(function: Callable, *inputs: torch.Tensor) -> torch.Tensor:
    """``function(*inputs)`` (one tensor out), its activations recomputed in the
    backward pass; ``function`` is an ``nn.Module`` (whose parameters get gradients)
    or a function of its inputs alone."""
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    if not inputs:
        raise ValueError("checkpoint needs at least one input tensor")
    for i, x in enumerate(inputs):
        check_tensor(x, f"inputs[{i}]")
    params = tuple(function.parameters()) if isinstance(function, nn.Module) else ()
    return Checkpoint.apply(function, len(inputs), *inputs, *params)


def _segments(layers: Sequence[nn.Module], segments: int) -> list[nn.Sequential]:
    """Cut ``layers`` into ``segments`` consecutive runs of (nearly) equal length."""
    bounds = [round(k * len(layers) / segments) for k in range(segments + 1)]
    return [
        nn.Sequential(*layers[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _run_segments(
    segments: list[nn.Sequential], x: torch.Tensor, keep_last: bool
) -> torch.Tensor:
    for k, segment in enumerate(segments):
        if keep_last and k == len(segments) - 1:
            x = segment(x)  # its activations are needed at once: no point recomputing
        else:
            x = checkpoint(segment, x)  # only x, the segment's input, is kept
    return x


def checkpoint_sequential(
    layers: Sequence[nn.Module] | nn.Sequential,
    segments: int,
    x: torch.Tensor,
    keep_last: bool = False,
) -> torch.Tensor:
    r"""Run ``layers`` on ``x`` in ``segments`` checkpointed pieces.

    Memory: the input of every segment, plus the activations of one segment while it
    is recomputed in the backward pass. With $L$ layers in $k$ segments that is about
    $k\,m_{in} + (L/k)\,m_{layer}$, least at $k = \sqrt{L m_{layer} / m_{in}}$: it grows
    as $\sqrt L$ instead of $L$.
    ``keep_last=True`` runs the last segment normally, as
    ``torch.utils.checkpoint.checkpoint_sequential`` does.
    """
    layers = list(layers)
    check_positive_int(segments, "segments")
    if not layers:
        raise ValueError("layers must hold at least one module")
    if segments > len(layers):
        raise ValueError(
            f"segments must be at most the number of layers ({len(layers)}), "
            f"got {segments}"
        )
    check_tensor(x, "x")
    return _run_segments(_segments(layers, segments), x, keep_last)


class _Block(nn.Module):
    """One residual MLP layer: ``x + W2 gelu(W1 x)``."""

    def __init__(self, width: int, expansion: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, expansion * width)
        self.down = nn.Linear(expansion * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def deep_mlp(n_layers: int, width: int, expansion: int = 2) -> nn.Sequential:
    """A stack of ``n_layers`` residual MLP layers of ``width`` features (each keeps
    several activations of ``expansion * width`` features for its backward pass)."""
    check_positive_int(n_layers, "n_layers")
    check_positive_int(width, "width")
    check_positive_int(expansion, "expansion")
    return nn.Sequential(*(_Block(width, expansion) for _ in range(n_layers)))


# ---------------------------------------------------------------------------------
# 3. Floating-point formats, underflow and loss scaling
# ---------------------------------------------------------------------------------


def float_formats(
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16),
) -> list[dict[str, object]]:
    """The facts of each floating-point format, from ``torch.finfo``: bits, exponent
    and mantissa bits, the largest number, machine epsilon (the gap after 1), the
    smallest normal number and the smallest subnormal one."""
    rows = []
    for dtype in dtypes:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"dtypes must be floating-point torch dtypes, got {dtype!r}"
            )
        info = torch.finfo(dtype)
        mantissa = -round(math.log2(info.eps))  # stored fraction bits
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "bits": info.bits,
                "exponent_bits": info.bits - 1 - mantissa,
                "mantissa_bits": mantissa,
                "max": info.max,
                "eps": info.eps,
                "smallest_normal": info.smallest_normal,
                "smallest_subnormal": info.smallest_normal * info.eps,
            }
        )
    return rows


def underflow_fraction(
    values: torch.Tensor | Sequence[torch.Tensor],
    dtype: torch.dtype = torch.float16,
    scale: float = 1.0,
) -> float:
    """The share of the non-zero entries of ``values`` that become zero when multiplied
    by ``scale`` and rounded to ``dtype``."""
    tensors = [values] if isinstance(values, torch.Tensor) else list(values)
    for i, t in enumerate(tensors):
        check_tensor(t, f"values[{i}]", floating=True)
    check_number(scale, "scale", low=0, low_open=True)
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    nonzero = flat[flat != 0]
    if nonzero.numel() == 0:
        raise ValueError("values hold no non-zero entry")
    return ((nonzero * scale).to(dtype) == 0).double().mean().item()


def _check_scaler_args(
    init_scale: object,
    growth_factor: object,
    backoff_factor: object,
    growth_interval: object,
) -> None:
    check_number(init_scale, "init_scale", low=0, low_open=True)
    check_number(growth_factor, "growth_factor", low=1, low_open=True)
    check_number(backoff_factor, "backoff_factor", low=0, high=1, low_open=True)
    check_positive_int(growth_interval, "growth_interval")


class DynamicLossScaler:
    r"""Dynamic loss scaling (Micikevicius et al., 2018, section 3.2), with the
    interface of ``torch.amp.GradScaler``.

    Multiply the loss by $S$ before ``backward()``, so that small gradients stay above
    float16's underflow threshold; divide the gradients by $S$ before the update. If
    any gradient is ``inf`` or ``nan``, skip the update and halve $S$; after
    ``growth_interval`` good steps in a row, double $S$.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        _check_scaler_args(init_scale, growth_factor, backoff_factor, growth_interval)
        self.loss_scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # updates in a row without inf or nan
        self.found_inf = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale the gradients, and update unless one is not finite; return whether
        the update ran."""
        grads = [
            p.grad
            for g in optimizer.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        for grad in grads:
            grad.mul_(1.0 / self.loss_scale)  # exact when the scale is a power of two
        self.found_inf = not all(torch.isfinite(grad).all() for grad in grads)
        if not self.found_inf:
            optimizer.step()
        return not self.found_inf

    def update(self) -> None:
        """Halve the scale after an overflow; double it after ``growth_interval`` good
        steps."""
        if self.found_inf:
            self.loss_scale *= self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.loss_scale *= self.growth_factor
                self.good_steps = 0

    def get_scale(self) -> float:
        return self.loss_scale


def _check_scaler(scaler: object) -> None:
    if not isinstance(scaler, (DynamicLossScaler, torch.amp.GradScaler)):
        raise TypeError(
            "scaler must be a DynamicLossScaler or torch.amp.GradScaler, got "
            f"{type(scaler).__name__}"
        )


def train_scaled(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: DynamicLossScaler | torch.amp.GradScaler,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype = torch.float16,
) -> dict[str, list[float]]:
    """Train ``model`` on ``batches`` (inputs, class labels) with cross-entropy, its
    forward and backward passes in ``dtype`` under ``torch.autocast``, with loss
    scaling by ``scaler`` (ours or ``torch.amp.GradScaler``, the same four calls).

    Returns the ``"scale"`` used at each step and the ``"loss"`` (unscaled)."""
    _check_scaler(scaler)
    device_type = next(model.parameters()).device.type
    history: dict[str, list[float]] = {"scale": [], "loss": []}
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        history["scale"].append(float(scaler.get_scale()))
        history["loss"].append(loss.item())
        scaler.scale(loss).backward()  # the gradients of S times the loss
        scaler.step(optimizer)  # unscale; skip the update if a gradient overflowed
        scaler.update()  # halve S after an overflow, double it after growth_interval good steps
    return history
