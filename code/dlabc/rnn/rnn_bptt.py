"""A recurrent network in NumPy, and backpropagation through time (BPTT).

Chapter: ``book/rnn/rnn_bptt.md``.

References:
- Rumelhart, Hinton & Williams (1986), Nature, *Learning Representations by
  Back-Propagating Errors* (a recurrent net unrolled in time is a feed-forward net).
- Elman (1990), Cognitive Science, *Finding Structure in Time* (the simple recurrent
  network that ``torch.nn.RNN`` computes).
- Werbos (1990), Proc. IEEE, *Backpropagation Through Time: What It Does and How to
  Do It*.
- Bengio, Simard & Frasconi (1994), IEEE Trans. Neural Networks, *Learning Long-Term
  Dependencies with Gradient Descent is Difficult* (vanishing gradients).
- Pascanu, Mikolov & Bengio (2013), ICML, *On the Difficulty of Training Recurrent
  Neural Networks* (exploding gradients, clipping by the norm).

:class:`RNN` computes exactly what ``torch.nn.RNN`` computes, and its parameters carry
``nn.RNN``'s names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``,
then ``..._l1`` for the second layer), so weights copy over by name. Its ``backward`` is
BPTT written out by hand. Shapes: ``T`` time steps, ``N`` sequences in a batch, ``D``
input features, ``H`` hidden units, ``L`` layers, ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import numpy as np
import torch

from dlabc.checks import check_array, check_number, check_positive_int
from dlabc.foundations.numpy_network import Dense, softmax_cross_entropy
from dlabc.foundations.training_techniques import clip_grad_norm

__all__ = [
    "RNN",
    "clip_gradients",
    "train_tbptt",
    "delayed_sign_task",
    "set_spectral_radius",
    "input_gradient_norms",
]

NONLINEARITIES = ("tanh", "relu")


class RNN:
    r"""An Elman network of ``num_layers`` layers, computed like ``torch.nn.RNN``.

    Layer $l$ at time $t$, with $x^{(0)}_t = x_t$ and $x^{(l)}_t = h^{(l-1)}_t$ above:

    $h^{(l)}_t = \phi\big(x^{(l)}_t W_{ih}^{(l)\top} + b_{ih}^{(l)}
    + h^{(l)}_{t-1} W_{hh}^{(l)\top} + b_{hh}^{(l)}\big)$, $\phi$ = tanh or ReLU.

    ``forward(x, h_0)`` returns ``(output, h_n)``: the top layer's state at every step
    and every layer's last state. ``backward`` runs backpropagation through time and
    returns the gradients of all parameters, of the input and of ``h_0``. Parameters
    are float64 arrays in ``params``, initialised like ``nn.RNN``'s, uniformly in
    $[-1/\sqrt{H}, 1/\sqrt{H}]$; their gradients are in ``grads``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        seed: int = 0,
    ) -> None:
        self.input_size = check_positive_int(input_size, "input_size")
        self.hidden_size = check_positive_int(hidden_size, "hidden_size")
        self.num_layers = check_positive_int(num_layers, "num_layers")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}"
            )
        for name, flag in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.nonlinearity, self.bias, self.batch_first = nonlinearity, bias, batch_first
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(hidden_size)
        self.params: dict[str, np.ndarray] = {}
        for name, shape in self._shapes().items():
            self.params[name] = rng.uniform(-bound, bound, size=shape)
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self._cache: tuple | None = None

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in ``nn.RNN``'s order."""
        H, shapes = self.hidden_size, {}
        for layer in range(self.num_layers):
            d_in = self.input_size if layer == 0 else H
            shapes[f"weight_ih_l{layer}"] = (H, d_in)
            shapes[f"weight_hh_l{layer}"] = (H, H)
            if self.bias:
                shapes[f"bias_ih_l{layer}"] = (H,)
                shapes[f"bias_hh_l{layer}"] = (H,)
        return shapes

    def load_state_dict(self, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Copy parameters by name, e.g. from ``nn.RNN(...).state_dict()``."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        missing = sorted(set(self.params) - set(state))
        unexpected = sorted(set(state) - set(self.params))
        if missing or unexpected:
            raise KeyError(
                f"state does not fit: missing {missing}, unexpected {unexpected}"
            )
        for name, shape in self._shapes().items():
            value = state[name]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().double().numpy()
            value = check_array(value, f"state[{name!r}]")
            if value.shape != shape:
                raise ValueError(
                    f"state[{name!r}] must have shape {shape}, got {value.shape}"
                )
            self.params[name][...] = value  # in place: references stay valid

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the parameters, by ``nn.RNN``'s names."""
        return {name: p.copy() for name, p in self.params.items()}

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(parameter, gradient) pairs; ``backward`` fills the gradients in place."""
        return [(self.params[name], self.grads[name]) for name in self.params]

    def _phi(self, a: np.ndarray) -> np.ndarray:
        return np.tanh(a) if self.nonlinearity == "tanh" else np.maximum(a, 0.0)

    def _phi_prime(self, h: np.ndarray) -> np.ndarray:
        """$\\phi'(a)$ from $h = \\phi(a)$: $1 - h^2$ for tanh, $[h > 0]$ for ReLU."""
        return 1.0 - h**2 if self.nonlinearity == "tanh" else (h > 0).astype(h.dtype)

    def _layer(self, layer: int) -> tuple[np.ndarray, ...]:
        p, H = self.params, self.hidden_size
        zero = np.zeros(H)
        return (
            p[f"weight_ih_l{layer}"],
            p[f"weight_hh_l{layer}"],
            p.get(f"bias_ih_l{layer}", zero),
            p.get(f"bias_hh_l{layer}", zero),
        )

    def _time_major(self, x: np.ndarray, name: str, size: int) -> np.ndarray:
        """Check a sequence ``x`` and return it as ``(T, N, size)``."""
        check_array(x, name)
        layout = "(N, T, {})" if self.batch_first else "(T, N, {})"
        if x.ndim not in (2, 3) or x.shape[-1] != size:
            raise ValueError(
                f"{name} must have shape {layout.format(size)} or, unbatched, "
                f"(T, {size}); got {x.shape}"
            )
        if x.ndim == 2:  # unbatched: a batch of one
            x = x[:, None, :]
        elif self.batch_first:
            x = x.transpose(1, 0, 2)  # (N, T, size) -> (T, N, size)
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty sequence (no time step): {x.shape}")
        if x.shape[1] == 0:
            raise ValueError(f"{name} is an empty batch (no sequence): {x.shape}")
        return x

    def _state(
        self, h: np.ndarray | None, name: str, batch: int, unbatched: bool
    ) -> np.ndarray:
        """Check an ``h_0``-like state and return it as ``(L, N, H)``."""
        L, H = self.num_layers, self.hidden_size
        if h is None:
            return np.zeros((L, batch, H))
        check_array(h, name)
        expected = (L, H) if unbatched else (L, batch, H)
        if h.shape != expected:
            raise ValueError(
                f"{name} must have shape {expected} (num_layers, "
                f"{'' if unbatched else 'batch, '}hidden_size), got {h.shape}"
            )
        return h[:, None, :] if unbatched else h

    def _user_layout(self, seq: np.ndarray, unbatched: bool) -> np.ndarray:
        """``(T, N, .)`` back to the caller's layout."""
        if unbatched:
            return seq[:, 0]
        return seq.transpose(1, 0, 2) if self.batch_first else seq

    def forward(
        self, x: np.ndarray, h_0: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run the recurrence over ``x``; return ``(output, h_n)`` like ``nn.RNN``.

        ``x``: ``(T, N, D)``, or ``(N, T, D)`` with ``batch_first``, or ``(T, D)``
        unbatched. ``h_0``: ``(L, N, H)`` (``(L, H)`` unbatched), zeros by default.
        ``output``: the top layer's states, ``(T, N, H)`` in ``x``'s layout; ``h_n``:
        every layer's last state, ``(L, N, H)``. The states are kept for ``backward``.
        """
        unbatched = isinstance(x, np.ndarray) and x.ndim == 2
        x = self._time_major(x, "x", self.input_size)  # (T, N, D)
        T, N, _ = x.shape
        h_0 = self._state(h_0, "h_0", N, unbatched)  # (L, N, H)
        cache, inputs = [], x
        for layer in range(self.num_layers):
            W_ih, W_hh, b_ih, b_hh = self._layer(layer)
            # the input's share of every step at once: (T, N, D_l) @ (D_l, H)
            a_in = inputs @ W_ih.T + b_ih  # (T, N, H)
            hs = np.empty((T + 1, N, self.hidden_size))  # h_0 ... h_T
            hs[0] = h_0[layer]
            for t in range(T):  # the recurrence: one step after the other
                hs[t + 1] = self._phi(a_in[t] + hs[t] @ W_hh.T + b_hh)
            cache.append((inputs, hs))
            inputs = hs[1:]  # (T, N, H): the next layer's input
        self._cache = (cache, unbatched)
        h_n = np.stack([hs[-1] for _, hs in cache])  # (L, N, H)
        output = self._user_layout(inputs.copy(), unbatched)
        return output, (h_n[:, 0] if unbatched else h_n)

    def backward(
        self, grad_output: np.ndarray, grad_h_n: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        r"""Backpropagation through time, for the last ``forward``.

        ``grad_output`` is $\partial L/\partial\,$``output`` (the layout of ``output``),
        ``grad_h_n`` (optional) $\partial L/\partial\,$``h_n``. With $g_t$ the gradient
        that reaches $h_t$ from above (the loss, or the next layer), each layer goes
        back in time computing $\delta_t = \partial L/\partial a_t$:

        $\delta_t = \big(g_t + \delta_{t+1} W_{hh}\big) \odot \phi'(a_t)$

        and sums its uses over the steps (and the batch):

        $\partial L/\partial W_{hh} = \sum_t \delta_t^\top h_{t-1}, \quad
        \partial L/\partial W_{ih} = \sum_t \delta_t^\top x_t, \quad
        \partial L/\partial b = \sum_t \delta_t$

        The gradients that leave the layer are
        $\partial L/\partial x_t = \delta_t W_{ih}$ and
        $\partial L/\partial h_0 = \delta_1 W_{hh}$. Returns a dict with every
        parameter's gradient (also written into ``grads``), ``"input"`` and ``"h_0"``.
        """
        if self._cache is None:
            raise RuntimeError("backward needs a forward pass first")
        cache, unbatched = self._cache
        T, N = cache[0][1].shape[0] - 1, cache[0][1].shape[1]
        L, H = self.num_layers, self.hidden_size
        expected = (
            (T, H) if unbatched else ((N, T, H) if self.batch_first else (T, N, H))
        )
        check_array(grad_output, "grad_output")
        if grad_output.shape != expected:
            raise ValueError(
                f"grad_output must have the shape of output, {expected}, "
                f"got {grad_output.shape}"
            )
        grad_h_n = self._state(grad_h_n, "grad_h_n", N, unbatched)  # (L, N, H)
        g = self._time_major(grad_output, "grad_output", H)  # (T, N, H)
        grad_h_0 = np.empty((L, N, H))
        for layer in reversed(range(L)):
            inputs, hs = cache[layer]
            W_ih, W_hh, _, _ = self._layer(layer)
            phi_prime = self._phi_prime(hs[1:])  # (T, N, H)
            delta = np.empty((T, N, H))  # dL/da_t
            carry = grad_h_n[layer]  # dL/dh_t through later steps (N, H)
            for t in reversed(range(T)):  # back through time
                delta[t] = (g[t] + carry) * phi_prime[t]
                carry = delta[t] @ W_hh  # dL/dh_{t-1} through a_t: (N, H)
            grad_h_0[layer] = carry
            # sums over time and batch: (H, T*N) @ (T*N, D_l) -> (H, D_l)
            flat = delta.reshape(T * N, H)
            self.grads[f"weight_ih_l{layer}"][...] = flat.T @ inputs.reshape(T * N, -1)
            self.grads[f"weight_hh_l{layer}"][...] = flat.T @ hs[:-1].reshape(T * N, H)
            if self.bias:
                self.grads[f"bias_ih_l{layer}"][...] = flat.sum(0)
                self.grads[f"bias_hh_l{layer}"][...] = flat.sum(0)
            g = delta @ W_ih  # dL/d(this layer's input): (T, N, D_l)
        grads = {name: grad.copy() for name, grad in self.grads.items()}
        grads["input"] = self._user_layout(g, unbatched)
        grads["h_0"] = grad_h_0[:, 0] if unbatched else grad_h_0
        return grads


def _check_model(model: object) -> None:
    if not isinstance(model, RNN):
        kind = type(model)
        raise TypeError(
            f"model must be the NumPy RNN of dlabc.rnn.rnn_bptt, "
            f"got {kind.__module__}.{kind.__qualname__}"
        )


def clip_gradients(grads: Sequence[np.ndarray], max_norm: float) -> float:
    r"""Scale NumPy gradients in place by $\min(1, c/\lVert g\rVert)$; return the norm.

    $\lVert g\rVert$ is the global norm of all the arrays together, before clipping.
    The work is done by the book's ``clip_grad_norm`` (training techniques chapter),
    which reads each parameter's ``.grad``: every array is handed to it as the ``.grad``
    of a stand-in, a tensor that shares the array's memory.
    """
    if isinstance(grads, np.ndarray) or not isinstance(grads, Sequence):
        raise TypeError(f"grads must be a list of arrays, got {type(grads).__name__}")
    for i, grad in enumerate(grads):
        check_array(grad, f"grads[{i}]")
        if not grad.flags.writeable:
            raise ValueError(f"grads[{i}] must be writeable: it is clipped in place")
    return _clip(grads, max_norm)


def _clip(grads: Sequence[np.ndarray], max_norm: float) -> float:
    """:func:`clip_gradients` without its checks: clip in place, return the norm."""
    # each array becomes the .grad of a stand-in parameter, sharing its memory
    stand_ins = [SimpleNamespace(grad=torch.from_numpy(grad)) for grad in grads]
    return clip_grad_norm(stand_ins, max_norm)  # g <- g min(1, c / |g|)


def train_tbptt(
    model: RNN,
    head: Dense,
    x: np.ndarray,
    y: np.ndarray,
    *,
    chunk_length: int,
    lr: float,
    max_norm: float | None = None,
) -> dict[str, list[float]]:
    """Truncated BPTT along ``N`` parallel streams ``x`` ``(T, N, D)``, labels ``y``.

    ``y`` ``(T, N)`` holds a class for every step; ``head`` maps the top layer's state
    to the class logits. The streams are cut into chunks of ``chunk_length`` steps. Each
    chunk starts from the state the previous one ended in (the forward pass runs on
    uninterrupted), but the backward pass stops at the chunk's first step: the gradient
    for ``h_0`` is dropped. One SGD step with learning rate ``lr`` follows each chunk,
    after clipping the global gradient norm to ``max_norm`` when given. Returns, per
    chunk, the mean ``"loss"``, the ``"accuracy"`` (before the step, on steps the
    network had not trained on) and the ``"grad_norm"`` before clipping. Training
    stops early if the loss is no longer finite.
    """
    _check_model(model)
    if model.batch_first:
        raise ValueError("train_tbptt needs a time-major model (batch_first=False)")
    if not isinstance(head, Dense):
        raise TypeError(f"head must be a Dense layer, got {type(head).__name__}")
    H = model.hidden_size
    if head.W.shape[0] != H:
        raise ValueError(
            f"head must take the {H} hidden units, takes {head.W.shape[0]} inputs"
        )
    check_array(x, "x", ndim=3)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must hold at least one step of one stream, got {x.shape}")
    y = np.asarray(y)
    if y.shape != x.shape[:2] or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be integers of shape {x.shape[:2]}, got {y.shape}")
    check_positive_int(chunk_length, "chunk_length")
    lr = check_number(lr, "lr", low=0, low_open=True)
    if max_norm is not None:
        max_norm = check_number(max_norm, "max_norm", low=0, low_open=True)
    return _train_tbptt(model, head, x, y, chunk_length, lr, max_norm)


def _train_tbptt(
    model: RNN,
    head: Dense,
    x: np.ndarray,
    y: np.ndarray,
    chunk_length: int,
    lr: float,
    max_norm: float | None,
) -> dict[str, list[float]]:
    """The loop of :func:`train_tbptt`, for arguments it has checked."""
    H = model.hidden_size
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "grad_norm": []}
    h = None  # the state carried from chunk to chunk
    for start in range(0, len(x), chunk_length):
        xc, yc = x[start : start + chunk_length], y[start : start + chunk_length]
        out, h = model.forward(xc, h)  # (T_c, N, H); h: (L, N, H), carried on
        logits = head.forward(out.reshape(-1, H))  # (T_c * N, C)
        loss, grad_logits = softmax_cross_entropy(logits, yc.reshape(-1))
        grad_out = head.backward(grad_logits).reshape(out.shape)  # (T_c, N, H)
        model.backward(grad_out)  # the "h_0" gradient is dropped: the truncation
        pairs = model.parameters() + head.parameters()
        grads = [grad for _, grad in pairs]
        if max_norm is None:
            norm = float(np.sqrt(sum((grad**2).sum() for grad in grads)))
        else:
            norm = _clip(grads, max_norm)
        history["loss"].append(loss)
        history["accuracy"].append(float((logits.argmax(1) == yc.reshape(-1)).mean()))
        history["grad_norm"].append(norm)
        if not np.isfinite(loss):
            break
        for param, grad in pairs:
            param -= lr * grad  # in place: the model sees the new value
    return history


def delayed_sign_task(
    n_steps: int, batch_size: int, delay: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Streams of standard normal numbers, labelled 1 where the number ``delay`` steps
    back was positive, else 0.

    Returns ``x`` of shape ``(n_steps, batch_size, 1)`` and integer labels ``y`` of
    shape ``(n_steps, batch_size)``. The first ``delay`` labels look back before the
    stream starts, at numbers that are drawn but not shown: no network predicts them.
    """
    check_positive_int(n_steps, "n_steps")
    check_positive_int(batch_size, "batch_size")
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise ValueError(f"delay must be a non-negative int, got {delay!r}")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((delay + n_steps, batch_size))  # hidden start, then x
    x = z[delay:, :, None]  # (T, N, 1)
    y = (z[:n_steps] > 0).astype(np.int64)  # y_t = [x_{t - delay} > 0]: (T, N)
    return x, y


def set_spectral_radius(W: np.ndarray, rho: float) -> np.ndarray:
    r"""``W`` rescaled so that its largest eigenvalue modulus is ``rho``.

    The spectral radius $\rho(W) = \max_i |\lambda_i|$ sets how fast $W^k v$ grows or
    shrinks for large $k$: like $\rho^k$.
    """
    check_array(W, "W", ndim=2)
    if W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be square, got shape {W.shape}")
    rho = check_number(rho, "rho", low=0)
    radius = np.abs(np.linalg.eigvals(W)).max()
    if radius == 0:
        raise ValueError("W has spectral radius 0 (nilpotent): it cannot be rescaled")
    return W * (rho / radius)


def input_gradient_norms(
    model: RNN, x: np.ndarray, h_0: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    r"""How strongly the last state depends on the input ``k`` steps back.

    ``norms[k]`` is $\lVert\partial (u \cdot h_T)/\partial x_{T-k}\rVert$ for
    $k = 0, \dots, T-1$, with $h_T$ the top layer's last state and $u$ a random unit
    vector, as a root mean square over the batch. ``x`` is laid out as ``model``
    expects (see :meth:`RNN.forward`).
    """
    _check_model(model)
    output, _ = model.forward(x, h_0)
    u = np.random.default_rng(seed).standard_normal(model.hidden_size)
    u /= np.linalg.norm(u)
    batch_first = model.batch_first and x.ndim == 3
    grad_output = np.zeros_like(output)  # the loss u . h_T sees only the last step
    if batch_first:
        grad_output[:, -1] = u  # (N, T, H)
    else:
        grad_output[-1] = u  # (T, N, H), or (T, H) unbatched
    grad_x = model.backward(grad_output)["input"]
    if batch_first:
        grad_x = grad_x.transpose(1, 0, 2)  # (N, T, D) -> (T, N, D)
    squares = (grad_x**2).sum(-1)  # (T, N), or (T,) unbatched
    norms = np.sqrt(squares.mean(1) if squares.ndim == 2 else squares)  # (T,)
    return norms[::-1].copy()  # norms[k]: k steps before the last
