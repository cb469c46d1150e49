"""Tests for ``dlabc.scaling.model_parallel``.

Tensor parallelism: on two processes, the column- and row-parallel linear layers, the
split MLP, attention split by heads and a whole pre-norm layer give the output and the
input's gradient of PyTorch's own unsharded blocks (``nn.Linear``, ``nn.Sequential``,
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) with the same weights, and
each rank's weight gradients are its shards of the reference's, in float64; a layer calls
two all-reduces forward and two backward. The shards at p = 4 rebuild the weights.

Pipeline parallelism: GPipe and 1F1B on two stages give the gradients of the whole
model on the whole batch (autograd on one process), follow their schedules, and hold m
and min(p - stage, m) micro-batches at most. Simulated on ideal stages, both schedules
have the bubble (p - 1)/(m + p - 1) exactly. One launch for everything.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.distributed import launch
from dlabc.scaling.model_parallel import (
    BLOCK_NAMES,
    SCHEDULES,
    ColumnParallelLinear,
    ParallelAttention,
    ParallelMLP,
    ParallelTransformerLayer,
    RowParallelLinear,
    bubble_fraction,
    dense_blocks,
    expected_shards,
    forward_backward,
    gpipe_schedule,
    ideal_bubble,
    one_f_one_b_schedule,
    parallelize,
    pipeline_batch,
    pipeline_model,
    simulate_schedule,
    stage_layers,
)
from helpers_model_parallel import both_workers


@pytest.fixture(scope="module")
def results():
    return launch(both_workers, 2)


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_sharded_blocks_equal_pytorchs_unsharded_blocks(results, name):
    dense = dense_blocks(16, 4, 64, 0)[name]
    reference = forward_backward(dense, 2, 8, 16, 0)
    for rank, result in enumerate(r["tensor"][name] for r in results):
        torch.testing.assert_close(result["out"], reference["out"], rtol=0, atol=1e-12)
        torch.testing.assert_close(
            result["grad_x"], reference["grad_x"], rtol=0, atol=1e-12
        )
        expected = expected_shards(name, dense, rank, 2)
        assert result["grads"].keys() == expected.keys()
        for key, shard in expected.items():
            torch.testing.assert_close(
                result["grads"][key], shard.detach(), rtol=0, atol=1e-12
            )


def test_communication_per_block(results):
    counts = {
        name: (r["forward"], r["backward"]) for name, r in results[0]["tensor"].items()
    }
    reduce_f, reduce_b = ("all-reduce", "forward"), ("all-reduce", "backward")
    assert counts["layer"] == ({reduce_f: 2}, {reduce_b: 2})
    assert counts["mlp"] == counts["attention"] == ({reduce_f: 1}, {reduce_b: 1})
    assert counts["column"] == ({("all-gather", "forward"): 1}, {reduce_b: 1})
    assert counts["row"] == ({reduce_f: 1}, {("all-gather", "backward"): 1})
    assert results[1]["tensor"]["layer"]["forward"] == {reduce_f: 2}


def test_shards_at_four_ranks_rebuild_the_weights():
    torch.manual_seed(0)
    linear = nn.Linear(8, 12)
    columns = [
        ColumnParallelLinear(linear.weight, linear.bias, rank=i, world_size=4)
        for i in range(4)
    ]
    rows = [
        RowParallelLinear(linear.weight, linear.bias, rank=i, world_size=4)
        for i in range(4)
    ]
    assert torch.equal(torch.cat([c.weight for c in columns]), linear.weight)
    assert torch.equal(torch.cat([c.bias for c in columns]), linear.bias)
    assert torch.equal(torch.cat([r.weight for r in rows], dim=1), linear.weight)
    assert all(torch.equal(r.bias, linear.bias) for r in rows)
    # attention: rank i holds the query, key and value rows of heads 2i and 2i + 1
    mha = nn.MultiheadAttention(16, 8, batch_first=True)
    for i in range(4):
        shard = ParallelAttention(mha, rank=i, world_size=4)
        q, k, v = shard.query_key_value.weight.chunk(3)
        full_q, full_k, full_v = mha.in_proj_weight.chunk(3)
        rows_i = slice(4 * i, 4 * i + 4)  # two heads of 2 features
        assert torch.equal(q, full_q[rows_i]) and torch.equal(v, full_v[rows_i])
        assert torch.equal(k, full_k[rows_i]) and shard.heads == 2
        assert torch.equal(shard.dense.weight, mha.out_proj.weight[:, rows_i])


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_pipeline_gradients_equal_the_whole_model(results, schedule):
    model = pipeline_model(2, 8, 0, torch.float64)
    x, target = pipeline_batch(12, 8, 0, torch.float64)  # 4 micro-batches of 3
    F.mse_loss(model(x), target).backward()
    for stage, result in enumerate(r["pipeline"]["check"][schedule] for r in results):
        params = list(stage_layers(model, stage, 2).parameters())
        assert len(params) == len(result["grads"]) == 2
        for p, grad in zip(params, result["grads"], strict=True):
            torch.testing.assert_close(grad, p.grad, rtol=0, atol=1e-14)


def test_stages_follow_their_schedules_and_hold_few_micro_batches(results):
    for stage, r in enumerate(results):
        for (name, m), (run,) in r["pipeline"]["runs"].items():
            order = [(kind, j) for kind, j, *_ in run["timeline"]]
            assert order == SCHEDULES[name](m, 2, stage)
            assert all(0 <= s <= e for *_, s, e in run["timeline"])
            starts = [s for *_, s, _ in run["timeline"]]
            assert starts == sorted(starts)
            expected = m if name == "GPipe" else min(2 - stage, m)
            assert run["peak"] == expected, (name, m, stage)
    assert [r["pipeline"]["backend"] for r in results] == ["gloo", "gloo"]
    one = [r["pipeline"]["runs"]["GPipe", 1][0]["timeline"] for r in results]
    assert bubble_fraction(one) >= 0.5 - 1e-9  # one micro-batch cannot overlap


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("schedule", [gpipe_schedule, one_f_one_b_schedule])
def test_ideal_stages_have_the_closed_form_bubble(schedule, m, p):
    timelines = simulate_schedule(schedule, m, p, 1.0, 2.5)
    assert bubble_fraction(timelines) == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert ideal_bubble(m, p) == pytest.approx((p - 1) / (m + p - 1))
    actions = [sorted(schedule(m, p, s)) for s in range(p)]
    everything = sorted([("B", j) for j in range(m)] + [("F", j) for j in range(m)])
    assert all(a == everything for a in actions)


def test_one_f_one_b_for_four_stages():
    assert one_f_one_b_schedule(4, 4, 0) == [
        ("F", 0),
        ("F", 1),
        ("F", 2),
        ("F", 3),
        ("B", 0),
        ("B", 1),
        ("B", 2),
        ("B", 3),
    ]
    assert one_f_one_b_schedule(4, 4, 2) == [
        ("F", 0),
        ("F", 1),
        ("B", 0),
        ("F", 2),
        ("B", 1),
        ("F", 3),
        ("B", 2),
        ("B", 3),
    ]
    assert one_f_one_b_schedule(4, 4, 3) == [
        ("F", 0),
        ("B", 0),
        ("F", 1),
        ("B", 1),
        ("F", 2),
        ("B", 2),
        ("F", 3),
        ("B", 3),
    ]


def test_bubble_fraction_of_a_handmade_timeline():
    # stage 0 busy 0-1 and 3-4, stage 1 busy 1-3: wall 4, busy 4 of 8
    timelines = [[("F", 0, 0.0, 1.0), ("B", 0, 3.0, 4.0)], [("F", 0, 1.0, 3.0)]]
    assert bubble_fraction(timelines) == pytest.approx(0.5)


def test_a_deadlocking_schedule_is_caught():
    def backward_first(m, p, stage):
        return [("B", j) for j in range(m)] + [("F", j) for j in range(m)]

    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate_schedule(backward_first, 2, 2)


def test_bad_input_is_refused():
    linear = nn.Linear(6, 10)
    with pytest.raises(ValueError, match="output features.*divisible by world_size=4"):
        ColumnParallelLinear(linear.weight, linear.bias, rank=0, world_size=4)
    with pytest.raises(ValueError, match="input features.*divisible by world_size=4"):
        RowParallelLinear(linear.weight, linear.bias, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank must be an int in 0..1"):
        ColumnParallelLinear(linear.weight, rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="outside an initialised process group"):
        ColumnParallelLinear(linear.weight)
    with pytest.raises(ValueError, match="bias must have 10 entries"):
        ColumnParallelLinear(linear.weight, torch.zeros(3), rank=0, world_size=2)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        ColumnParallelLinear([[1.0]], rank=0, world_size=1)
    with pytest.raises(ValueError, match="heads .3. must be divisible"):
        ParallelAttention(
            nn.MultiheadAttention(6, 3, batch_first=True), rank=0, world_size=2
        )
    with pytest.raises(ValueError, match="batch_first"):
        ParallelAttention(nn.MultiheadAttention(8, 2), rank=0, world_size=2)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        ParallelAttention(linear, rank=0, world_size=2)
    layer = dict(dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
    with pytest.raises(ValueError, match="pre-norm"):
        ParallelTransformerLayer(
            nn.TransformerEncoderLayer(8, 2, 16, **{**layer, "norm_first": False}),
            rank=0,
            world_size=2,
        )
    with pytest.raises(ValueError, match="gelu"):
        ParallelTransformerLayer(
            nn.TransformerEncoderLayer(8, 2, 16, **{**layer, "activation": "relu"}),
            rank=0,
            world_size=2,
        )
    with pytest.raises(ValueError, match="dropout=0"):
        ParallelTransformerLayer(
            nn.TransformerEncoderLayer(8, 2, 16, **{**layer, "dropout": 0.1}),
            rank=0,
            world_size=2,
        )
    with pytest.raises(TypeError, match="nn.TransformerEncoderLayer"):
        ParallelTransformerLayer(linear, rank=0, world_size=2)
    with pytest.raises(ValueError, match="name must be one of"):
        parallelize("conv", linear, 0, 2)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        dense_blocks(10, 4, 16, 0)
    with pytest.raises(ValueError, match="n_micro must be positive"):
        ideal_bubble(0, 2)
    with pytest.raises(TypeError, match="n_stages must be an int"):
        simulate_schedule(gpipe_schedule, 2, 2.0)
    with pytest.raises(ValueError, match="do not split into 2 equal stages"):
        stage_layers(pipeline_model(3, 4, 0), 0, 2)
    assert isinstance(ParallelMLP(nn.Linear(4, 8), nn.Linear(8, 4), 1, 2), nn.Module)
