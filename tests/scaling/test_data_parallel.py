"""Tests for ``dlabc.scaling.data_parallel``.

One launch of three processes (the pattern of the Scaling part: a launch costs seconds,
and a fourth process half as much again) runs the chapter's three workers in one process
group, and the tests compare what they return with references nobody here wrote:

- the ring all-reduce against ``dist.all_reduce`` (sum) in groups of 2 and 3 ranks (the
  chapter checks 2, 3 and 4 on every build), float64 and int64, sizes that the number of
  ranks does not divide (and smaller than it), and the bytes each rank sent against the
  closed form of its chunks;
- the four collectives of the demonstration against their definitions;
- hand-written data-parallel training against single-process training on the full
  batch, written here as a plain loop with ``torch.optim.SGD`` (float64, 1e-12), the
  replicas identical to the bit;
- ``DistributedDataParallel`` on the same model and data: the same parameters and
  gradients, and the communication hook counts exactly the gradient bytes every step.

Bad input (no process group, a non-contiguous tensor, non-positive sizes) gets a clear
error.
"""

import pytest
import torch
import torch.nn.functional as F

from dlabc.distributed import launch
from dlabc.scaling.data_parallel import (
    mlp,
    naive_bytes,
    ring_all_reduce,
    ring_bytes,
)
from helpers_data_parallel import collectives_and_training

P = 3  # processes in the launch
N_BIG = 1200  # divisible by 2, 3 and 4
STEPS, BATCH, SEED = 6, 12, 3  # each rank takes 12 / 3 = 4 examples per step
D_IN, D_HIDDEN, D_OUT = 8, 6, 3  # the helper's mlp(8, 6, 3)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, D_OUT, (40,), generator=g)
    batches = torch.stack(
        [torch.randperm(40, generator=g)[:BATCH] for _ in range(STEPS)]
    )
    return X, y, batches


@pytest.fixture(scope="module")
def results(data):
    X, y, batches = data
    return launch(collectives_and_training, P, N_BIG, X, y, batches, SEED, deadline=120)


def test_ring_equals_dist_all_reduce(results):
    checked = 0
    for rank, result in enumerate(results):
        for (p, dtype, n), difference in result["collectives"]["differences"].items():
            assert rank < p
            if dtype == "int64":
                assert difference == 0, (p, n)  # integer sums: exactly equal
            else:
                assert difference <= 1e-12, (p, n)  # values ~ 100, float64
            checked += 1
    groups = {key[0] for key in results[0]["collectives"]["differences"]}
    sizes = {key[2] for key in results[0]["collectives"]["differences"]}
    assert groups == set(range(2, P + 1))
    assert {1, 2, 7, 15, 1001, N_BIG} == sizes  # 1 and 2 are smaller than p
    assert checked == 2 * 6 * sum(range(2, P + 1))


def test_ring_bytes_are_those_of_its_chunks(results):
    for rank, result in enumerate(results):
        for (p, _, n), sent in result["collectives"]["bytes"].items():
            sizes = [len(c) for c in torch.arange(n).tensor_split(p)]
            # rank r sends every chunk but r (phase 1) and every chunk but r + 1
            # (phase 2), 8 bytes each for float64 and int64
            expected = (2 * n - sizes[rank] - sizes[(rank + 1) % p]) * 8
            assert sent == expected, (rank, p, n)
            if n % p == 0:
                assert sent == ring_bytes(n, p, 8)
            assert abs(sent - ring_bytes(n, p, 8)) <= 2 * 8


def test_the_torchrun_worker(results):
    check = results[0]["check"]  # the worker the chapter runs under torchrun
    assert check["world_size"] == P and check["backend"] == "gloo"
    assert check["largest_difference"] <= 1e-12
    sizes = [len(c) for c in torch.arange(101).tensor_split(P)]
    assert check["bytes_sent_by_rank_0"] == (2 * 101 - sizes[0] - sizes[1]) * 8


def test_the_four_collectives(results):
    starts = [r["collectives"]["demo"]["start"] for r in results]
    total = sum(starts)
    for rank, result in enumerate(results):
        demo = result["collectives"]["demo"]
        assert torch.equal(demo["broadcast"], starts[0])
        assert torch.equal(demo["all_reduce"], total)
        assert torch.equal(demo["reduce_scatter"], total[rank : rank + 1])
        assert torch.equal(
            demo["all_gather"], torch.stack([s[i] for i, s in enumerate(starts)])
        )


def single_process(data):
    """The reference: one process, full batches of BATCH, the same first weights."""
    X, y, batches = data
    torch.manual_seed(SEED)  # rank 0's weights, which the workers broadcast
    model = mlp(D_IN, D_HIDDEN, D_OUT).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for i in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(X[i]), y[i])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    grads = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
    return losses, flat, grads


def test_data_parallel_equals_single_process_training(results, data):
    losses, parameters, gradients = single_process(data)
    runs = [r["training"] for r in results]
    assert all(run["initial_weights_differed"] for run in runs)  # until the broadcast
    for run in runs[1:]:  # the replicas stay identical, to the last bit
        assert torch.equal(run["parameters"], runs[0]["parameters"])
        assert torch.equal(run["gradients"], runs[0]["gradients"])
    torch.testing.assert_close(runs[0]["parameters"], parameters, rtol=0, atol=1e-12)
    torch.testing.assert_close(runs[0]["gradients"], gradients, rtol=0, atol=1e-12)
    # the full batch's loss is the mean of the shards' losses (equal shards)
    shard_mean = torch.tensor(
        [run["losses"] for run in runs], dtype=torch.float64
    ).mean(0)
    reference = torch.tensor(losses, dtype=torch.float64)
    torch.testing.assert_close(shard_mean, reference, rtol=0, atol=1e-12)
    assert parameters.sub(mlp_start()).abs().max() > 1e-3  # it did train


def mlp_start():
    torch.manual_seed(SEED)
    model = mlp(D_IN, D_HIDDEN, D_OUT).double()
    return torch.cat([q.detach().reshape(-1) for q in model.parameters()])


def test_ddp_equals_ours_and_counts_the_gradient_bytes(results):
    n_parameters = D_IN * D_HIDDEN + D_HIDDEN + D_HIDDEN * D_OUT + D_OUT
    for run in (r["training"] for r in results):
        torch.testing.assert_close(
            run["ddp_parameters"], run["parameters"], rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            run["ddp_gradients"], run["gradients"], rtol=0, atol=1e-12
        )
        ddp_losses, losses = (
            torch.tensor(run[key], dtype=torch.float64)
            for key in ("ddp_losses", "losses")
        )
        torch.testing.assert_close(ddp_losses, losses, rtol=0, atol=1e-12)
        assert run["ddp_bytes"] == [8 * n_parameters] * STEPS  # float64 gradients
        assert all(b >= 1 for b in run["ddp_buckets"])
        # our step all-reduces the same N numbers with the ring
        assert len(run["bytes"]) == STEPS
        assert all(abs(b - ring_bytes(n_parameters, P, 8)) <= 16 for b in run["bytes"])


def test_closed_forms():
    assert ring_bytes(12, 4) == 2 * 3 / 4 * 12 * 4
    assert ring_bytes(10, 1) == 0
    assert naive_bytes(10, 5, 2) == 4 * 10 * 2
    # the ring sends less than rank 0 of the naive scheme as soon as p > 2
    assert ring_bytes(1000, 2) == naive_bytes(1000, 2)
    assert all(ring_bytes(1000, p) < naive_bytes(1000, p) for p in range(3, 64))
    # and never twice the tensor, whatever p
    assert all(ring_bytes(1000, p) < 2 * 1000 * 4 for p in range(1, 1000))


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor"):
        ring_all_reduce([1.0, 2.0])
    with pytest.raises(ValueError, match="contiguous"):
        ring_all_reduce(torch.zeros(3, 4).t())
    with pytest.raises(RuntimeError, match="process group"):
        ring_all_reduce(torch.zeros(3))
    with pytest.raises(ValueError, match="n_elements must be positive"):
        ring_bytes(0, 2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        naive_bytes(10, 2.0)
    with pytest.raises(ValueError, match="d_hidden must be positive"):
        mlp(4, 0, 2)
