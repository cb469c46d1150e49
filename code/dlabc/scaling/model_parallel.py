"""Tensor and pipeline parallelism on ``torch.distributed``: Megatron's split layers,
GPipe and 1F1B schedules.

Chapter: ``book/scaling/model_parallel.md``.

References:
- Shoeybi, Patwary, Puri, LeGresley, Casper & Catanzaro (2019), *Megatron-LM: Training
  Multi-Billion Parameter Language Models Using Model Parallelism* (the column- and
  row-parallel linear layers, the conjugate operators ``f`` and ``g``, attention split
  by heads; the names ``query_key_value``, ``dense``, ``dense_h_to_4h``,
  ``dense_4h_to_h`` are Megatron's).
- Huang, Cheng, Bapna, Firat, Chen, Chen, Lee, Ngiam, Le, Wu & Chen (2019), *GPipe:
  Efficient Training of Giant Neural Networks using Pipeline Parallelism*
  (micro-batches, all forwards then all backwards, one flush per step).
- Narayanan, Harlap, Phanishayee, Seshadri, Devanur, Ganger, Gibbons & Zaharia (2019),
  *PipeDream: Generalized Pipeline Parallelism for DNN Training*, and Narayanan,
  Shoeybi, Casper, LeGresley, Patwary, Korthikanti, Vainbrand, Kashinkunti, Bernauer,
  Catanzaro, Phanishayee & Zaharia (2021), *Efficient Large-Scale Language Model
  Training on GPU Clusters Using Megatron-LM* (the one-forward-one-backward schedule
  with a flush, PipeDream-Flush).

Every worker here (``tensor_parallel_worker``, ``pipeline_worker``) is a plain function
of ``(rank, world_size, ...)`` inside an initialised default process group: it runs
under :func:`dlabc.distributed.launch` and, unchanged, under ``torchrun``.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_positive_int, check_tensor
from dlabc.distributed import device as process_device

__all__ = [
    "COMMUNICATION",
    "CopyToParallelRegion",
    "ReduceFromParallelRegion",
    "GatherFromParallelRegion",
    "ScatterToParallelRegion",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelMLP",
    "ParallelAttention",
    "ParallelTransformerLayer",
    "dense_blocks",
    "parallelize",
    "forward_backward",
    "expected_shards",
    "tensor_parallel_worker",
    "gpipe_schedule",
    "one_f_one_b_schedule",
    "pipeline_model",
    "stage_layers",
    "pipeline_batch",
    "run_schedule",
    "bubble_fraction",
    "ideal_bubble",
    "simulate_schedule",
    "pipeline_worker",
]

# ------------------------------------------------------------------------------------
# Tensor parallelism: the communication operators
# ------------------------------------------------------------------------------------

#: How many collectives the operators below have called, by kind and pass, e.g.
#: ``COMMUNICATION["all-reduce", "forward"]``. A worker clears it before it counts.
COMMUNICATION: Counter = Counter()


def _all_reduce(x: torch.Tensor, phase: str) -> torch.Tensor:
    COMMUNICATION["all-reduce", phase] += 1
    x = x.contiguous().clone()
    dist.all_reduce(x)  # the sum over the ranks, on every rank
    return x


def _all_gather_last(x: torch.Tensor, phase: str) -> torch.Tensor:
    COMMUNICATION["all-gather", phase] += 1
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, x.contiguous())
    return torch.cat(pieces, dim=-1)  # (..., p * n)


def _own_slice_last(x: torch.Tensor) -> torch.Tensor:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return x.chunk(world_size, dim=-1)[rank].contiguous()  # (..., n / p)


class CopyToParallelRegion(torch.autograd.Function):
    r"""Megatron's $f$: the identity forward, an all-reduce backward.

    It stands where one replicated input $X$ enters the ranks' separate computations:
    each rank's loss depends on $X$ through its own shard, so
    $\partial L / \partial X = \sum_i \partial L_i / \partial X$, summed over ranks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad, "backward")


class ReduceFromParallelRegion(torch.autograd.Function):
    r"""Megatron's $g$, the conjugate of $f$: an all-reduce forward, the identity
    backward.

    It sums the ranks' partial results $Z = \sum_i Y_i B_i$; the sum's gradient with
    respect to each term is the gradient of $Z$ itself, already on every rank.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class GatherFromParallelRegion(torch.autograd.Function):
    """Concatenate the ranks' slices of the last axis (all-gather); backward, keep this
    rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _all_gather_last(x, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _own_slice_last(grad)


class ScatterToParallelRegion(torch.autograd.Function):
    """Keep this rank's slice of the last axis (no communication); backward, all-gather
    the gradient's slices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _own_slice_last(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _all_gather_last(grad, "backward")


# ------------------------------------------------------------------------------------
# Tensor parallelism: the layers
# ------------------------------------------------------------------------------------


def _rank_and_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank`` and ``world_size``, from the default process group where not given."""
    if rank is None or world_size is None:
        if not dist.is_initialized():
            raise RuntimeError(
                "rank and world_size must be given outside an initialised process group"
            )
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    check_positive_int(world_size, "world_size")
    if (
        isinstance(rank, bool)
        or not isinstance(rank, int)
        or not 0 <= rank < world_size
    ):
        raise ValueError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")
    return rank, world_size


def _check_split(weight: object, bias: object, dim: int, world_size: int) -> None:
    check_tensor(weight, "weight", ndim=2, floating=True)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must have {weight.shape[0]} entries (the weight's output "
                f"features), got {bias.shape[0]}"
            )
    if weight.shape[dim] % world_size:
        side = "output" if dim == 0 else "input"
        raise ValueError(
            f"the weight's {side} features ({weight.shape[dim]}) must be divisible by "
            f"world_size={world_size}"
        )


class ColumnParallelLinear(nn.Module):
    r"""$Y = XA + b$ with $A = [A_1, \dots, A_p]$ split by columns (output features).

    Rank $i$ keeps $A_i$ and $b_i$ and computes $Y_i = X A_i + b_i$, its slice of the
    output's features. With ``gather_output=False`` (Megatron's use) the output stays
    split; with ``True`` the slices are all-gathered into $Y$.

    Built from the full ``weight`` ``(out, in)`` (as ``nn.Linear`` stores it, the
    transpose of $A$) and ``bias``, of which it keeps this rank's rows.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        gather_output: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        rank, world_size = _rank_and_size(rank, world_size)
        _check_split(weight, bias, 0, world_size)
        self.weight = nn.Parameter(weight.detach().chunk(world_size, 0)[rank].clone())
        self.bias = (
            None
            if bias is None
            else nn.Parameter(bias.detach().chunk(world_size, 0)[rank].clone())
        )
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = CopyToParallelRegion.apply(x)  # f: identity, all-reduce in backward
        y = F.linear(x, self.weight, self.bias)  # (..., out / p): Y_i = X A_i + b_i
        if self.gather_output:
            y = GatherFromParallelRegion.apply(y)  # (..., out)
        return y


class RowParallelLinear(nn.Module):
    r"""$Z = YB + c$ with $B = [B_1; \dots; B_p]$ split by rows (input features).

    Rank $i$ holds $B_i$ and the slice $Y_i$ of the input's features, computes the
    partial product $Y_i B_i$, and $g$ all-reduces the partial products:
    $Z = \sum_i Y_i B_i + c$. The bias $c$ is added once, after the sum, on every rank.
    With ``input_is_parallel=False`` the input is full and each rank first keeps its
    slice.

    Built from the full ``weight`` ``(out, in)`` and ``bias``; it keeps this rank's
    columns of the weight and the whole bias.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_is_parallel: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        rank, world_size = _rank_and_size(rank, world_size)
        _check_split(weight, bias, 1, world_size)
        self.weight = nn.Parameter(weight.detach().chunk(world_size, 1)[rank].clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.input_is_parallel = input_is_parallel

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            y = ScatterToParallelRegion.apply(y)  # (..., in / p)
        partial = F.linear(y, self.weight)  # (..., out): Y_i B_i
        z = ReduceFromParallelRegion.apply(partial)  # g: sum over ranks
        return z if self.bias is None else z + self.bias


class ParallelMLP(nn.Module):
    r"""The Transformer's MLP $Z = \mathrm{GeLU}(XA)\,B$, split over $p$ ranks.

    $A$ by columns, so each rank applies the GeLU to its own $XA_i$ (no communication);
    $B$ by rows, so the partial products are summed once: one all-reduce forward
    ($g$), one backward ($f$).
    """

    def __init__(
        self,
        fc1: nn.Linear,
        fc2: nn.Linear,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        split = {"rank": rank, "world_size": world_size}
        self.dense_h_to_4h = ColumnParallelLinear(fc1.weight, fc1.bias, **split)
        self.dense_4h_to_h = RowParallelLinear(fc2.weight, fc2.bias, **split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.dense_h_to_4h(x))  # (..., d_ff / p): GeLU(X A_i)
        return self.dense_4h_to_h(y)  # (..., d_model): sum_i GeLU(X A_i) B_i


def _heads_by_rank(w: torch.Tensor, world_size: int) -> torch.Tensor:
    """Reorder the rows of a fused ``[W_q; W_k; W_v]`` so that its ``i``-th chunk holds
    rank ``i``'s heads: ``[W_q_i; W_k_i; W_v_i]``."""
    q, k, v = w.chunk(3, dim=0)
    return torch.cat(
        [
            torch.cat([t.chunk(world_size, 0)[i] for t in (q, k, v)])
            for i in range(world_size)
        ]
    )


class ParallelAttention(nn.Module):
    r"""Multi-head self-attention with the heads split over $p$ ranks.

    The projections $W^Q, W^K, W^V$ are column-parallel (rank $i$ computes the queries,
    keys and values of its $h/p$ heads), attention runs on each rank's heads alone, and
    the output projection $W^O$ is row-parallel (its rows that read rank $i$'s heads):
    one all-reduce forward, one backward, as in the MLP.

    Built from an ``nn.MultiheadAttention`` (``batch_first=True``), whose weights it
    splits; ``causal=True`` hides the keys after each query.
    """

    def __init__(
        self,
        attention: nn.MultiheadAttention,
        causal: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        rank, world_size = _rank_and_size(rank, world_size)
        _check_attention(attention, world_size)
        split = {"rank": rank, "world_size": world_size}
        self.query_key_value = ColumnParallelLinear(
            _heads_by_rank(attention.in_proj_weight, world_size),
            _heads_by_rank(attention.in_proj_bias, world_size),
            **split,
        )
        out = attention.out_proj
        self.dense = RowParallelLinear(out.weight, out.bias, **split)
        self.heads = attention.num_heads // world_size  # heads on this rank
        self.d_head = attention.head_dim
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.query_key_value(x)  # (B, T, 3 d/p): this rank's heads only
        q, k, v = (
            t.view(B, T, self.heads, self.d_head).transpose(1, 2)  # (B, h/p, T, hs)
            for t in qkv.chunk(3, dim=-1)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        a = a.transpose(1, 2).reshape(B, T, self.heads * self.d_head)  # (B, T, d/p)
        return self.dense(a)  # (B, T, d): all-reduced


def _check_attention(attention: object, world_size: int) -> None:
    if not isinstance(attention, nn.MultiheadAttention):
        raise TypeError(
            f"attention must be an nn.MultiheadAttention, got {type(attention).__name__}"
        )
    if not attention.batch_first or not attention._qkv_same_embed_dim:
        raise ValueError("attention must be batch_first with one fused in_proj_weight")
    if attention.in_proj_bias is None:
        raise ValueError("attention must have biases (bias=True)")
    if attention.num_heads % world_size:
        raise ValueError(
            f"the number of heads ({attention.num_heads}) must be divisible by "
            f"world_size={world_size}"
        )


class ParallelTransformerLayer(nn.Module):
    r"""A pre-norm Transformer layer, $x + \mathrm{Attn}(\mathrm{LN}(x))$ then
    $x + \mathrm{MLP}(\mathrm{LN}(x))$, with attention and MLP split over the ranks.

    The layer norms and the residual stream are replicated: every rank computes them on
    the full $(B, T, d)$ activations, which the all-reduces have made identical. Two
    all-reduces forward, two backward, per layer.

    Built from an ``nn.TransformerEncoderLayer`` with ``norm_first=True``,
    ``batch_first=True``, ``activation="gelu"`` and no dropout.
    """

    def __init__(
        self,
        layer: nn.TransformerEncoderLayer,
        causal: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_layer(layer)
        split = {"rank": rank, "world_size": world_size}
        self.input_layernorm = copy.deepcopy(layer.norm1)
        self.self_attention = ParallelAttention(layer.self_attn, causal, **split)
        self.post_attention_layernorm = copy.deepcopy(layer.norm2)
        self.mlp = ParallelMLP(layer.linear1, layer.linear2, **split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x))  # (B, T, d)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, d)


def _check_layer(layer: object) -> None:
    if not isinstance(layer, nn.TransformerEncoderLayer):
        raise TypeError(
            f"layer must be an nn.TransformerEncoderLayer, got {type(layer).__name__}"
        )
    if not layer.norm_first:
        raise ValueError("layer must be pre-norm (norm_first=True)")
    if layer.activation is not F.gelu and not isinstance(layer.activation, nn.GELU):
        raise ValueError("layer must use activation='gelu'")
    if layer.dropout.p != 0 or layer.dropout1.p != 0 or layer.dropout2.p != 0:
        raise ValueError("layer must have dropout=0 (dropout is not split here)")


# ------------------------------------------------------------------------------------
# Tensor parallelism: the check, on every rank and in the parent
# ------------------------------------------------------------------------------------

#: The blocks the check compares, by the names of :func:`dense_blocks`.
BLOCK_NAMES = ("column", "row", "mlp", "attention", "layer")


def dense_blocks(
    d_model: int, n_heads: int, d_ff: int, seed: int
) -> dict[str, nn.Module]:
    """The unsharded reference blocks, in float64, with weights drawn from ``seed``:
    ``nn.Linear`` (for the column and row layers), ``nn.Sequential(Linear, GELU,
    Linear)``, ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``. Every
    process that calls it with the same arguments gets the same weights."""
    for name, value in (("d_model", d_model), ("n_heads", n_heads), ("d_ff", d_ff)):
        check_positive_int(value, name)
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    torch.manual_seed(seed)
    kw = {"dtype": torch.float64}
    return {
        "column": nn.Linear(d_model, d_ff, **kw),
        "row": nn.Linear(d_model, d_model, **kw),
        "mlp": nn.Sequential(
            nn.Linear(d_model, d_ff, **kw), nn.GELU(), nn.Linear(d_ff, d_model, **kw)
        ),
        "attention": nn.MultiheadAttention(d_model, n_heads, batch_first=True, **kw),
        "layer": nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            d_ff,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
            **kw,
        ),
    }


def parallelize(
    name: str, dense: nn.Module, rank: int | None = None, world_size: int | None = None
) -> nn.Module:
    """The tensor-parallel version of the reference block ``name`` of
    :func:`dense_blocks`, holding rank ``rank``'s shards of its weights. Attention is
    causal."""
    split = {"rank": rank, "world_size": world_size}
    if name == "column":
        return ColumnParallelLinear(
            dense.weight, dense.bias, gather_output=True, **split
        )
    if name == "row":
        return RowParallelLinear(
            dense.weight, dense.bias, input_is_parallel=False, **split
        )
    if name == "mlp":
        return ParallelMLP(dense[0], dense[2], **split)
    if name == "attention":
        return ParallelAttention(dense, causal=True, **split)
    if name == "layer":
        return ParallelTransformerLayer(dense, causal=True, **split)
    raise ValueError(f"name must be one of {BLOCK_NAMES}, got {name!r}")


def _call(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block of :func:`dense_blocks` or :func:`parallelize` applied to ``x``."""
    T = x.shape[1]
    mask = nn.Transformer.generate_square_subsequent_mask(T, x.device, x.dtype)
    if isinstance(block, nn.MultiheadAttention):
        return block(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
    if isinstance(block, nn.TransformerEncoderLayer):
        return block(x, src_mask=mask, is_causal=True)
    return block(x)


def forward_backward(
    block: nn.Module,
    batch: int,
    seq: int,
    d_model: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, object]:
    """One forward and backward pass of ``block`` (on ``device``) on an input and an
    output gradient drawn from ``seed`` (the same on every process). Returns, on the
    CPU, the output, the input's gradient, the parameters' gradients by name, and the
    collectives counted in each pass."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, seq, d_model, generator=g, dtype=torch.float64)
    x = x.to(device).requires_grad_(True)
    COMMUNICATION.clear()
    y = _call(block, x)
    forward = dict(COMMUNICATION)
    COMMUNICATION.clear()
    y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(device))
    backward = dict(COMMUNICATION)
    return {
        "out": y.detach().cpu(),
        "grad_x": x.grad.cpu(),
        "grads": {n: p.grad.cpu() for n, p in block.named_parameters()},
        "forward": forward,
        "backward": backward,
    }


def expected_shards(
    name: str, dense: nn.Module, rank: int, world_size: int
) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s shards of the reference's gradients, named as the parallel
    block's parameters: the gradients of ``dense``, split exactly as its weights are."""
    gradients = copy.deepcopy(dense)
    for p, q in zip(gradients.parameters(), dense.parameters(), strict=True):
        p.data = q.grad.clone()
    return dict(parallelize(name, gradients, rank, world_size).named_parameters())


def tensor_parallel_worker(
    rank: int,
    world_size: int,
    batch: int = 2,
    seq: int = 8,
    d_model: int = 16,
    n_heads: int = 4,
    d_ff: int = 64,
    seed: int = 0,
) -> dict[str, dict]:
    """On each rank: every block of :func:`dense_blocks`, parallelised, through one
    forward and backward pass (:func:`forward_backward`). Returns, by block name, the
    output, the gradients of the input and of this rank's shards, and the counts."""
    dense = dense_blocks(d_model, n_heads, d_ff, seed)
    dev = process_device()  # this rank's GPU under NCCL, else the CPU
    return {
        name: forward_backward(
            parallelize(name, block).to(dev), batch, seq, d_model, seed, dev
        )
        for name, block in dense.items()
    }


# ------------------------------------------------------------------------------------
# Pipeline parallelism
# ------------------------------------------------------------------------------------


def gpipe_schedule(n_micro: int, n_stages: int, stage: int) -> list[tuple[str, int]]:
    """GPipe: the forward pass of every micro-batch, then every backward pass, then a
    flush (the optimizer step). Actions are ``("F", j)`` and ``("B", j)``."""
    return [("F", j) for j in range(n_micro)] + [("B", j) for j in range(n_micro)]


def one_f_one_b_schedule(
    n_micro: int, n_stages: int, stage: int
) -> list[tuple[str, int]]:
    """1F1B (PipeDream-Flush): ``p - stage - 1`` warm-up forwards, then one forward and
    one backward in turn, then the cool-down backwards. A stage never holds more than
    ``p - stage`` micro-batches' activations."""
    warmup = min(n_stages - stage - 1, n_micro)
    actions = [("F", j) for j in range(warmup)]
    for j in range(n_micro - warmup):  # steady state: one forward, one backward
        actions += [("F", warmup + j), ("B", j)]
    return actions + [("B", j) for j in range(n_micro - warmup, n_micro)]


def pipeline_model(
    n_layers: int, d: int, seed: int, dtype: torch.dtype = torch.float32
) -> nn.Sequential:
    """The whole model: ``n_layers`` blocks ``Linear(d, d)`` then ``tanh``, weights
    drawn from ``seed`` (the same in every process)."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        layers += [nn.Linear(d, d, dtype=dtype), nn.Tanh()]
    return nn.Sequential(*layers)


def stage_layers(model: nn.Sequential, stage: int, n_stages: int) -> nn.Sequential:
    """Stage ``stage``'s consecutive share of the model's blocks."""
    blocks = len(model) // 2
    if blocks % n_stages:
        raise ValueError(f"{blocks} blocks do not split into {n_stages} equal stages")
    per = 2 * blocks // n_stages
    return model[stage * per : (stage + 1) * per]


def pipeline_batch(
    batch: int, d: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole batch of inputs and regression targets ``(batch, d)`` from ``seed``."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, d, generator=g, dtype=dtype)
    return x, torch.randn(batch, d, generator=g, dtype=dtype)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_schedule(
    stage_module: nn.Module,
    actions: list[tuple[str, int]],
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    stage: int,
    n_stages: int,
) -> dict[str, object]:
    """Run one training step's ``actions`` on this stage: receive, compute, send.

    ``inputs`` and ``targets`` are the micro-batches (read only by the first and the
    last stage). A forward pass keeps its input and output for the backward pass; a
    backward pass frees them. Returns the timeline ``[(kind, j, start, end)]`` of the
    computations (seconds after the step began; waiting for a message is not
    computing) and ``peak``, the most micro-batches whose activations were held.
    """
    first, last = stage == 0, stage == n_stages - 1
    dev = inputs[0].device
    shape, dtype, m = inputs[0].shape, inputs[0].dtype, len(inputs)
    stash, sends, timeline, peak = {}, [], [], 0
    t0 = _clock(dev)
    for kind, j in actions:
        if kind == "F":
            if first:
                x = inputs[j]
            else:  # the previous stage's activation
                x = torch.empty(shape, dtype=dtype, device=dev)
                dist.recv(x, src=stage - 1)
                x.requires_grad_(True)
            start = _clock(dev)
            y = stage_module(x)
            if last:  # the loss of micro-batch j, its share of the batch's mean
                y = F.mse_loss(y, targets[j]) / m
            end = _clock(dev)
            if not last:
                sends.append(dist.isend(y.detach(), dst=stage + 1))
            stash[j] = (x, y)  # kept until the backward pass of j
            peak = max(peak, len(stash))
        else:
            grad = None
            if not last:  # the gradient of this stage's output, from the next stage
                grad = torch.empty(shape, dtype=dtype, device=dev)
                dist.recv(grad, src=stage + 1)
            start = _clock(dev)
            x, y = stash.pop(j)
            torch.autograd.backward(y, grad)  # accumulates the weights' .grad
            end = _clock(dev)
            if not first:
                sends.append(dist.isend(x.grad, dst=stage - 1))
        timeline.append((kind, j, start - t0, end - t0))
    for request in sends:
        request.wait()
    return {"timeline": timeline, "peak": peak}


def bubble_fraction(timelines: list[list[tuple[str, int, float, float]]]) -> float:
    r"""The share of the stages' time spent idle in one step:
    $1 - \text{busy} / (p \cdot \text{wall})$, where busy sums every stage's
    computations and wall runs from the step's start to the last stage's last end."""
    p = len(timelines)
    busy = sum(end - start for timeline in timelines for *_, start, end in timeline)
    wall = max(timeline[-1][3] for timeline in timelines)
    return 1 - busy / (p * wall)


def ideal_bubble(n_micro: int, n_stages: int) -> float:
    r"""The bubble of GPipe and 1F1B with equal stages and free communication:
    $(p - 1) / (m + p - 1)$."""
    check_positive_int(n_micro, "n_micro")
    check_positive_int(n_stages, "n_stages")
    return (n_stages - 1) / (n_micro + n_stages - 1)


def simulate_schedule(
    schedule: Callable[[int, int, int], list[tuple[str, int]]],
    n_micro: int,
    n_stages: int,
    t_forward: float = 1.0,
    t_backward: float = 2.0,
) -> list[list[tuple[str, int, float, float]]]:
    """The timelines of ``schedule`` on ideal stages: every forward takes
    ``t_forward``, every backward ``t_backward``, messages arrive at once. Each stage
    runs its actions in order, as soon as its input is there (the activation of the
    stage before, or the gradient of the stage after)."""
    check_positive_int(n_micro, "n_micro")
    check_positive_int(n_stages, "n_stages")
    actions = [schedule(n_micro, n_stages, s) for s in range(n_stages)]
    finished: dict[tuple[str, int, int], float] = {}  # (kind, j, stage) -> end time
    timelines: list[list[tuple[str, int, float, float]]] = [[] for _ in actions]
    while sum(map(len, timelines)) < sum(map(len, actions)):
        progressed = False
        for s, timeline in enumerate(timelines):
            if len(timeline) == len(actions[s]):
                continue
            kind, j = actions[s][len(timeline)]
            needs = ("F", j, s - 1) if kind == "F" else ("B", j, s + 1)
            if needs[2] in (-1, n_stages):  # the first stage's input, the last's loss
                needs = ("F", j, s) if kind == "B" else None
            if needs is not None and needs not in finished:
                continue  # its message has not been sent yet
            start = max(timeline[-1][3] if timeline else 0.0, finished.get(needs, 0.0))
            end = start + (t_forward if kind == "F" else t_backward)
            finished[kind, j, s] = end
            timeline.append((kind, j, start, end))
            progressed = True
        if not progressed:
            raise RuntimeError(f"the schedule {schedule.__name__} deadlocks")
    return timelines


#: The sizes of the pipeline's gradient check (float64): the width and micro-batch.
CHECK_WIDTH, CHECK_MICRO_BATCH = 8, 3

SCHEDULES: dict[str, Callable[[int, int, int], list[tuple[str, int]]]] = {
    "GPipe": gpipe_schedule,
    "1F1B": one_f_one_b_schedule,
}


def _step(
    model: nn.Sequential,
    schedule: str,
    n_micro: int,
    micro_batch: int,
    seed: int,
    dtype: torch.dtype,
) -> dict[str, object]:
    """One training step of this rank's stage under ``schedule``; also returns the
    stage's gradients (then zeroed)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dev = process_device()
    stage = stage_layers(model, rank, world_size).to(dev)
    x, target = pipeline_batch(n_micro * micro_batch, model[0].in_features, seed, dtype)
    actions = SCHEDULES[schedule](n_micro, world_size, rank)
    dist.barrier()  # the stages start together
    result = run_schedule(
        stage,
        actions,
        list(x.to(dev).chunk(n_micro)),
        list(target.to(dev).chunk(n_micro)),
        rank,
        world_size,
    )
    result["grads"] = [p.grad.detach().cpu().clone() for p in stage.parameters()]
    stage.zero_grad(set_to_none=True)
    return result


def pipeline_worker(
    rank: int,
    world_size: int,
    d: int = 256,
    micro_batch: int = 32,
    layers_per_stage: int = 2,
    n_micros: tuple[int, ...] = (1, 2, 4, 8),
    repeats: int = 3,
    check_micro: int = 4,
    seed: int = 0,
) -> dict[str, object]:
    """Both schedules on this rank's stage.

    ``"check"``: one step in float64 (width :data:`CHECK_WIDTH`, ``check_micro``
    micro-batches of :data:`CHECK_MICRO_BATCH`) per schedule, with the stage's
    gradients. ``"runs"``: for every
    ``m`` in ``n_micros`` and each schedule, ``repeats`` timed steps in float32 (after
    one warm-up step), each with its timeline and peak of held micro-batches.
    ``"backend"``: ``"gloo"`` (processes on the CPU) or ``"nccl"`` (one GPU each).
    """
    n_layers = layers_per_stage * world_size
    small = pipeline_model(n_layers, CHECK_WIDTH, seed, torch.float64)
    check = {
        name: _step(small, name, check_micro, CHECK_MICRO_BATCH, seed, torch.float64)
        for name in SCHEDULES
    }
    model = pipeline_model(n_layers, d, seed)
    _step(model, "GPipe", 2, micro_batch, seed, torch.float32)  # warm-up
    runs = {}
    for m in n_micros:
        for name in SCHEDULES:
            steps = [
                _step(model, name, m, micro_batch, seed, torch.float32)
                for _ in range(repeats)
            ]
            runs[name, m] = [
                {"timeline": s["timeline"], "peak": s["peak"]} for s in steps
            ]
    return {"check": check, "runs": runs, "backend": dist.get_backend()}
