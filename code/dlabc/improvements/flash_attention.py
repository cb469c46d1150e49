"""FlashAttention in plain PyTorch: tiling, the online softmax, recomputation.

Chapter: ``book/improvements/flash_attention.md``.

References:
- Milakov & Gimelshein (2018), *Online normalizer calculation for softmax* (the
  streaming maximum and sum, :func:`online_softmax`).
- Rabe & Staats (2021), *Self-attention Does Not Need O(n^2) Memory* (attention in
  chunks, with the softmax statistics carried along).
- Dao, Fu, Ermon, Rudra & Ré (2022), *FlashAttention: Fast and Memory-Efficient Exact
  Attention with IO-Awareness* (tiling, saving only the softmax statistics, recomputing
  the attention matrix in the backward pass).
- Dao (2023), *FlashAttention-2: Faster Attention with Better Parallelism and Work
  Partitioning* (the loop order used here: queries outside in the forward pass, keys
  outside in the backward pass; one log-sum-exp per row; ``D = rowsum(dO * O)``).

The loops are Python loops over blocks, so this code is *slower* than a fused kernel:
it shows the algorithm and its memory footprint, not its speed. Shapes: ``q`` is
``(..., T_q, d)``, ``k`` is ``(..., T_k, d)``, ``v`` is ``(..., T_k, d_v)``. With
``causal=True`` query ``i`` sees keys ``0..i`` (the convention of
``F.scaled_dot_product_attention(..., is_causal=True)``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator

import torch

from dlabc.checks import check_positive_int, check_tensor

__all__ = [
    "online_softmax",
    "count_blocks",
    "flash_attention_forward",
    "flash_attention_backward",
    "FlashAttention",
    "flash_attention",
    "peak_memory",
    "cpu_memory_methods",
    "memory_and_seconds",
]


def _check_softmax(x: object, chunk_size: object) -> None:
    check_tensor(x, "x", floating=True)
    check_positive_int(chunk_size, "chunk_size")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last axis, got {tuple(x.shape)}")


def online_softmax(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    r"""Softmax over the last axis, reading it in chunks of ``chunk_size`` entries.

    One pass keeps a running maximum $m$ and a running sum $\ell$ of $e^{x_j - m}$;
    when a chunk raises the maximum from $m$ to $m'$, the old sum is rescaled:

    $\ell' = e^{m - m'}\,\ell + \sum_{j \in \text{chunk}} e^{x_j - m'}$.

    After the last chunk $\ell = \sum_j e^{x_j - m}$ with $m = \max_j x_j$, and
    $\mathrm{softmax}(x)_i = e^{x_i - m} / \ell$ (Milakov & Gimelshein, algorithm 3).
    """
    _check_softmax(x, chunk_size)
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    ell = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)  # (...,)
    for start in range(0, x.shape[-1], chunk_size):
        chunk = x[..., start : start + chunk_size]  # (..., chunk)
        m_new = torch.maximum(m, chunk.amax(dim=-1))  # the running maximum
        # rescale the old sum to the new maximum, add the chunk's terms
        ell = torch.exp(m - m_new) * ell + torch.exp(chunk - m_new[..., None]).sum(-1)
        m = m_new
    return torch.exp(x - m[..., None]) / ell[..., None]


def _check_qkv(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, floating=True)
        if t.dim() < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., length, features), "
                f"got {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(
            "q, k and v must have the same leading (batch, head) dimensions, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same feature size d, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length T_k, got k {tuple(k.shape)} "
            f"and v {tuple(v.shape)}"
        )
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(
            f"q and k must hold at least one position, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )


def _blocks(
    t_q: int, t_k: int, block_q: int, block_k: int, causal: bool, keys_outside: bool
) -> Iterator[tuple[int, int, int, int, bool]]:
    """Yield ``(q0, q1, k0, k1, needs_mask)`` for every block that is computed.

    In the causal case a block whose first key comes after its last query is hidden
    entirely and skipped; a block that straddles the diagonal needs the mask, one
    below it does not.
    """
    q_starts = range(0, t_q, block_q)
    k_starts = range(0, t_k, block_k)
    pairs = (
        ((q0, k0) for k0 in k_starts for q0 in q_starts)
        if keys_outside
        else ((q0, k0) for q0 in q_starts for k0 in k_starts)
    )
    for q0, k0 in pairs:
        q1, k1 = min(q0 + block_q, t_q), min(k0 + block_k, t_k)
        if causal and k0 > q1 - 1:  # every key after every query: fully masked
            continue
        yield q0, q1, k0, k1, causal and k1 - 1 > q0


def count_blocks(
    t_q: int, t_k: int, block_q: int, block_k: int, causal: bool
) -> dict[str, int]:
    """How many ``block_q x block_k`` tiles of the score matrix are computed or skipped.

    Returns ``{"total": ..., "computed": ..., "skipped": ..., "masked": ...}``, where
    ``masked`` counts the computed tiles that straddle the causal diagonal.
    """
    for name, value in (("t_q", t_q), ("t_k", t_k)):
        check_positive_int(value, name)
    check_positive_int(block_q, "block_q")
    check_positive_int(block_k, "block_k")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    total = math.ceil(t_q / block_q) * math.ceil(t_k / block_k)
    tiles = list(_blocks(t_q, t_k, block_q, block_k, causal, keys_outside=False))
    masked = sum(needs_mask for *_, needs_mask in tiles)
    return {
        "total": total,
        "computed": len(tiles),
        "skipped": total - len(tiles),
        "masked": masked,
    }


def _check_blocks(block_q: object, block_k: object, causal: object) -> None:
    check_positive_int(block_q, "block_q")
    check_positive_int(block_k, "block_k")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")


def _check_attention(
    q: object, k: object, v: object, block_q: object, block_k: object, causal: object
) -> None:
    _check_qkv(q, k, v)
    _check_blocks(block_q, block_k, causal)


def _check_saved(
    q: object, v: object, out: object, lse: object, grad_out: object
) -> None:
    """``out`` and ``grad_out`` ``(..., T_q, d_v)``, ``lse`` ``(..., T_q)``."""
    expected = (*q.shape[:-1], v.shape[-1])
    for name, t, shape in (
        ("out", out, expected),
        ("grad_out", grad_out, expected),
        ("lse", lse, q.shape[:-1]),
    ):
        check_tensor(t, name, floating=True)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}"
            )


def _scores(
    q_blk: torch.Tensor,
    k_blk: torch.Tensor,
    scale: float,
    q0: int,
    k0: int,
    needs_mask: bool,
) -> torch.Tensor:
    """One tile of scores ``S = Q_i K_j^T / sqrt(d)``, causally masked if needed."""
    s = q_blk @ k_blk.transpose(-2, -1) * scale  # (..., Bq, Bk)
    if needs_mask:
        rows = torch.arange(q0, q0 + s.shape[-2], device=s.device)[:, None]
        cols = torch.arange(k0, k0 + s.shape[-1], device=s.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))  # a key after its query
    return s


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_q: int = 64,
    block_k: int = 64,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact attention $\mathrm{softmax}(QK^\top/\sqrt d)\,V$, one tile at a time.

    For each block of queries $Q_i$ it walks over the key blocks $K_j, V_j$ and keeps,
    per row, the running maximum $m$, the running sum $\ell$ and an unnormalised output
    $\tilde O$; a new tile $S = Q_i K_j^\top/\sqrt d$ updates them as

    $m' = \max(m, \mathrm{rowmax}\,S)$, $P = e^{S - m'}$,
    $\ell' = e^{m - m'}\ell + \mathrm{rowsum}\,P$,
    $\tilde O' = e^{m - m'}\tilde O + P V_j$,

    and at the end $O_i = \tilde O / \ell$. Only the log-sum-exp
    $L = m + \log \ell$ of each row is returned besides $O$: the backward pass needs
    nothing else. No $T_q \times T_k$ matrix is ever held, only one
    ``block_q x block_k`` tile.

    Returns ``out`` ``(..., T_q, d_v)`` and ``lse`` ``(..., T_q)``.
    """
    _check_attention(q, k, v, block_q, block_k, causal)
    t_q, t_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)  # (..., T_q)
    m = ell = acc = None
    for q0, q1, k0, k1, needs_mask in _blocks(
        t_q, t_k, block_q, block_k, causal, False
    ):
        if k0 == 0:  # a new block of queries: fresh statistics
            m = q.new_full((*q.shape[:-2], q1 - q0), float("-inf"))  # (..., Bq)
            ell = q.new_zeros((*q.shape[:-2], q1 - q0))  # (..., Bq)
            acc = q.new_zeros((*q.shape[:-2], q1 - q0, v.shape[-1]))  # (..., Bq, d_v)
        s = _scores(q[..., q0:q1, :], k[..., k0:k1, :], scale, q0, k0, needs_mask)
        m_new = torch.maximum(m, s.amax(dim=-1))  # running row maximum
        p = torch.exp(s - m_new[..., None])  # (..., Bq, Bk), masked entries are 0
        alpha = torch.exp(m - m_new)  # rescales what was summed so far
        ell = alpha * ell + p.sum(dim=-1)  # running row sum
        acc = alpha[..., None] * acc + p @ v[..., k0:k1, :]  # (..., Bq, d_v)
        m = m_new
        last_k = min(t_k, q1) if causal else t_k  # the last key block of this row block
        if k1 >= last_k:  # this block of queries is done: normalise once
            out[..., q0:q1, :] = acc / ell[..., None]
            lse[..., q0:q1] = m + torch.log(ell)
    return out, lse


def flash_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    block_q: int = 64,
    block_k: int = 64,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients of attention, recomputing each tile from $Q$, $K$ and the saved $L$.

    With $D = \mathrm{rowsum}(dO \circ O)$ computed once, each tile is rebuilt as
    $P = e^{S - L}$ and contributes

    $dV_j \mathrel{+}= P^\top dO_i$, $dP = dO_i V_j^\top$,
    $dS = P \circ (dP - D)$,
    $dQ_i \mathrel{+}= dS\, K_j/\sqrt d$, $dK_j \mathrel{+}= dS^\top Q_i/\sqrt d$

    (FlashAttention-2, algorithm 2: key blocks in the outer loop).
    Returns ``(dq, dk, dv)`` with the shapes of ``q``, ``k``, ``v``.
    """
    _check_attention(q, k, v, block_q, block_k, causal)
    _check_saved(q, v, out, lse, grad_out)
    t_q, t_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    d = (grad_out * out).sum(dim=-1)  # (..., T_q): D = rowsum(dO o O)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, k0, k1, needs_mask in _blocks(t_q, t_k, block_q, block_k, causal, True):
        q_blk, k_blk, v_blk = q[..., q0:q1, :], k[..., k0:k1, :], v[..., k0:k1, :]
        do_blk = grad_out[..., q0:q1, :]  # (..., Bq, d_v)
        s = _scores(q_blk, k_blk, scale, q0, k0, needs_mask)  # recomputed
        p = torch.exp(s - lse[..., q0:q1, None])  # (..., Bq, Bk): the attention tile
        dv[..., k0:k1, :] += p.transpose(-2, -1) @ do_blk  # (..., Bk, d_v)
        dp = do_blk @ v_blk.transpose(-2, -1)  # (..., Bq, Bk)
        ds = p * (dp - d[..., q0:q1, None])  # softmax backward
        dq[..., q0:q1, :] += ds @ k_blk * scale  # (..., Bq, d)
        dk[..., k0:k1, :] += ds.transpose(-2, -1) @ q_blk * scale  # (..., Bk, d)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    r"""$O = \mathrm{softmax}(QK^\top/\sqrt d)\,V$ with a tiled forward and backward.

    ``forward`` saves $Q, K, V, O$ and the row log-sum-exp $L$ (a vector per row, not
    the $T_q \times T_k$ attention matrix autograd would keep); ``backward``
    recomputes the tiles. Use it through :func:`flash_attention`.
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        block_q: int,
        block_k: int,
        causal: bool,
    ) -> torch.Tensor:
        out, lse = flash_attention_forward(q, k, v, block_q, block_k, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks = (block_q, block_k, causal)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(
            q, k, v, out, lse, grad_out.contiguous(), *ctx.blocks
        )
        return dq, dk, dv, None, None, None  # no gradients for the block sizes


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_q: int = 64,
    block_k: int = 64,
    causal: bool = False,
) -> torch.Tensor:
    """Tiled exact attention with autograd support; the same result as
    ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)``."""
    _check_attention(q, k, v, block_q, block_k, causal)
    return FlashAttention.apply(q, k, v, block_q, block_k, causal)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), flags=re.M)
    return int(match.group(1)) * 1024  # type: ignore[union-attr]


def _release_free_memory() -> None:
    """Ask glibc's ``malloc`` to give freed memory back to the operating system.

    Otherwise memory freed earlier stays resident, a new tensor reuses it, and the
    resident size does not grow: a measurement would miss that allocation.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def peak_memory(
    fn: Callable[[], object], device: torch.device | str = "cpu", method: str = "auto"
) -> int:
    """Peak memory in bytes that ``fn()`` takes on top of what was in use before.

    On CUDA it reads PyTorch's allocator statistics. On the CPU there are two ways:

    - ``"rss"`` (Linux, the default there): the operating system's count of the
      process's resident memory. Writing ``5`` to ``/proc/self/clear_refs`` resets the
      high-water mark ``VmHWM``, and after ``fn()`` the new mark minus the resident size
      before is the peak that ``fn`` added. Freed memory is handed back to the system
      first, so that ``fn`` cannot hide an allocation by reusing it. This sees every
      allocation (PyTorch's, NumPy's, Python's), so keep ``fn`` free of unrelated work.
    - ``"profiler"`` (macOS, Windows, or a Linux without ``clear_refs``): PyTorch's own
      profiler records how much memory each operator allocates and frees, in order, on
      every platform; the running total's maximum is the peak. It counts PyTorch's
      tensors only, operator by operator (a buffer that one operator allocates and frees
      before returning is not seen).

    ``method="auto"`` picks ``"rss"`` where Linux allows it, else ``"profiler"``. The
    value returned by ``fn`` is dropped before measuring ends.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if method not in ("auto", "rss", "profiler"):
        raise ValueError(f"method must be 'auto', 'rss' or 'profiler', got {method!r}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return max(peak - before, 0)
    if device.type != "cpu":
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    if method == "auto":
        method = "rss" if _can_reset_peak_rss() else "profiler"
    if method == "profiler":
        return _profiled_peak(fn)
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size (Linux >= 4.0)
    except OSError as err:
        raise RuntimeError(
            "method='rss' needs Linux's /proc/self/clear_refs; use method='profiler'"
        ) from err
    before = _rss_bytes("VmRSS")
    result = fn()
    peak = _rss_bytes("VmHWM")
    del result
    return max(peak - before, 0)


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Silence what the profiler's C++ side (Kineto) logs to the process's stderr while
    it starts and stops; Python's own ``sys.stderr`` is left alone."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_memory_methods() -> list[str]:
    """The ways :func:`peak_memory` can measure CPU memory on this machine."""
    return ["rss", "profiler"] if _can_reset_peak_rss() else ["profiler"]


def _can_reset_peak_rss() -> bool:
    """Linux with a writable ``/proc/self/clear_refs`` (not macOS, Windows, or a
    sandbox that hides it)."""
    return sys.platform.startswith("linux") and os.access(
        "/proc/self/clear_refs", os.W_OK
    )


def _profiled_peak(fn: Callable[[], object]) -> int:
    """The peak of PyTorch's CPU allocations during ``fn()``, from the profiler's
    per-operator memory records (allocations positive, frees negative) in time
    order."""
    from torch.profiler import ProfilerActivity, profile

    with (
        _stderr_to_devnull(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        result = fn()
        del result
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def memory_and_seconds(
    fn: Callable[[], object], device: torch.device | str = "cpu"
) -> tuple[int, float]:
    """The peak memory in bytes (as :func:`peak_memory`) and the wall time in seconds
    of one call ``fn()``; on CUDA the clock waits for the GPU before and after."""
    device = torch.device(device)
    seconds: list[float] = []

    def timed() -> object:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        return result

    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    return peak_memory(timed, device), seconds[0]
