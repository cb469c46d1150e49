"""Sharded data parallelism: the three stages of ZeRO, written with reduce-scatter and
all-gather, and the memory each rank keeps.

Chapter: ``book/scaling/zero_fsdp.md``.

References:
- Rajbhandari, Rasley, Ruwase & He (2020), *ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models* (the stages P_os, P_os+g, P_os+g+p, their memory
  formulas and their communication volume).
- Zhao et al. (2023), *PyTorch FSDP: Experiences on Scaling Fully Sharded Data
  Parallel* (the same idea as stage 3 inside PyTorch; its ``fully_shard`` is the
  reference the tests and the chapter compare with).
- Kingma & Ba (2015), *Adam: A Method for Stochastic Optimization* (the optimizer whose
  two moment vectors ZeRO shards first).

Every rank sees the model's parameters as one flat vector of Psi numbers (padded to a
multiple of the number of ranks N_d, so that it cuts into N_d equal shards; rank ``r``
owns shard ``r``). :class:`ZeRO` trains it with Adam at stage 0 (plain data
parallelism), 1, 2 or 3; :func:`zero_worker` runs every stage, and PyTorch's own
``fully_shard``, on one process group (``dlabc.distributed.launch``), and
:func:`zero_memory` gives the paper's formula for the bytes per rank. On a cluster::

    torchrun --nproc-per-node 8 -m dlabc.distributed \\
        dlabc.scaling.zero_fsdp:zero_demo 512
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.distributed import device

__all__ = [
    "make_model",
    "padded_size",
    "adam_update",
    "ZeRO",
    "zero_memory",
    "fsdp_training",
    "zero_worker",
    "digit_batches",
    "zero_demo",
]

STAGES = (0, 1, 2, 3)


def make_model(hidden: int = 128, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """The chapter's model: a two-hidden-layer MLP for the 8x8 digits (64 inputs, 10
    classes)."""
    check_positive_int(hidden, "hidden")
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, 10),
    ).to(dtype)


def padded_size(numel: int, world_size: int) -> int:
    """``numel`` rounded up to a multiple of ``world_size``: the flat vector's length
    once padded to ``world_size`` equal shards."""
    check_positive_int(numel, "numel")
    check_positive_int(world_size, "world_size")
    return -(-numel // world_size) * world_size


def adam_update(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    r"""One Adam step (Kingma & Ba, algorithm 1), in place, on the tensors ``w``
    (parameters), ``g`` (their gradient), ``m`` and ``v`` (the two moments), all of the
    same shape; ``t`` counts steps from 1.

    $m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2,$

    $w_t = w_{t-1} - \eta\,\hat m_t / (\sqrt{\hat v_t} + \epsilon)$

    with $\hat m_t = m_t / (1 - \beta_1^t)$ and $\hat v_t = v_t / (1 - \beta_2^t)$.
    Every operation is element-wise: a rank can update any slice of the parameters
    with the same slices of ``g``, ``m`` and ``v``, which is why the optimizer state
    shards so easily.
    """
    beta1, beta2 = betas
    m.mul_(beta1).add_(g, alpha=1 - beta1)  # first moment
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # second moment
    m_hat = m / (1 - beta1**t)  # bias corrections
    v_hat = v / (1 - beta2**t)
    w.sub_(lr * m_hat / (v_hat.sqrt() + eps))


class ZeRO:
    """One rank's part of data-parallel training with Adam at ZeRO stage 0, 1, 2 or 3,
    on the model's parameters seen as one flat vector."""

    def __init__(self, model: nn.Module, stage: int, lr: float = 1e-3) -> None:
        r"""The parameters become one flat vector $w$ of $\Psi$ numbers, padded to
        $N_d S$ and cut into $N_d$ shards of $S$; this rank owns shard ``rank``. What
        the rank keeps from one step to the next:

        - stage 0 (plain data parallelism): all of $w$, its gradient, Adam's $m$, $v$;
        - stage 1 ($P_{os}$): all of $w$ and its gradient; $m$, $v$ of its shard;
        - stage 2 ($P_{os+g}$): all of $w$; gradient, $m$, $v$ of its shard;
        - stage 3 ($P_{os+g+p}$): its shard of everything; the whole $w$ exists only
          while a forward or backward pass needs it.
        """
        _check_zero(model, stage, lr)
        self.model, self.stage, self.lr = model, stage, lr
        self.rank, self.N_d = dist.get_rank(), dist.get_world_size()
        w = nn.utils.parameters_to_vector(model.parameters()).detach()  # (Psi,)
        self.psi = w.numel()
        if stage > 0:  # pad to N_d equal shards
            w = F.pad(w, (0, padded_size(self.psi, self.N_d) - self.psi))
        self.S = w.numel() // self.N_d if stage > 0 else w.numel()  # shard size
        if stage == 3:  # keep only our shard of the parameters
            self.w_shard = w.chunk(self.N_d)[self.rank].clone()  # (S,)
        else:
            self.w = w.clone().requires_grad_()  # (Psi,) or (N_d S,)
        if stage >= 2:  # and of the gradient
            self.g_shard = torch.zeros_like(w[: self.S])  # (S,)
        self.m = torch.zeros_like(w[: self.S])  # Adam's moments: (S,) from stage 1 on
        self.v = torch.zeros_like(w[: self.S])
        self.t = 0
        self.volume = 0  # numbers sent through collectives, in the paper's counting

    def loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of the model whose parameters are the flat vector ``w``."""
        shapes = {name: p.shape for name, p in self.model.named_parameters()}
        views, start = {}, 0
        for name, shape in shapes.items():  # views into w, no copy
            views[name] = w[start : start + shape.numel()].view(shape)
            start += shape.numel()
        logits = torch.func.functional_call(self.model, views, (x,))  # (B, 10)
        return F.cross_entropy(logits, y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step on this rank's part ``x``, ``y`` of the batch; returns the
        rank's loss."""
        self.t += 1
        if self.stage == 3:  # gather the whole vector for the forward pass, ...
            w = self._all_gather(self.w_shard).requires_grad_()  # (N_d S,)
            loss = self.loss(w, x, y)
            _free(w)  # ... drop it, ...
            self._all_gather(self.w_shard, into=w)  # ... gather it again for backward
        else:
            w, self.w.grad = self.w, None
            loss = self.loss(w, x, y)
        loss.backward()
        with torch.no_grad():
            if self.stage == 0:  # all-reduce: every rank gets the average gradient
                self._all_reduce(w.grad)
                adam_update(w, w.grad, self.m, self.v, self.t, self.lr)
                return loss.item()
            g = self.g_shard if self.stage >= 2 else torch.empty_like(self.m)
            self._reduce_scatter(w.grad, out=g)  # the average gradient of our shard
            if self.stage >= 2:
                w.grad = None  # stages 2-3 keep only the gradient's shard
            if self.stage == 3:
                _free(w)
                adam_update(self.w_shard, g, self.m, self.v, self.t, self.lr)
            else:  # update our shard, then everyone gets everyone's
                w_shard = w.chunk(self.N_d)[self.rank]  # (S,), a view into w
                adam_update(w_shard, g, self.m, self.v, self.t, self.lr)
                self._all_gather(w_shard.clone(), into=w)
        return loss.item()

    def _all_reduce(self, g: torch.Tensor) -> None:
        """``g`` becomes the average of ``g`` over the ranks."""
        dist.all_reduce(g)  # the sum
        g /= self.N_d
        self.volume += 2 * g.numel()  # = a reduce-scatter plus an all-gather

    def _reduce_scatter(self, whole: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` (S,) becomes shard ``rank`` of the average of ``whole`` (N_d S,)."""
        dist.reduce_scatter(out, list(whole.chunk(self.N_d)))  # the sum of our shard
        out /= self.N_d
        self.volume += whole.numel()

    def _all_gather(
        self, shard: torch.Tensor, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The whole vector (N_d S,) from every rank's ``shard`` (S,)."""
        if into is None:
            into = shard.new_empty(self.N_d * shard.numel())
        else:
            into.untyped_storage().resize_(into.numel() * into.element_size())
        # .data: writing the gathered numbers is not an edit autograd should see
        dist.all_gather(list(into.data.chunk(self.N_d)), shard)
        self.volume += into.numel()
        return into

    def parameters(self) -> torch.Tensor:
        """The whole parameter vector (Psi,), without padding (gathered at stage 3:
        every rank must call it)."""
        if self.stage == 3:
            with torch.no_grad():
                w = self._all_gather(self.w_shard)
            self.volume -= w.numel()  # not part of training
            return w[: self.psi]
        return self.w.detach()[: self.psi].clone()

    def held_bytes(self) -> dict[str, int]:
        """The bytes of the tensors this rank keeps between two steps, by kind."""
        if self.stage == 3:
            parameters = [self.w_shard]
        else:
            parameters = [self.w]
        if self.stage >= 2:
            gradients = [self.g_shard]
        else:
            gradients = [self.w.grad] if self.w.grad is not None else []
        kinds = {
            "parameters": parameters,
            "gradients": gradients,
            "optimizer": [self.m, self.v],
        }
        return {
            k: sum(t.numel() * t.element_size() for t in ts) for k, ts in kinds.items()
        }


def _free(w: torch.Tensor) -> None:
    """Release the memory of ``w`` (its storage shrinks to nothing; autograd's saved
    views of it stay valid and see the numbers again once it is refilled)."""
    w.untyped_storage().resize_(0)


def _check_zero(model: object, stage: object, lr: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError("model must have parameters")
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    check_number(lr, "lr", low=0, low_open=True)
    if not dist.is_initialized():
        raise RuntimeError(
            "ZeRO needs an initialised process group: run it inside a worker of "
            "dlabc.distributed.launch or under torchrun"
        )


def zero_memory(
    psi: float,
    n_d: int,
    stage: int,
    param_bytes: int = 2,
    grad_bytes: int = 2,
    K: int = 12,
) -> float:
    r"""The paper's bytes per rank for $\Psi$ parameters on $N_d$ ranks at ``stage``.

    Parameters take ``param_bytes`` per number, gradients ``grad_bytes``, and the
    optimizer state $K$ bytes per parameter. Mixed-precision Adam (the paper's
    defaults): 2 + 2 + 12, since the optimizer keeps a float32 copy of the parameters,
    $m$ and $v$. Float32 Adam: 4 + 4 + 8. Each stage divides one more term by $N_d$:

    $(2 + 2 + K)\Psi \;\to\; (2 + 2)\Psi + \frac{K\Psi}{N_d} \;\to\;
    2\Psi + \frac{(2 + K)\Psi}{N_d} \;\to\; \frac{(2 + 2 + K)\Psi}{N_d}$
    """
    check_number(psi, "psi", low=0)
    check_positive_int(n_d, "n_d")
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    for value, name in ((param_bytes, "param_bytes"), (grad_bytes, "grad_bytes")):
        check_positive_int(value, name)
    check_number(K, "K", low=0)
    sharded = (stage >= 3, stage >= 2, stage >= 1)  # parameters, gradients, optimizer
    terms = (param_bytes, grad_bytes, K)
    return psi * sum(b / n_d if s else b for b, s in zip(terms, sharded, strict=True))


def fsdp_training(
    model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, lr: float
) -> dict[str, object]:
    """The reference: PyTorch's ``fully_shard`` (FSDP2) on every layer and on the model,
    trained with ``torch.optim.Adam`` on this rank's part of each batch.

    Returns the whole parameter vector after training (``full_tensor()`` gathers each
    sharded parameter), the rank's losses, and the bytes of what the rank keeps.
    """
    from torch.distributed.fsdp import fully_shard

    rank, n_d = dist.get_rank(), dist.get_world_size()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for x, y in zip(xs, ys, strict=True):
        part = slice(rank * len(x) // n_d, (rank + 1) * len(x) // n_d)
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x[part]), y[part])
        loss.backward()  # FSDP reduce-scatters the average gradient
        optimizer.step()
        losses.append(loss.item())
    params = list(model.parameters())
    local = [p.to_local() for p in params]
    states = [
        s.to_local()
        for st in optimizer.state.values()
        for k, s in st.items()
        if k != "step"
    ]
    held = {
        "parameters": sum(t.numel() * t.element_size() for t in local),
        "gradients": sum(
            p.grad.to_local().numel() * p.grad.element_size() for p in params
        ),
        "optimizer": sum(t.numel() * t.element_size() for t in states),
    }
    w = torch.cat([p.full_tensor().detach().reshape(-1) for p in params]).cpu()
    return {"parameters": w, "losses": losses, "held": held}


def zero_worker(
    rank: int,
    world_size: int,
    state: dict[str, torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    lr: float,
    memory_hidden: int = 0,
    timed_steps: int = 0,
    fsdp: bool = True,
) -> dict[str, object]:
    """Everything the chapter measures, in one launch: run in each of ``world_size``
    processes.

    Trains the model whose weights are ``state`` (a ``make_model`` state dict) for
    ``len(xs)`` steps at each ZeRO stage, and with FSDP when ``fsdp``; batch ``t`` is
    ``xs[t]`` (B, 64), ``ys[t]`` (B,), of which rank ``r`` takes the ``r``-th of
    ``world_size`` equal parts. Returns per stage the final parameters, the rank's
    losses and the collectives' volume per step; with ``memory_hidden`` > 0, the bytes
    each stage keeps for a float32 model of that width after ``timed_steps`` (at least
    one) steps, and the median seconds of those steps.
    """
    _check_worker(state, xs, ys, lr, memory_hidden, timed_steps, world_size)
    hidden = state["0.weight"].shape[0]
    dtype = state["0.weight"].dtype
    dev = device()  # this rank's GPU under NCCL, else the CPU
    xs, ys = xs.to(dev), ys.to(dev)
    result: dict[str, object] = {"parameters": {}, "losses": {}, "volume": {}}
    for stage in STAGES:
        model = make_model(hidden, dtype).to(dev)
        model.load_state_dict(state)
        zero = ZeRO(model, stage, lr)
        losses = []
        for x, y in zip(xs, ys, strict=True):
            part = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
            losses.append(zero.step(x[part], y[part]))
        result["volume"][stage] = zero.volume / len(xs)
        result["losses"][stage] = losses
        result["parameters"][stage] = zero.parameters().cpu()
        result["psi"] = zero.psi
    if fsdp:
        model = make_model(hidden, dtype).to(dev)
        model.load_state_dict(state)
        result["fsdp"] = fsdp_training(model, xs, ys, lr)
    if memory_hidden:
        result.update(
            _memory_and_time(rank, world_size, memory_hidden, timed_steps, xs, ys)
        )
    return result


def _memory_and_time(rank, world_size, hidden, steps, xs, ys) -> dict[str, object]:
    """Bytes kept and seconds per step of each stage for a float32 model of width
    ``hidden``."""
    torch.manual_seed(0)
    x = xs[0].float()
    part = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    out = {"held": {}, "seconds": {}}
    for stage in STAGES:
        zero = ZeRO(make_model(hidden, torch.float32).to(x.device), stage, 1e-3)
        seconds = []
        for _ in range(max(steps, 1)):
            dist.barrier()
            start = time.perf_counter()
            zero.step(x[part], ys[0][part])
            seconds.append(time.perf_counter() - start)  # .item() in step() waits
        out["held"][stage] = zero.held_bytes()
        out["seconds"][stage] = sorted(seconds)[len(seconds) // 2]
        out["memory_psi"] = zero.psi
    return out


def _check_worker(state, xs, ys, lr, memory_hidden, timed_steps, world_size) -> None:
    if not isinstance(state, dict) or "0.weight" not in state:
        raise TypeError("state must be the state dict of a make_model() model")
    check_tensor(xs, "xs", ndim=3, floating=True)
    check_tensor(ys, "ys", ndim=2)
    if xs.shape[:2] != ys.shape or xs.shape[2] != 64:
        raise ValueError(
            f"xs must be (steps, B, 64) and ys (steps, B), got {tuple(xs.shape)} and "
            f"{tuple(ys.shape)}"
        )
    if xs.shape[1] % world_size:
        raise ValueError(
            f"the batch size B={xs.shape[1]} must be a multiple of world_size="
            f"{world_size}"
        )
    check_number(lr, "lr", low=0, low_open=True)
    for value, name in ((memory_hidden, "memory_hidden"), (timed_steps, "timed_steps")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def digit_batches(
    steps: int, batch: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` batches of ``batch`` 8x8 digits, in float64: ``xs`` (steps, batch, 64)
    and ``ys`` (steps, batch); epochs of a random order seeded by ``seed``."""
    from dlabc.data import load_digits

    check_positive_int(steps, "steps")
    check_positive_int(batch, "batch")
    X, y = load_digits()
    X, y = torch.tensor(X, dtype=torch.float64), torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch // len(X))
    order = torch.cat([torch.randperm(len(X), generator=g) for _ in range(epochs)])
    order = order[: steps * batch]
    return X[order].view(steps, batch, 64), y[order].view(steps, batch)


def zero_demo(
    rank: int,
    world_size: int,
    hidden: int = 128,
    steps: int = 30,
    batch: int = 64,
    lr: float = 0.01,
    seed: int = 0,
) -> dict[str, object]:
    """:func:`zero_worker` on the digits, with a summary small enough to print: what
    ``torchrun ... -m dlabc.distributed dlabc.scaling.zero_fsdp:zero_demo`` shows.

    Returns Psi, each stage's (and FSDP's) last loss on this rank, the largest
    difference of each one's parameters to stage 0's, and per stage the bytes this
    rank keeps and the milliseconds of a step for a float32 model of width ``hidden``.
    """
    torch.manual_seed(seed)
    state = make_model(hidden).state_dict()
    xs, ys = digit_batches(steps, batch, seed)
    result = zero_worker(rank, world_size, state, xs, ys, lr, hidden, 5, True)
    runs = {**result["parameters"], "FSDP": result["fsdp"]["parameters"]}
    losses = {**result["losses"], "FSDP": result["fsdp"]["losses"]}
    w0 = result["parameters"][0]
    return {
        "psi": result["psi"],
        "last loss": {k: round(v[-1], 6) for k, v in losses.items()},
        "difference to stage 0": {
            k: float((w - w0).abs().max()) for k, w in runs.items()
        },
        "bytes kept": {k: sum(v.values()) for k, v in result["held"].items()},
        "ms per step": {k: round(1000 * v, 2) for k, v in result["seconds"].items()},
    }
