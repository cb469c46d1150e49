"""Start a group of ``torch.distributed`` processes from a chapter, and collect what
they return: the launcher of the Scaling part.

``launch(fn, world_size)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh
processes that form one process group, on the *gloo* backend over the CPU (NCCL on
GPUs, one GPU per process, when the machine has enough of them), and returns the list
of their results in rank order. It is the local stand-in for ``torchrun``: a worker
written for it uses only ``torch.distributed``'s default group, so the same function
runs unchanged under
``torchrun --nproc-per-node N [--nnodes M ...] -m dlabc.distributed module:function``.

Nothing can hang: the process group's collectives time out after ``timeout`` seconds,
the launcher gives up after ``deadline`` seconds, and a worker that raises stops the
others and brings its traceback to the caller.
"""

from __future__ import annotations

import datetime
import importlib
import os
import pickle
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def backend(world_size: int) -> str:
    """``"nccl"`` when there is one CUDA device per process, else ``"gloo"`` (CPU)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def device() -> torch.device:
    """The device of this process in an initialised group: its own GPU under NCCL, the
    CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, timeout, edited, queue):
    """One process of :func:`launch`: join the group, run ``fn``, send back its result
    (or its traceback), leave the group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # one core per process
    try:
        if edited:  # the notebook's edited implementation cells
            from dlabc import book

            for line, cell in edited:
                book.define(line, cell)
        name = backend(world_size)
        if name == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            name,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = fn(rank, world_size, *args)
        # pickled here, so that tensors travel as bytes (not as shared memory that
        # this process would have to keep alive until the parent has read it)
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 120.0,
    deadline: float = 600.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes that form
    one ``torch.distributed`` group; return their results, in rank order.

    ``fn`` must be defined in a module: each process imports it by name, as
    ``torchrun``'s would. Collectives time out after ``timeout`` seconds;
    after ``deadline`` seconds the processes are killed and ``TimeoutError`` is raised.
    A worker that raises stops all of them, and ``RuntimeError`` carries its traceback.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    module = getattr(fn, "__module__", None)
    if module in (None, "__main__") or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(
            f"fn must be a module-level function of an importable module, got {fn!r}: "
            "each process imports it by name (define it in a .py file, not a notebook)"
        )
    if not (timeout > 0 and deadline > 0):
        raise ValueError(
            f"timeout and deadline must be positive, got {timeout}, {deadline}"
        )
    from dlabc import book

    context = _context()
    queue = context.SimpleQueue()
    port = _free_port()
    edited = book.edited_implementations()
    processes = [
        context.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, timeout, edited, queue),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    start = _now()
    try:
        while len(results) < world_size:
            if not _wait(queue, processes, start + deadline):
                dead = [
                    r for r, p in enumerate(processes) if p.exitcode not in (None, 0)
                ]
                if dead:
                    raise RuntimeError(
                        f"worker(s) {dead} of {fn.__qualname__} died without a result "
                        f"(exit codes {[processes[r].exitcode for r in dead]})"
                    )
                raise TimeoutError(
                    f"{fn.__qualname__} on {world_size} processes did not finish within "
                    f"{deadline:.0f} s"
                )
            rank, ok, payload = queue.get()
            if not ok:
                raise RuntimeError(
                    f"rank {rank} of {fn.__qualname__} failed:\n{payload}"
                )
            results[rank] = pickle.loads(payload)
    finally:
        for process in processes:
            process.join(timeout=5 if len(results) == world_size else 0.1)
            if process.is_alive():
                process.kill()
                process.join()
    return [results[rank] for rank in range(world_size)]


def _context():
    """Where new processes come from: a *fork server* where the system has one (Linux,
    macOS), which imports PyTorch once and then forks a fresh, single-threaded copy of
    itself for every worker, so that a launch costs milliseconds instead of a second
    of imports per process; *spawn* (a fresh interpreter) elsewhere."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "dlabc.distributed"])
    return context


def _now() -> float:
    import time

    return time.monotonic()


def _wait(queue, processes, until: float) -> bool:
    """Wait until ``queue`` has an item (True), or until the time ``until`` passes or a
    process has died without sending one (False)."""
    import time

    while not queue.empty() or _now() < until:
        if not queue.empty():
            return True
        if any(p.exitcode not in (None, 0) for p in processes):
            time.sleep(0.2)  # its message may still be on its way
            return not queue.empty()
        time.sleep(0.01)
    return False


def main(argv: list[str] | None = None) -> None:
    """``torchrun ... -m dlabc.distributed module:function [int or float args]``: run a
    worker of this book under ``torchrun``, which sets ``RANK``, ``WORLD_SIZE`` and the
    rendezvous; rank 0 prints the result."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or ":" not in argv[0]:
        raise SystemExit(
            "usage: torchrun ... -m dlabc.distributed module:function [args]"
        )
    module_name, name = argv[0].split(":")
    fn = getattr(importlib.import_module(module_name), name)
    args = [_number(a) for a in argv[1:]]
    torch.set_num_threads(1)
    world_size = int(os.environ["WORLD_SIZE"])
    name = backend(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if name == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(name, timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(dist.get_rank(), world_size, *args)
        if dist.get_rank() == 0:
            print(repr(result))
    finally:
        dist.destroy_process_group()


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    main()
