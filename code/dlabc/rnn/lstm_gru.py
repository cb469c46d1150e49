"""LSTM and GRU from their gate equations: cells, then multi-layer bidirectional layers.

Chapter: ``book/rnn/lstm_gru.md``.

References:
- Hochreiter & Schmidhuber (1997), Neural Computation, *Long Short-Term Memory*.
- Gers, Schmidhuber & Cummins (2000), Neural Computation, *Learning to Forget:
  Continual Prediction with LSTM* (the forget gate).
- Cho et al. (2014), EMNLP, *Learning Phrase Representations using RNN Encoder-Decoder
  for Statistical Machine Translation* (the GRU).
- Chung, Gulcehre, Cho & Bengio (2014), *Empirical Evaluation of Gated Recurrent Neural
  Networks on Sequence Modeling*.
- Jozefowicz, Zaremba & Sutskever (2015), ICML, *An Empirical Exploration of Recurrent
  Network Architectures* (a forget-gate bias of 1).
- Schuster & Paliwal (1997), IEEE Trans. Signal Processing, *Bidirectional Recurrent
  Neural Networks*.
- Tallec & Ollivier (2018), ICLR, *Can Recurrent Neural Networks Warp Time?* (chrono
  initialisation).

The parameter names, shapes and gate order are PyTorch's, so that a ``state_dict``
loads into ``nn.LSTM`` / ``nn.GRU`` (and back) unchanged: ``weight_ih`` stacks the input
weights of the gates ``[i, f, g, o]`` (LSTM) or ``[r, z, n]`` (GRU) into one
``(gates * H, I)`` matrix, ``weight_hh`` the recurrent ones, and a layer names them
``weight_ih_l{k}`` and ``weight_ih_l{k}_reverse``. Shapes: ``T`` time steps, ``B``
batch, ``I`` input features, ``H`` hidden units, ``L`` layers, ``D`` directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "LSTMCell",
    "GRUCell",
    "LSTM",
    "GRU",
    "init_forget_bias",
    "chrono_init",
    "recall_task",
    "SequenceClassifier",
]

Tensor = torch.Tensor


def _lstm_step(
    x_gates: Tensor,
    h: Tensor,
    c: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """One LSTM step from ``x_gates = W_ih x + b_ih`` ``(B, 4H)`` and ``h, c (B, H)``.

    Returns the new ``h``, ``c`` and the gates ``(i, f, g, o)``.
    """
    # all four gates' pre-activations at once: (W_i* x + b_i*) + W_h* h + b_h*
    pre = x_gates + F.linear(h, weight_hh, bias_hh)  # (B, 4H)
    i, f, g, o = pre.chunk(4, dim=-1)  # 4 x (B, H)
    i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)  # gates in (0, 1)
    g = torch.tanh(g)  # the candidate, in (-1, 1)
    c = f * c + i * g  # forget part of the old cell, write part of the candidate
    h = o * torch.tanh(c)  # expose part of the cell
    return h, c, (i, f, g, o)


def _gru_step(
    x_gates: Tensor,
    h: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One GRU step from ``x_gates = W_ih x + b_ih`` ``(B, 3H)`` and ``h (B, H)``.

    Returns the new ``h`` and the gates ``(r, z, n)``.
    """
    x_r, x_z, x_n = x_gates.chunk(3, dim=-1)  # 3 x (B, H)
    h_r, h_z, h_n = F.linear(h, weight_hh, bias_hh).chunk(3, dim=-1)  # 3 x (B, H)
    r = torch.sigmoid(x_r + h_r)  # reset gate
    z = torch.sigmoid(x_z + h_z)  # update gate
    n = torch.tanh(x_n + r * h_n)  # candidate: r scales (W_hn h + b_hn)
    h = (1 - z) * n + z * h  # z = 1 keeps the old state
    return h, (r, z, n)


def _init_uniform(module: nn.Module, hidden_size: int) -> None:
    """PyTorch's initialisation: every weight and bias from U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1 / math.sqrt(hidden_size)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-bound, bound)


def _check_input_size(x: Tensor, input_size: int) -> None:
    if x.shape[-1] != input_size:
        raise ValueError(
            f"x must have input_size={input_size} features on its last axis, "
            f"got shape {tuple(x.shape)}"
        )


def _check_state(
    state: object, name: str, shape: tuple[int, ...], x: Tensor, layout: str
) -> Tensor:
    """A hidden or cell state must have ``shape`` and the dtype and device of ``x``."""
    check_tensor(state, name, floating=True)
    if tuple(state.shape) != shape:
        raise ValueError(
            f"{name} must have shape {shape} {layout}, got {tuple(state.shape)}"
        )
    if state.dtype != x.dtype or state.device != x.device:
        raise TypeError(
            f"{name} must have the dtype and device of x ({x.dtype}, {x.device}), "
            f"got ({state.dtype}, {state.device})"
        )
    return state


class _Cell(nn.Module):
    """The parameters of one cell: ``weight_ih (G*H, I)``, ``weight_hh (G*H, H)``."""

    n_gates: int

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.input_size = check_positive_int(input_size, "input_size")
        self.hidden_size = check_positive_int(hidden_size, "hidden_size")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.bias = bias
        gh = self.n_gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gh, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gh, hidden_size))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gh))
            self.bias_hh = nn.Parameter(torch.empty(gh))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        _init_uniform(self, hidden_size)

    def _input(self, x: Tensor) -> tuple[Tensor, bool]:
        """``x`` as ``(B, I)``, and whether it came without a batch axis."""
        check_tensor(x, "x", ndim=(1, 2), floating=True)
        _check_input_size(x, self.input_size)
        if x.dim() == 2 and x.shape[0] == 0:
            raise ValueError(f"x must hold at least one example, got {tuple(x.shape)}")
        return (x.unsqueeze(0), True) if x.dim() == 1 else (x, False)

    def _state(self, state: object, name: str, x: Tensor, unbatched: bool) -> Tensor:
        if state is None:
            return x.new_zeros(len(x), self.hidden_size)
        shape = (self.hidden_size,) if unbatched else (len(x), self.hidden_size)
        _check_state(state, name, shape, x, "(batch, hidden_size)")
        return state.unsqueeze(0) if unbatched else state

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}"


class LSTMCell(_Cell):
    r"""One LSTM step, with PyTorch's parameters and gate order ``[i, f, g, o]``.

    $\begin{aligned}
    i &= \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi}),\\
    f &= \sigma(W_{if} x + b_{if} + W_{hf} h + b_{hf}),\\
    g &= \tanh(W_{ig} x + b_{ig} + W_{hg} h + b_{hg}),\\
    o &= \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho}),\\
    c' &= f \odot c + i \odot g, \qquad h' = o \odot \tanh(c').
    \end{aligned}$

    ``forward(x, (h, c))`` takes ``x`` of shape ``(B, I)`` (or ``(I,)``) and the state
    (zeros when ``None``) and returns the new ``(h', c')``, like ``nn.LSTMCell``.
    """

    n_gates = 4

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        x, unbatched = self._input(x)
        if state is None:
            state = (None, None)
        elif not (isinstance(state, tuple) and len(state) == 2):
            raise TypeError("state must be a tuple (h, c) or None")
        h = self._state(state[0], "h", x, unbatched)
        c = self._state(state[1], "c", x, unbatched)
        x_gates = F.linear(x, self.weight_ih, self.bias_ih)  # (B, 4H)
        h, c, _ = _lstm_step(x_gates, h, c, self.weight_hh, self.bias_hh)
        return (h[0], c[0]) if unbatched else (h, c)


class GRUCell(_Cell):
    r"""One GRU step, with PyTorch's parameters and gate order ``[r, z, n]``.

    $\begin{aligned}
    r &= \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}),\\
    z &= \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}),\\
    n &= \tanh\big(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn})\big),\\
    h' &= (1 - z) \odot n + z \odot h .
    \end{aligned}$

    The reset gate multiplies ``W_hn h + b_hn``, bias included (PyTorch's and cuDNN's
    form; Cho et al. apply it to ``h`` before the product). ``forward(x, h)`` takes
    ``x`` of shape ``(B, I)`` (or ``(I,)``) and returns the new ``h``, like
    ``nn.GRUCell``.
    """

    n_gates = 3

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        x, unbatched = self._input(x)
        h = self._state(h, "h", x, unbatched)
        x_gates = F.linear(x, self.weight_ih, self.bias_ih)  # (B, 3H)
        h, _ = _gru_step(x_gates, h, self.weight_hh, self.bias_hh)
        return h[0] if unbatched else h


class _RecurrentLayer(nn.Module):
    """A stack of ``num_layers`` recurrent layers, each optionally bidirectional.

    The parameters of layer ``k`` are ``weight_ih_l{k}``, ``weight_hh_l{k}``,
    ``bias_ih_l{k}``, ``bias_hh_l{k}``, and the same with ``_reverse`` for the backward
    direction: PyTorch's names, so ``state_dict`` is interchangeable with ``nn.LSTM`` /
    ``nn.GRU``.
    """

    n_gates: int
    gate_names: tuple[str, ...]
    has_cell: bool

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int(input_size, "input_size")
        self.hidden_size = check_positive_int(hidden_size, "hidden_size")
        self.num_layers = check_positive_int(num_layers, "num_layers")
        for name, flag in [
            ("bias", bias),
            ("batch_first", batch_first),
            ("bidirectional", bidirectional),
        ]:
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.bias, self.batch_first = bias, batch_first
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        gh = self.n_gates * hidden_size
        for layer in range(num_layers):
            # layer 0 reads x; the others read both directions' outputs, concatenated
            width = input_size if layer == 0 else self.num_directions * hidden_size
            for suffix in ("", "_reverse")[: self.num_directions]:
                end = f"_l{layer}{suffix}"
                self.register_parameter(
                    f"weight_ih{end}", nn.Parameter(torch.empty(gh, width))
                )
                self.register_parameter(
                    f"weight_hh{end}", nn.Parameter(torch.empty(gh, hidden_size))
                )
                if bias:
                    self.register_parameter(
                        f"bias_ih{end}", nn.Parameter(torch.empty(gh))
                    )
                    self.register_parameter(
                        f"bias_hh{end}", nn.Parameter(torch.empty(gh))
                    )
        _init_uniform(self, hidden_size)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bias={self.bias}, batch_first={self.batch_first}, "
            f"bidirectional={self.bidirectional}"
        )

    def _weights(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        end = f"_l{layer}" + ("_reverse" if direction else "")
        return tuple(
            getattr(self, name + end, None)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )

    def _check_lengths(self, lengths: object, batch: int, steps: int) -> Tensor:
        check_tensor(lengths, "lengths", ndim=1)
        if (
            lengths.is_floating_point()
            or lengths.is_complex()
            or lengths.dtype == torch.bool
        ):
            raise TypeError(
                f"lengths must be an integer tensor, got dtype {lengths.dtype}"
            )
        if len(lengths) != batch:
            raise ValueError(
                f"lengths must have one entry per sequence ({batch}), "
                f"got shape {tuple(lengths.shape)}"
            )
        if lengths.device.type != "cpu":  # value checks would sync the GPU
            return lengths
        if (lengths < 1).any():
            raise ValueError(
                f"every sequence must be non-empty: lengths must be >= 1, "
                f"got {lengths.tolist()}"
            )
        if (lengths > steps).any():
            raise ValueError(
                f"lengths must be at most the number of time steps ({steps}), "
                f"got {lengths.tolist()}"
            )
        return lengths

    def _run(
        self,
        x: Tensor,
        state: tuple[Tensor, ...] | None,
        lengths: Tensor | None,
        record: bool,
    ) -> tuple[Tensor, tuple[Tensor, ...], dict[str, Tensor]]:
        """Check everything, then run all layers and directions over ``x``."""
        if not isinstance(record, bool):
            raise TypeError(f"return_gates must be a bool, got {type(record).__name__}")
        check_tensor(x, "x", ndim=(2, 3), floating=True)
        _check_input_size(x, self.input_size)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)  # (T, 1, I)
        elif self.batch_first:
            x = x.transpose(0, 1)  # (B, T, I) -> (T, B, I)
        steps, batch = x.shape[:2]
        if steps == 0:
            raise ValueError(
                f"x must hold at least one time step, got shape {tuple(x.shape)}"
            )
        if batch == 0:
            raise ValueError(
                f"x must hold at least one sequence, got shape {tuple(x.shape)}"
            )
        n_states = 2 if self.has_cell else 1
        names = ("h0", "c0")[:n_states]
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if state is None:
            state = tuple(x.new_zeros(shape) for _ in names)
        else:
            layout = "(num_layers * num_directions, batch, hidden_size)"
            if unbatched:
                shape = (shape[0], shape[2])
                layout = "(num_layers * num_directions, hidden_size)"
            state = tuple(
                _check_state(s, name, shape, x, layout)
                for s, name in zip(state, names, strict=True)
            )
            if unbatched:
                state = tuple(s.unsqueeze(1) for s in state)
        mask = None  # (T, B, 1): True where a step lies inside its sequence
        if lengths is not None:
            if unbatched:
                raise ValueError("lengths needs batched input, x has no batch axis")
            lengths = self._check_lengths(lengths, batch, steps).to(x.device)
            mask = (torch.arange(steps, device=x.device)[:, None] < lengths)[..., None]
        finals: list[list[Tensor]] = [[] for _ in names]
        gates: dict[str, list[Tensor]] = {name: [] for name in self.gate_names}
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                out, last, trace = self._direction(
                    x,
                    tuple(s[k] for s in state),
                    self._weights(layer, direction),
                    mask,
                    reverse=direction == 1,
                    record=record,
                )
                outputs.append(out)
                for store, s in zip(finals, last, strict=True):
                    store.append(s)
                for name, values in trace.items():
                    gates[name].append(values)
            x = torch.cat(outputs, dim=-1)  # (T, B, D*H): the next layer's input
        finals_t = tuple(torch.stack(s) for s in finals)  # (L*D, B, H) each
        gates_t = {name: torch.stack(v) for name, v in gates.items() if v}
        if unbatched:
            x = x.squeeze(1)  # (T, D*H)
            finals_t = tuple(s.squeeze(1) for s in finals_t)
            gates_t = {name: v.squeeze(2) for name, v in gates_t.items()}
        elif self.batch_first:
            x = x.transpose(0, 1)  # (B, T, D*H)
            gates_t = {name: v.transpose(1, 2) for name, v in gates_t.items()}
        return x, finals_t, gates_t

    def _direction(
        self,
        x: Tensor,
        state: tuple[Tensor, ...],
        weights: tuple[Tensor | None, ...],
        mask: Tensor | None,
        reverse: bool,
        record: bool,
    ) -> tuple[Tensor, tuple[Tensor, ...], dict[str, Tensor]]:
        """One direction of one layer over ``x (T, B, W)``: outputs ``(T, B, H)``.

        With a ``mask``, a step past a sequence's end leaves its state unchanged and
        outputs zeros. Running backwards, the state therefore stays at its initial
        value until the sequence's last real step, where the reverse pass begins.
        """
        weight_ih, weight_hh, bias_ih, bias_hh = weights
        # the input's share of every gate does not depend on the state: one product
        # for all time steps, before the loop (T, B, G*H)
        # (unbind, not x_gates[t]: indexing would cost a (T, B, G*H) gradient per step)
        x_gates = F.linear(x, weight_ih, bias_ih).unbind(0)
        steps = range(len(x) - 1, -1, -1) if reverse else range(len(x))
        outputs: list[Tensor] = [x.new_empty(0)] * len(x)
        trace: dict[str, list[Tensor]] = {name: [] for name in self.gate_names}
        for t in steps:
            new, gates = self._step(x_gates[t], state, weight_hh, bias_hh)
            if mask is not None:  # keep the old state where t >= length
                new = tuple(
                    torch.where(mask[t], n, s) for n, s in zip(new, state, strict=True)
                )
                gates = tuple(g * mask[t] for g in gates)
            state = new
            outputs[t] = state[0] if mask is None else state[0] * mask[t]
            if record:
                for name, g in zip(self.gate_names, gates, strict=True):
                    trace[name].append(g)
        traced = {
            name: torch.stack(v[::-1] if reverse else v)  # (T, B, H), in time order
            for name, v in trace.items()
            if v
        }
        return torch.stack(outputs), state, traced


class LSTM(_RecurrentLayer):
    r"""A multi-layer, optionally bidirectional LSTM, computing like ``nn.LSTM``.

    Every direction of every layer runs :class:`LSTMCell`'s equations over time,
    $(h_t, c_t) = \mathrm{LSTMCell}(x_t, (h_{t-1}, c_{t-1}))$; the backward direction
    reads the sequence from its end, and a bidirectional layer outputs
    $[\overrightarrow{h}_t; \overleftarrow{h}_t]$, which the next layer reads.

    ``forward(x, (h0, c0), lengths)``: ``x`` is ``(T, B, I)`` (``(B, T, I)`` with
    ``batch_first``, or ``(T, I)`` unbatched), the states ``(L*D, B, H)`` (zeros when
    ``None``). ``lengths`` (``(B,)`` integers) treats step ``t >= lengths[b]`` of
    sequence ``b`` as padding, as ``pack_padded_sequence`` does: its output is zero and
    the final states are those of each sequence's last real step. Returns
    ``(output, (h_n, c_n))`` with ``output`` ``(T, B, D*H)`` and the states
    ``(L*D, B, H)``; with ``return_gates=True`` also a dict of the gates ``i, f, g, o``
    and the cell ``c``, each ``(L*D, T, B, H)`` (``(L*D, B, T, H)`` with
    ``batch_first``), zero at padded steps.
    """

    n_gates = 4
    gate_names = ("i", "f", "g", "o", "c")
    has_cell = True

    def _step(
        self,
        x_gates: Tensor,
        state: tuple[Tensor, ...],
        weight_hh: Tensor,
        bias_hh: Tensor | None,
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, ...]]:
        h, c, gates = _lstm_step(x_gates, *state, weight_hh, bias_hh)
        return (h, c), (*gates, c)

    def forward(
        self,
        x: Tensor,
        state: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | None = None,
        *,
        return_gates: bool = False,
    ) -> tuple:
        if state is not None and not (isinstance(state, tuple) and len(state) == 2):
            raise TypeError("state must be a tuple (h0, c0) or None")
        output, (h_n, c_n), gates = self._run(x, state, lengths, return_gates)
        return (output, (h_n, c_n), gates) if return_gates else (output, (h_n, c_n))


class GRU(_RecurrentLayer):
    r"""A multi-layer, optionally bidirectional GRU, computing like ``nn.GRU``.

    Every direction of every layer runs :class:`GRUCell`'s equations over time,
    $h_t = \mathrm{GRUCell}(x_t, h_{t-1})$. ``forward(x, h0, lengths)`` takes the same
    shapes as :class:`LSTM` and returns ``(output, h_n)``; with ``return_gates=True``
    also a dict of the gates ``r, z, n``, each ``(L*D, T, B, H)``.
    """

    n_gates = 3
    gate_names = ("r", "z", "n")
    has_cell = False

    def _step(
        self,
        x_gates: Tensor,
        state: tuple[Tensor, ...],
        weight_hh: Tensor,
        bias_hh: Tensor | None,
    ) -> tuple[tuple[Tensor], tuple[Tensor, ...]]:
        h, gates = _gru_step(x_gates, *state, weight_hh, bias_hh)
        return (h,), gates

    def forward(
        self,
        x: Tensor,
        h0: Tensor | None = None,
        lengths: Tensor | None = None,
        *,
        return_gates: bool = False,
    ) -> tuple:
        state = None if h0 is None else (h0,)
        output, (h_n,), gates = self._run(x, state, lengths, return_gates)
        return (output, h_n, gates) if return_gates else (output, h_n)


def init_forget_bias(module: nn.Module, value: float = 1.0) -> nn.Module:
    """Set every LSTM forget-gate bias of ``module`` to ``value``; return ``module``.

    The forget gate is the second quarter ``[H:2H]`` of the stacked biases. PyTorch adds
    ``bias_ih`` and ``bias_hh``, so the first gets ``value`` and the second zero.
    Works on :class:`LSTM`, :class:`LSTMCell`, ``nn.LSTM``, ``nn.LSTMCell`` and any
    module containing them. Jozefowicz et al. (2015) found ``value = 1`` important.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    value = check_number(value, "value")
    kinds = (LSTM, LSTMCell, nn.LSTM, nn.LSTMCell)
    lstms = [m for m in module.modules() if isinstance(m, kinds)]
    if not lstms:
        raise ValueError(
            f"module contains no LSTM or LSTMCell: {type(module).__name__}"
        )
    with torch.no_grad():
        for lstm in lstms:
            hidden = lstm.hidden_size
            for name, p in lstm.named_parameters(recurse=False):
                if name.startswith("bias_ih"):
                    p[hidden : 2 * hidden] = value
                elif name.startswith("bias_hh"):
                    p[hidden : 2 * hidden] = 0.0
    return module


def recall_task(
    n: int,
    delay: int,
    n_symbols: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Remember the first symbol of a sequence for ``delay`` steps of distraction.

    Each sequence has ``delay + 1`` steps of one-hot symbols from ``n_symbols``; the
    first is the one to recall (the label), the ``delay`` that follow are random
    distractors from the same alphabet, and a last input channel marks the first step.
    Returns ``X`` of shape ``(n, delay + 1, n_symbols + 1)`` (float32) and ``y`` of
    shape ``(n,)`` (int64). Chance accuracy is ``1 / n_symbols``.
    """
    check_positive_int(n, "n")
    check_positive_int(delay, "delay")
    check_positive_int(n_symbols, "n_symbols")
    if n_symbols < 2:
        raise ValueError(f"n_symbols must be at least 2, got {n_symbols}")
    symbols = torch.randint(n_symbols, (n, delay + 1), generator=generator)
    X = F.one_hot(symbols, n_symbols + 1).float()  # (n, delay + 1, n_symbols + 1)
    X[:, 0, n_symbols] = 1.0  # the marker: "remember this one"
    return X, symbols[:, 0]


class SequenceClassifier(nn.Module):
    """A recurrent layer reads ``(B, T, I)``; a linear layer classifies its last state.

    ``kind`` is ``"lstm"`` or ``"gru"`` (this module's layers) or ``"rnn"`` (PyTorch's
    vanilla tanh ``nn.RNN``, the network of the previous chapter). The logits are
    ``head(h_T)``, with ``h_T`` the last layer's final hidden state: ``(B, n_classes)``.
    """

    def __init__(
        self, kind: str, input_size: int, hidden_size: int, n_classes: int
    ) -> None:
        super().__init__()
        layers: dict[str, Callable[..., nn.Module]] = {
            "lstm": LSTM,
            "gru": GRU,
            "rnn": nn.RNN,
        }
        if kind not in layers:
            raise ValueError(f"kind must be one of {tuple(layers)}, got {kind!r}")
        check_positive_int(input_size, "input_size")
        check_positive_int(hidden_size, "hidden_size")
        check_positive_int(n_classes, "n_classes")
        self.kind = kind
        self.rnn = layers[kind](input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor(x, "x", ndim=3, floating=True)
        _, state = self.rnn(x)  # state: h_n, or (h_n, c_n) for the LSTM
        h_n = state[0] if isinstance(state, tuple) else state  # (1, B, H)
        return self.head(h_n[-1])  # (B, n_classes)


def chrono_init(
    module: nn.Module, max_delay: int, generator: torch.Generator | None = None
) -> nn.Module:
    r"""Tallec & Ollivier's chrono initialisation of the keep gates; return ``module``.

    Each unit draws $u \sim U(1, T_{max} - 1)$ and gets a keep-gate bias $\log u$, so
    that it starts out forgetting on a time scale of about $u$ steps: the LSTM's
    forget gate $f$ gets $\log u$ and its input gate $i$ gets $-\log u$; the GRU's
    update gate $z$ (which keeps the old state) gets $\log u$. ``bias_hh`` is zeroed
    on those gates.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    check_positive_int(max_delay, "max_delay")
    if max_delay < 3:
        raise ValueError(f"max_delay must be at least 3, got {max_delay}")
    kinds = (LSTM, LSTMCell, nn.LSTM, nn.LSTMCell, GRU, GRUCell, nn.GRU, nn.GRUCell)
    found = [m for m in module.modules() if isinstance(m, kinds)]
    if not found:
        raise ValueError(f"module contains no LSTM or GRU: {type(module).__name__}")
    with torch.no_grad():
        for m in found:
            hidden = m.hidden_size
            lstm = isinstance(m, (LSTM, LSTMCell, nn.LSTM, nn.LSTMCell))
            for name, p in m.named_parameters(recurse=False):
                keep = p[hidden : 2 * hidden]  # f for the LSTM, z for the GRU
                if name.startswith("bias_hh"):
                    keep.zero_()
                    if lstm:
                        p[:hidden] = 0.0
                elif name.startswith("bias_ih"):
                    u = torch.rand(hidden, generator=generator) * (max_delay - 2) + 1
                    log_u = torch.log(u).to(p)  # time scales between 1 and T_max - 1
                    keep.copy_(log_u)
                    if lstm:
                        p[:hidden] = -log_u  # the input gate starts mostly closed
    return module
