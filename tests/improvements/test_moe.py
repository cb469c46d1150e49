"""Tests for ``dlabc.improvements.moe``.

The sparse MoE block must equal Hugging Face's ``MixtralSparseMoeBlock`` with copied
weights (outputs, router logits, gradients of the inputs), for many shapes and top-k;
one expert must equal the dense SwiGLU FFN (HF's ``LlamaMLP`` with copied weights).
The load-balancing loss must equal its closed form and HF's
``load_balancing_loss_func``; the z-loss its formula computed in NumPy. Capacity is
checked with a hand-made router: each expert keeps its first ceil(c k N / E) tokens,
first choices before second ones, and a dropped token gets 0 (the residual passes it
through). Switch gates are the raw probabilities, Mixtral's are renormalised. The LM
block is causal. Bad input fails with a clear message.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)

from dlabc.foundations.activations import GatedFeedForward
from dlabc.improvements.moe import (
    Routing,
    SparseMoE,
    TinyLM,
    apply_capacity,
    expert_capacity,
    expert_load,
    load_balancing_loss,
    route,
    router_z_loss,
    table_task,
)

# HF's router takes the softmax in float32 even for float64 inputs
HF_GATES = dict(rtol=1e-6, atol=1e-6)
TIGHT = dict(rtol=1e-10, atol=1e-12)


def rand(*shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def mixtral_copy(ours: SparseMoE) -> MixtralSparseMoeBlock:
    d_hidden = ours.experts[0].gate_proj.out_features
    config = MixtralConfig(
        hidden_size=ours.d_model,
        intermediate_size=d_hidden,
        num_local_experts=ours.n_experts,
        num_experts_per_tok=ours.top_k,
        experts_implementation="eager",
    )
    ref = MixtralSparseMoeBlock(config).double().eval()
    with torch.no_grad():
        ref.gate.weight.copy_(ours.gate.weight)
        for i, e in enumerate(ours.experts):
            ref.experts.gate_up_proj[i].copy_(
                torch.cat([e.gate_proj.weight, e.up_proj.weight])
            )
            ref.experts.down_proj[i].copy_(e.down_proj.weight)
    return ref


@pytest.mark.parametrize(
    "shape,d_hidden,n_experts,top_k",
    [
        ((2, 5), 24, 4, 2),
        ((3, 7), 8, 8, 2),
        ((1, 9), 16, 6, 1),
        ((4, 3), 12, 5, 3),
        ((2, 6), 10, 3, 3),
        ((5, 1), 6, 2, 1),
    ],
)
def test_equals_hf_mixtral(shape, d_hidden, n_experts, top_k):
    torch.manual_seed(sum(shape) + n_experts)
    d = 16
    ours = SparseMoE(d, d_hidden, n_experts, top_k=top_k).double()
    ref = mixtral_copy(ours)
    x = rand(*shape, d, seed=n_experts).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = ours(x)
    y_ref = ref(x_ref)
    torch.testing.assert_close(y, y_ref, **HF_GATES)
    logits, _, indices = ref.gate(x_ref.detach())
    torch.testing.assert_close(ours.routing.logits, logits, **TIGHT)
    assert torch.equal(ours.routing.experts, indices)
    g = rand(*shape, d, seed=7)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **HF_GATES)


@pytest.mark.parametrize("d,d_hidden", [(8, 12), (16, 4), (6, 20)])
def test_one_expert_is_the_dense_ffn(d, d_hidden):
    torch.manual_seed(d)
    moe = SparseMoE(d, d_hidden, 1, top_k=1).double()
    ref = LlamaMLP(
        LlamaConfig(
            hidden_size=d,
            intermediate_size=d_hidden,
            num_attention_heads=1,
            num_key_value_heads=1,
            hidden_act="silu",
        )
    ).double()
    e = moe.experts[0]
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ref, name).weight.copy_(getattr(e, name).weight)
    x = rand(3, 4, d, seed=d)
    torch.testing.assert_close(moe(x), ref(x), **TIGHT)
    torch.testing.assert_close(moe(x), e(x), **TIGHT)


@pytest.mark.parametrize("n,n_experts,top_k", [(10, 4, 1), (33, 8, 2), (7, 3, 3)])
def test_load_balancing_loss_closed_form_and_hf(n, n_experts, top_k):
    logits = rand(n, n_experts, seed=n) * 2
    probs, experts, _ = route(logits, top_k)
    loss = load_balancing_loss(probs, experts)
    f = np.zeros(n_experts)
    for row in experts.numpy():
        for i in row:
            f[i] += 1 / n
    p = torch.softmax(logits, -1).numpy().mean(0)
    assert loss.item() == pytest.approx(n_experts * float((f * p).sum()), rel=1e-12)
    hf = load_balancing_loss_func((logits,), n_experts, top_k=top_k)
    assert loss.item() == pytest.approx(hf.item(), rel=1e-6)
    real = torch.arange(n) % 3 != 0
    masked = load_balancing_loss(probs, experts, real)
    hf_masked = load_balancing_loss_func(
        (logits,), n_experts, top_k=top_k, attention_mask=real[None].long()
    )
    assert masked.item() == pytest.approx(hf_masked.item(), rel=1e-6)


def test_load_balancing_loss_is_k_when_balanced():
    # a uniform router with a round-robin choice: f_i = k / E and P_i = 1 / E
    n_experts, top_k = 4, 2
    probs = torch.full((8, n_experts), 1 / n_experts, dtype=torch.float64)
    experts = torch.tensor([[i % 4, (i + 1) % 4] for i in range(8)])
    assert load_balancing_loss(probs, experts).item() == pytest.approx(top_k)


@pytest.mark.parametrize("n,n_experts", [(1, 2), (9, 5), (40, 16)])
def test_router_z_loss_formula(n, n_experts):
    logits = rand(n, n_experts, seed=n_experts) * 3
    z = logits.numpy()
    expected = np.mean(np.log(np.exp(z).sum(-1)) ** 2)
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-12)


def test_switch_gates_are_probabilities_mixtral_gates_renormalised():
    logits = rand(6, 5)
    probs, experts, switch = route(logits, 2, normalize=False)
    _, _, mixtral = route(logits, 2, normalize=True)
    torch.testing.assert_close(switch, probs.gather(1, experts))
    torch.testing.assert_close(mixtral.sum(-1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(mixtral, switch / switch.sum(-1, keepdim=True))


@pytest.mark.parametrize("n,n_experts,c", [(8, 2, 1.0), (10, 4, 1.25), (9, 3, 0.5)])
def test_capacity_with_a_hand_made_router(n, n_experts, c):
    d = 4
    moe = SparseMoE(d, 6, n_experts, top_k=1, capacity_factor=c, normalize=False)
    moe = moe.double()
    with torch.no_grad():  # every token prefers expert 0 (strongly), then 1, ...
        moe.gate.weight.zero_()
        moe.gate.weight[:, 0] = -torch.arange(n_experts, dtype=torch.float64) * 10
    x = torch.zeros(n, d, dtype=torch.float64)
    x[:, 0] = 1.0 + rand(n).abs()  # positive: expert 0 always wins
    y = moe(x)
    capacity = math.ceil(c * n / n_experts)
    assert capacity == expert_capacity(n, n_experts, c)
    kept = moe.routing.kept[:, 0]
    assert kept.tolist() == [i < capacity for i in range(n)]  # first come
    assert torch.all(y[~kept] == 0)  # dropped: passes through the residual
    gate = moe.routing.probs[kept, 0:1]
    torch.testing.assert_close(y[kept], gate * moe.experts[0](x[kept]))


def test_apply_capacity_first_choices_go_first():
    experts = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]])  # (N=4, k=2)
    kept = apply_capacity(experts, 3, capacity=2)
    # queue of expert 0: tokens 0, 1, 3 (first choices), then token 2 -> 0, 1 kept
    # queue of expert 1: token 2 (first choice), then tokens 0, 1 -> 2, 0 kept
    expected = [[True, True], [True, False], [True, False], [False, True]]
    assert kept.tolist() == expected


def test_expert_load_sums_to_one():
    moe = SparseMoE(8, 4, 4, top_k=2)
    moe(torch.randn(3, 5, 8))
    load = expert_load(moe.routing, 4)
    counts = torch.bincount(moe.routing.experts.flatten(), minlength=4)
    torch.testing.assert_close(load, counts.float() / 30)
    balance, z = moe.aux_losses()
    assert balance.item() >= 2 - 1e-6 and z.item() > 0  # k is the minimum


def test_tiny_lm_is_causal_with_moe_in_the_ffn_slot():
    torch.manual_seed(0)
    model = TinyLM(11, 16, 2, 2, lambda: SparseMoE(16, 8, 4, top_k=2)).double()
    assert len(model.moe_layers()) == 2
    tokens = torch.randint(11, (2, 7))
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 11
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 7, 11)
    torch.testing.assert_close(a[:, :4], b[:, :4], **TIGHT)
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    dense = TinyLM(11, 16, 2, 1, lambda: GatedFeedForward(16, 8))
    assert dense.moe_layers() == []


def test_table_task():
    table = torch.randint(6, (6, 6), generator=torch.Generator().manual_seed(0))
    tokens, targets = table_task(5, 4, table)
    assert tokens.shape == targets.shape == (5, 4)
    assert torch.equal(targets[:, 0], tokens[:, 0])
    for b in range(5):
        for t in range(1, 4):
            assert targets[b, t] == table[tokens[b, t - 1], tokens[b, t]]


# -------------------------------------------------------------------- bad input

moe = SparseMoE(8, 4, 4)
assert isinstance(Routing, type) and issubclass(SparseMoE, nn.Module)

BAD_INPUT = [
    pytest.param(
        lambda: SparseMoE(8, 4, 4, top_k=5),
        ValueError,
        "top_k=5 must not exceed n_experts=4",
        id="top_k",
    ),
    pytest.param(
        lambda: SparseMoE(8, 4, 4, capacity_factor=0.0),
        ValueError,
        "capacity_factor",
        id="capacity_factor",
    ),
    pytest.param(
        lambda: SparseMoE(8, 4, 4, capacity_factor=-1.0),
        ValueError,
        "capacity_factor",
        id="capacity_factor-2",
    ),
    pytest.param(
        lambda: SparseMoE(8, 4, 4, normalize=1),
        TypeError,
        "normalize must be a bool",
        id="normalize",
    ),
    pytest.param(
        lambda: SparseMoE(8, 4, 2.0),
        TypeError,
        "n_experts must be an int",
        id="n_experts",
    ),
    pytest.param(
        lambda: moe(torch.randn(2, 3, 7)),
        ValueError,
        "x must end in d_model=8",
        id="x",
    ),
    pytest.param(
        lambda: moe(torch.ones(2, 8, dtype=torch.long)),
        TypeError,
        "x must be a floating",
        id="x-2",
    ),
    pytest.param(
        lambda: SparseMoE(8, 4, 4).aux_losses(),
        RuntimeError,
        "call the module first",
        id="call",
    ),
    pytest.param(
        lambda: route(torch.randn(3), 1),
        ValueError,
        "logits must have 2 dimensions",
        id="logits",
    ),
    pytest.param(
        lambda: route(torch.randn(4, 2), 3),
        ValueError,
        "top_k=3 must not exceed n_experts=2",
        id="top_k-2",
    ),
    pytest.param(
        lambda: expert_capacity(10, 2, 0),
        ValueError,
        "capacity_factor",
        id="capacity_factor-3",
    ),
    pytest.param(
        lambda: apply_capacity(torch.tensor([[2]]), 2, 1),
        ValueError,
        "experts must lie in 0..1",
        id="experts",
    ),
    pytest.param(
        lambda: load_balancing_loss(
            torch.rand(4, 3), torch.zeros(3, 1, dtype=torch.long)
        ),
        ValueError,
        "one row per token",
        id="one",
    ),
    pytest.param(
        lambda: load_balancing_loss(
            torch.rand(4, 3),
            torch.zeros(4, 1, dtype=torch.long),
            torch.ones(3, dtype=torch.bool),
        ),
        ValueError,
        "mask must have shape",
        id="mask",
    ),
    pytest.param(
        lambda: expert_load("no", 2),
        TypeError,
        "routing must be a Routing",
        id="routing",
    ),
    pytest.param(
        lambda: table_task(2, 3, torch.zeros(3, 4, dtype=torch.long)),
        ValueError,
        "table must be square",
        id="table",
    ),
    pytest.param(
        lambda: TinyLM(5, 8, 2, 1, None),
        TypeError,
        "make_ffn must be callable",
        id="make_ffn",
    ),
    pytest.param(
        lambda: TinyLM(5, 8, 2, 1, lambda: GatedFeedForward(8, 4))(torch.zeros(2, 3)),
        TypeError,
        "ids must have dtype torch.int64",
        id="tokens",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
