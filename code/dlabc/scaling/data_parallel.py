"""Data parallelism on ``torch.distributed``: a ring all-reduce written from
point-to-point messages, a hand-written data-parallel training step, and PyTorch's
``DistributedDataParallel`` with a communication hook that counts its bytes.

Chapter: ``book/scaling/data_parallel.md``.

References:
- Patarasuk & Yuan (2009), *Bandwidth optimal all-reduce algorithms for clusters of
  workstations* (the ring all-reduce, reduce-scatter then all-gather, and why no
  all-reduce sends fewer bytes per process).
- Sergeev & Del Balso (2018), *Horovod: fast and easy distributed deep learning in
  TensorFlow* (the ring all-reduce for training, after Baidu's implementation).
- Goyal et al. (2017), *Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour*
  (synchronous data-parallel SGD: the gradient of the global batch is the mean of the
  workers' gradients).
- Li et al. (2020), *PyTorch Distributed: Experiences on Accelerating Data Parallel
  Training* (``DistributedDataParallel``: broadcast at construction, gradient buckets,
  all-reduce overlapped with the backward pass, communication hooks).

Every function that communicates runs inside an initialised process group (one process
per rank; :func:`dlabc.distributed.launch` or ``torchrun`` starts them) and uses only
``torch.distributed``'s point-to-point messages and collectives, so it runs unchanged
on gloo (CPU) and NCCL (GPUs). The module-level ``*_worker`` functions are what the
chapter launches: each returns a dict of measurements to the parent process.
"""

import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dlabc.checks import check_positive_int, check_tensor
from dlabc.distributed import device

__all__ = [
    "ring_all_reduce",
    "ring_bytes",
    "naive_bytes",
    "broadcast_parameters",
    "average_gradients",
    "data_parallel_step",
    "counting_all_reduce_hook",
    "mlp",
    "collectives_worker",
    "training_worker",
    "ring_check_worker",
]


# ----------------------------------------------------------------------------------
# The ring all-reduce
# ----------------------------------------------------------------------------------


def _exchange(
    send: torch.Tensor, like: torch.Tensor, right: int, left: int, group
) -> torch.Tensor:
    """One step of a ring: send ``send`` to the right neighbour while receiving, from
    the left one, a tensor shaped like ``like``. ``isend`` does not wait, so every rank
    can send and receive at once without deadlock."""
    request = dist.isend(send, dst=right, group=group)
    received = torch.empty_like(like)
    dist.recv(received, src=left, group=group)
    request.wait()
    return received


def _ring_reduce_scatter(
    chunks: list[torch.Tensor], rank: int, right: int, left: int, group
) -> int:
    """Phase 1, $p - 1$ steps: at step $s$, rank $r$ sends its partial sum of chunk
    $r - s - 1$ to the right and adds the left neighbour's partial sum of chunk
    $r - s - 2$ (indices mod $p$) to its own. Afterwards chunk $r$ of rank $r$ holds
    the sum over all ranks. Returns the bytes this rank sent."""
    p, sent = len(chunks), 0
    for s in range(p - 1):
        send, receive = chunks[(rank - s - 1) % p], chunks[(rank - s - 2) % p]
        receive += _exchange(send, receive, right, left, group)  # in place
        sent += send.numel() * send.element_size()
    return sent


def _ring_all_gather(
    chunks: list[torch.Tensor], rank: int, right: int, left: int, group
) -> int:
    """Phase 2, $p - 1$ steps: at step $s$, rank $r$ sends its finished chunk
    $r - s$ to the right and overwrites chunk $r - s - 1$ with the left neighbour's.
    Afterwards every rank holds every summed chunk. Returns the bytes sent."""
    p, sent = len(chunks), 0
    for s in range(p - 1):
        send, receive = chunks[(rank - s) % p], chunks[(rank - s - 1) % p]
        receive.copy_(_exchange(send, receive, right, left, group))
        sent += send.numel() * send.element_size()
    return sent


def _ring_all_reduce(flat: torch.Tensor, group) -> int:
    """Sum the 1-D tensor ``flat`` over the ranks of ``group``, in place: cut it into
    $p$ chunks, reduce-scatter them around the ring, then all-gather them. Each rank
    sends $2(p-1)$ messages of about $N/p$ elements. Returns the bytes it sent."""
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    right = dist.get_global_rank(group, (rank + 1) % p)  # ranks of the whole job
    left = dist.get_global_rank(group, (rank - 1) % p)
    chunks = list(flat.tensor_split(p))  # p views of flat, sizes differ by <= 1
    sent = _ring_reduce_scatter(chunks, rank, right, left, group)
    return sent + _ring_all_gather(chunks, rank, right, left, group)


def ring_all_reduce(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> int:
    """Replace ``tensor`` on every rank of ``group`` (default: all ranks) by the sum
    of the ranks' tensors, as ``dist.all_reduce(tensor)`` does, with a ring of
    ``dist.isend``/``dist.recv`` messages. Returns the number of bytes this rank sent.

    ``tensor`` must be contiguous (it is reduced in place through a flat view).
    """
    check_tensor(tensor, "tensor")
    if not tensor.is_contiguous():
        raise ValueError("tensor must be contiguous: it is reduced in place")
    if not dist.is_initialized():
        raise RuntimeError(
            "ring_all_reduce needs an initialised process group "
            "(run it under dlabc.distributed.launch or torchrun)"
        )
    group = dist.group.WORLD if group is None else group
    if dist.get_world_size(group) == 1:
        return 0
    return _ring_all_reduce(tensor.view(-1), group)


def ring_bytes(n_elements: int, world_size: int, bytes_per_element: int = 4) -> float:
    """The bytes each rank sends in a ring all-reduce of ``n_elements``:
    $2\\,(p-1)/p \\cdot N \\cdot$ ``bytes_per_element`` (exact when $p$ divides $N$)."""
    check_positive_int(n_elements, "n_elements")
    check_positive_int(world_size, "world_size")
    check_positive_int(bytes_per_element, "bytes_per_element")
    return 2 * (world_size - 1) / world_size * n_elements * bytes_per_element


def naive_bytes(n_elements: int, world_size: int, bytes_per_element: int = 4) -> int:
    """The bytes rank 0 sends when every rank sends its whole tensor to rank 0, which
    sums and sends the result back to each: $(p - 1)\\,N \\cdot$
    ``bytes_per_element`` (and as many received)."""
    check_positive_int(n_elements, "n_elements")
    check_positive_int(world_size, "world_size")
    check_positive_int(bytes_per_element, "bytes_per_element")
    return (world_size - 1) * n_elements * bytes_per_element


# ----------------------------------------------------------------------------------
# A data-parallel training step, by hand
# ----------------------------------------------------------------------------------


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Give every rank the parameters of rank ``src``, so that all replicas start equal
    (``DistributedDataParallel`` does the same when it is constructed)."""
    with torch.no_grad():
        for parameter in model.parameters():
            dist.broadcast(parameter, src=src)


def average_gradients(model: nn.Module) -> int:
    r"""Replace each gradient by its mean over the ranks,
    $\frac{1}{p}\sum_r \nabla L_r = \nabla L$: flatten all of them into one buffer
    (one "bucket"), sum it with the ring, divide by $p$, copy back. Returns the bytes
    this rank sent."""
    grads = [parameter.grad for parameter in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (N,)
    sent = ring_all_reduce(flat)  # sum over the p ranks
    flat /= dist.get_world_size()  # ... and the mean
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(averaged.view_as(g))
    return sent


def data_parallel_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, float]:
    """One synchronous data-parallel SGD step on this rank's shard ``(x, y)``: the
    forward and backward pass on the shard, the gradients averaged over the ranks, and
    the same optimizer step everywhere. Returns the shard's loss, the bytes sent and
    the seconds spent computing and communicating."""
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)  # L_r: the mean over this rank's b examples
    loss.backward()  # the gradient of L_r
    _synchronize(x)
    computed = time.perf_counter()
    sent = average_gradients(model)  # (1/p) sum_r grad L_r = grad L
    _synchronize(x)
    communicated = time.perf_counter()
    optimizer.step()  # the same gradient and state on every rank: the same step
    loss_value = loss.item()
    compute_s = computed - start + time.perf_counter() - communicated
    return {
        "loss": loss_value,
        "bytes": sent,
        "compute_s": compute_s,
        "communicate_s": communicated - computed,
    }


def _synchronize(x: torch.Tensor) -> None:
    """Wait for the device's queued work before reading a clock (CUDA is asynchronous;
    on the CPU every operation has finished when it returns)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


# ----------------------------------------------------------------------------------
# DistributedDataParallel, with a hook that counts what it all-reduces
# ----------------------------------------------------------------------------------


def counting_all_reduce_hook(
    state: dict[str, list[int]], bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: what DDP does by default (divide the bucket by $p$,
    all-reduce it), plus a record in ``state`` of each bucket's index and bytes."""
    buffer = bucket.buffer()  # the flat gradients of the bucket's parameters
    state["index"].append(bucket.index())
    state["bytes"].append(buffer.numel() * buffer.element_size())
    buffer.div_(dist.get_world_size())
    work = dist.all_reduce(buffer, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


# ----------------------------------------------------------------------------------
# The model and the workers the chapter launches
# ----------------------------------------------------------------------------------


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """A two-layer perceptron, the model the chapter trains in parallel."""
    for value, name in ((d_in, "d_in"), (d_hidden, "d_hidden"), (d_out, "d_out")):
        check_positive_int(value, name)
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out)
    )


def _gathered(value: torch.Tensor) -> list[torch.Tensor]:
    """``value`` of every rank, with ``dist.all_gather``."""
    out = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(out, value)
    return out


def collectives_worker(rank: int, world_size: int, n_elements: int) -> dict:
    """The chapter's first launch: the four collectives on small tensors, our ring
    against ``dist.all_reduce`` in the groups of the first 2, 3, ... ``world_size``
    ranks, on float64 and int64 tensors of several sizes up to ``n_elements``, with the
    bytes the ring sent for each; keys ``(p, dtype, numel)``."""
    dev = device()
    powers = [10.0**i for i in range(world_size)]
    x = (rank + 1) * torch.tensor(powers, device=dev)  # (p,): 1, 10, 100, ... times r+1
    demo = {"start": x.clone()}
    demo["broadcast"] = x.clone()
    dist.broadcast(demo["broadcast"], src=0)
    demo["all_reduce"] = x.clone()
    dist.all_reduce(demo["all_reduce"])
    demo["reduce_scatter"] = torch.empty(1, device=dev)
    dist.reduce_scatter(demo["reduce_scatter"], list(x.split(1)))
    demo["all_gather"] = torch.cat(_gathered(x[rank : rank + 1]))
    demo = {name: value.cpu() for name, value in demo.items()}

    generator = torch.Generator().manual_seed(1000 + rank)  # other numbers per rank
    shapes = [(1,), (2,), (7,), (3, 5), (1001,), (n_elements,)]
    differences, bytes_sent = {}, {}
    for p in range(2, world_size + 1):
        group = dist.new_group(list(range(p)))  # every rank must take part in this
        if rank >= p:
            continue
        for dtype in (torch.float64, torch.int64):
            for shape in shapes:
                x = torch.randn(shape, generator=generator, dtype=torch.float64) * 100
                ours, reference = x.to(dev, dtype), x.to(dev, dtype)
                sent = ring_all_reduce(ours, group)
                dist.all_reduce(reference, group=group)
                key = (p, str(dtype).removeprefix("torch."), ours.numel())
                differences[key] = (ours - reference).abs().max().item()
                bytes_sent[key] = sent
    return {"demo": demo, "differences": differences, "bytes": bytes_sent}


def training_worker(
    rank: int,
    world_size: int,
    X: torch.Tensor,
    y: torch.Tensor,
    batches: torch.Tensor,
    seed: int,
    d_hidden: int,
    lr: float,
    bucket_cap_mb: float,
) -> dict:
    """The chapter's second launch: train :func:`mlp` by hand-written data parallelism
    (rank ``r`` takes columns ``r*b:(r+1)*b`` of each row of ``batches``, global batches
    of indices into ``X``), then the same with ``DistributedDataParallel`` and
    :func:`counting_all_reduce_hook`. Weights are drawn with ``seed + rank``: they
    differ until rank 0's are broadcast."""
    dev = device()
    X, y = X.to(dev), y.to(dev)
    b = batches.shape[1] // world_size
    shards = batches[:, rank * b : (rank + 1) * b].to(dev)  # (steps, b)
    d_in, d_out = X.shape[1], int(y.max()) + 1

    torch.manual_seed(seed + rank)
    model = mlp(d_in, d_hidden, d_out).to(dev, X.dtype)
    first = next(model.parameters()).detach().clone()
    differed = max(t.ne(first).any().item() for t in _gathered(first))
    broadcast_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    log = [data_parallel_step(model, optimizer, X[i], y[i]) for i in shards]

    torch.manual_seed(seed + rank)
    replica = mlp(d_in, d_hidden, d_out).to(dev, X.dtype)
    ddp = DistributedDataParallel(
        replica,
        device_ids=[dev.index] if dev.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
    )  # broadcasts rank 0's parameters
    hook_state: dict[str, list[int]] = {"index": [], "bytes": []}
    ddp.register_comm_hook(hook_state, counting_all_reduce_hook)
    ddp_optimizer = torch.optim.SGD(ddp.parameters(), lr=lr)
    ddp_bytes, ddp_buckets, ddp_losses = [], [], []
    for i in shards:
        before = len(hook_state["bytes"])
        ddp_optimizer.zero_grad()
        loss = F.cross_entropy(ddp(X[i]), y[i])
        loss.backward()  # DDP all-reduces the buckets during the backward pass
        ddp_optimizer.step()
        ddp_losses.append(loss.item())
        ddp_bytes.append(sum(hook_state["bytes"][before:]))
        ddp_buckets.append(len(hook_state["bytes"]) - before)

    def flat(module: nn.Module, grad: bool = False) -> torch.Tensor:
        tensors = [q.grad if grad else q for q in module.parameters()]
        return torch.cat([t.detach().reshape(-1) for t in tensors]).cpu()

    return {
        "initial_weights_differed": bool(differed),
        "losses": [entry["loss"] for entry in log],
        "bytes": [entry["bytes"] for entry in log],
        "compute_s": [entry["compute_s"] for entry in log],
        "communicate_s": [entry["communicate_s"] for entry in log],
        "parameters": flat(model),
        "gradients": flat(model, grad=True),
        "ddp_losses": ddp_losses,
        "ddp_parameters": flat(replica),
        "ddp_gradients": flat(replica, grad=True),
        "ddp_bytes": ddp_bytes,
        "ddp_buckets": ddp_buckets,
    }


def ring_check_worker(rank: int, world_size: int, n_elements: int) -> dict:
    """A small worker for ``torchrun``: the ring against ``dist.all_reduce`` on
    ``n_elements`` random float64 numbers per rank; rank 0 prints the result."""
    torch.manual_seed(rank)
    x = torch.randn(n_elements, dtype=torch.float64, device=device())
    reference = x.clone()
    sent = ring_all_reduce(x)
    dist.all_reduce(reference)
    return {
        "world_size": world_size,
        "backend": dist.get_backend(),
        "largest_difference": (x - reference).abs().max().item(),
        "bytes_sent_by_rank_0": sent,
    }
