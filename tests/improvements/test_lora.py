"""Tests for ``dlabc.improvements.lora``.

Our LoRA layers are compared with Hugging Face's ``peft`` (``get_peft_model`` with a
``LoraConfig``), on a plain PyTorch MLP and on a tiny random ``LlamaForCausalLM``
built from a config, in float64, after copying the same $A$ and $B$ into both: the
outputs before merging, the merged weights and outputs after ``merge_and_unload``, the
input gradients, the trainable-parameter counts, the rsLoRA scaling, and switching
between two adapters (peft's ``set_adapter``). The layer is also checked against its
closed form $W_0 x + b + \\frac{\\alpha}{r} B A x$ written out in NumPy, $B = 0$ at the
start (the wrapped model computes the base model exactly), the rank of the update,
gradients that reach only $A$ and $B$, merge/unmerge round trips, and bad input.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.models.llama import LlamaConfig, LlamaForCausalLM

from dlabc.improvements.lora import (
    LoRALinear,
    adapter_state,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_scaling,
    merge_and_unload,
    trainable_parameters,
)

TIGHT = dict(rtol=1e-12, atol=1e-12)


def mlp(d_in: int = 12, hidden: int = 16, d_out: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden, bias=False),
        nn.ReLU(),
        nn.Linear(hidden, d_out),
    ).double()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).double().eval()


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=g))


def copy_into_peft(ours: nn.Module, ref: nn.Module, adapter: str = "default") -> None:
    """Our ``lora_A``/``lora_B`` into peft's ``lora_A[adapter].weight``..."""
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            target = ref.base_model.model.get_submodule(name)
            target.lora_A[adapter].weight.copy_(layer.lora_A)
            target.lora_B[adapter].weight.copy_(layer.lora_B)


def pair(base, targets, r, alpha, rslora=False):
    ours = apply_lora(copy.deepcopy(base), targets, r, alpha, rslora=rslora)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora
    )
    ref = get_peft_model(copy.deepcopy(base), config)
    randomize_b(ours)
    copy_into_peft(ours, ref)
    return ours, ref


# ------------------------------------------------------------------ the scaling


@pytest.mark.parametrize("r", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("alpha", [1, 8, 16.5])
def test_scaling_is_alpha_over_r_or_sqrt_r(r, alpha):
    assert lora_scaling(r, alpha) == pytest.approx(alpha / r, rel=1e-15)
    assert lora_scaling(r, alpha, rslora=True) == pytest.approx(
        alpha / math.sqrt(r), rel=1e-15
    )


# ------------------------------------------------------------------ the layer


@pytest.mark.parametrize(
    "d_in,d_out,r,bias,shape",
    [(7, 5, 1, True, (3,)), (16, 16, 4, False, (2, 3)), (9, 20, 9, True, (4, 1, 2))],
)
def test_layer_is_the_closed_form(d_in, d_out, r, bias, shape):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias).double()
    layer = LoRALinear(base, r, alpha=2 * r + 1)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(*shape, d_in, dtype=torch.float64)
    W0, A, B = (t.detach().numpy() for t in (base.weight, layer.lora_A, layer.lora_B))
    s = (2 * r + 1) / r
    expected = x.numpy() @ W0.T + s * (x.numpy() @ A.T) @ B.T
    if bias:
        expected = expected + base.bias.detach().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, **TIGHT)
    assert layer(x).shape == (*shape, d_out)
    assert np.linalg.matrix_rank(layer.delta_weight().detach().numpy()) == r


def test_b_starts_at_zero_so_the_layer_is_the_base():
    torch.manual_seed(0)
    base = nn.Linear(10, 6).double()
    layer = LoRALinear(base, 3, 6)
    x = torch.randn(5, 10, dtype=torch.float64)
    assert torch.equal(layer.lora_B, torch.zeros(6, 3, dtype=torch.float64))
    assert layer.lora_A.abs().sum() > 0
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A.dtype == torch.float64  # A and B follow the base's dtype


def test_the_wrapper_reports_the_base_widths():
    # code written for nn.Linear (the book's blocks) reads in_features / out_features
    layer = LoRALinear(nn.Linear(10, 6), 3, 6)
    assert (layer.in_features, layer.out_features) == (10, 6)


def test_a_is_initialised_like_nn_linear():
    # Kaiming uniform with a = sqrt(5): U(-1/sqrt(k), 1/sqrt(k)), as peft and nn.Linear
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 300), 256, 1)
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.99 * bound
    assert layer.lora_A.var().item() == pytest.approx(bound**2 / 3, rel=0.02)


def test_only_a_and_b_get_gradients():
    model = apply_lora(mlp(), ["0", "2"], r=2, alpha=4)
    randomize_b(model)
    model(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
        assert (p.grad is not None) == ("lora_" in name), name


def test_dropout_acts_on_the_lora_path_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8).double(), 2, 4, dropout=0.5)
    x = torch.randn(64, 8, dtype=torch.float64)
    layer.eval()
    assert torch.equal(layer(x), layer.base(x))  # B = 0: dropout changes nothing
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(x, 0.5)  # the same draw as nn.Dropout
    expected = layer.base(x) + dropped @ layer.delta_weight().t()
    assert (dropped == 0).any()
    torch.testing.assert_close(y, expected, **TIGHT)


def test_merge_and_unmerge_round_trip():
    torch.manual_seed(0)
    base = nn.Linear(12, 7).double()
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, 3, 5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 12, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight(), **TIGHT)
    torch.testing.assert_close(layer(x), before, **TIGHT)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, **TIGHT)
    torch.testing.assert_close(layer(x), before, **TIGHT)


# ------------------------------------------------------------------ against peft


@pytest.mark.parametrize(
    "targets,r,alpha,rslora",
    [(["0"], 1, 1, False), (["0", "2", "4"], 4, 8, False), (["2"], 3, 16, True)],
)
def test_mlp_equals_peft_before_and_after_merge(targets, r, alpha, rslora):
    base = mlp()
    ours, ref = pair(base, targets, r, alpha, rslora)
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    ours_y, ref_y = ours(x), ref(x)
    torch.testing.assert_close(ours_y, ref_y, **TIGHT)
    assert (ours_y - base(x)).abs().max() > 1e-3  # the adapter does something
    # the same gradient with respect to the input
    (g_ours,) = torch.autograd.grad(ours_y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref_y.square().sum(), x)
    torch.testing.assert_close(g_ours, g_ref, **TIGHT)
    assert trainable_parameters(ours) == ref.get_nb_trainable_parameters()
    for name, layer in lora_layers(ours).items():
        target = ref.base_model.model.get_submodule(name)
        assert layer.scaling == pytest.approx(target.scaling["default"], rel=1e-15)
        torch.testing.assert_close(
            layer.delta_weight(), target.get_delta_weight("default"), **TIGHT
        )
    merged, ref_merged = merge_and_unload(ours), ref.merge_and_unload()
    assert not lora_layers(merged)
    assert [type(m) for m in merged.modules()] == [
        type(m) for m in ref_merged.modules()
    ]
    for (n1, p1), (n2, p2) in zip(
        merged.state_dict().items(), ref_merged.state_dict().items(), strict=True
    ):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, **TIGHT)
    torch.testing.assert_close(merged(x), ours_y, **TIGHT)


@pytest.mark.parametrize(
    "targets,r", [(["q_proj", "v_proj"], 4), (["down_proj", "o_proj", "k_proj"], 2)]
)
def test_llama_equals_peft_before_and_after_merge(targets, r):
    base = tiny_llama()
    ids = torch.randint(50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = base(ids).logits
        ours = apply_lora(copy.deepcopy(base), targets, r, alpha=2 * r)
        assert torch.equal(ours(ids).logits, y0)  # B = 0
        ours, ref = pair(base, targets, r, 2 * r)
        assert len(lora_layers(ours)) == 2 * len(targets)  # every block
        y = ours(ids).logits
        torch.testing.assert_close(y, ref(input_ids=ids).logits, **TIGHT)
        assert (y - y0).abs().max() > 1e-3
        assert trainable_parameters(ours) == ref.get_nb_trainable_parameters()
        merged, ref_merged = merge_and_unload(ours), ref.merge_and_unload()
        torch.testing.assert_close(
            merged(ids).logits, ref_merged(input_ids=ids).logits, **TIGHT
        )
        torch.testing.assert_close(merged(ids).logits, y, **TIGHT)
        for (n1, p1), (n2, p2) in zip(
            merged.state_dict().items(), ref_merged.state_dict().items(), strict=True
        ):
            assert n1 == n2
            torch.testing.assert_close(p1, p2, **TIGHT)


def test_switching_adapters_equals_peft_set_adapter():
    base = mlp()
    targets = ["0", "4"]
    ours, ref = pair(base, targets, 3, 6)
    first = adapter_state(ours)
    assert set(first) == {f"{n}.lora_{m}" for n in ("0", "4") for m in "AB"}
    randomize_b(ours, seed=7)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_A.normal_()
    second = adapter_state(ours)
    ref.add_adapter("second", LoraConfig(r=3, lora_alpha=6, target_modules=targets))
    copy_into_peft(ours, ref, "second")
    x = torch.randn(5, 12, dtype=torch.float64)
    for name, state in [("default", first), ("second", second), ("default", first)]:
        load_adapter(ours, state)
        ref.set_adapter(name)
        torch.testing.assert_close(ours(x), ref(x), **TIGHT)


def test_adapter_state_holds_the_unfrozen_head():
    model = apply_lora(mlp(), ["0", "2"], r=2, alpha=2)
    model[4].requires_grad_(True)  # a new head, trained fully
    state = adapter_state(model)
    assert set(state) == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"} | {
        "4.weight",
        "4.bias",
    }
    trainable, total = trainable_parameters(model)
    assert trainable == sum(v.numel() for v in state.values())
    assert trainable == 2 * (12 + 16) + 2 * (16 + 16) + 16 * 5 + 5
    assert total == sum(p.numel() for p in mlp().parameters()) + 2 * (12 + 16 + 32)
    with torch.no_grad():
        model[4].weight.zero_()
    load_adapter(model, state)
    torch.testing.assert_close(model[4].weight, state["4.weight"], **TIGHT)


def test_targets_follow_peft_name_rule():
    base = tiny_llama()
    ours = apply_lora(copy.deepcopy(base), ["self_attn.q_proj"], 2, 4)
    ref = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["self_attn.q_proj"]),
    )
    peft_names = {
        n.removeprefix("base_model.model.")
        for n, m in ref.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)
    }
    assert set(lora_layers(ours)) == peft_names
    assert len(peft_names) == 2


# ------------------------------------------------------------------ bad input


def _merged(layer: LoRALinear) -> LoRALinear:
    layer.merge()
    return layer


def _with_adapter() -> nn.Module:
    return apply_lora(mlp(), ["0"], 2, 4)


def _merged_model() -> nn.Module:
    model = _with_adapter()
    model[0].merge()
    return model


BASE = nn.Linear(8, 4)
BAD_INPUT = [
    # LoRALinear and lora_scaling
    pytest.param(
        lambda: LoRALinear(BASE, 2.0, 4), TypeError, "r must be an int", id="r-float"
    ),
    pytest.param(
        lambda: LoRALinear(BASE, 0, 4), ValueError, "r must be positive", id="r-0"
    ),
    pytest.param(
        lambda: LoRALinear(BASE, 5, 4),
        ValueError,
        "r=5 must not exceed min",
        id="r-too-large",
    ),
    pytest.param(
        lambda: LoRALinear(BASE, 2, 0),
        ValueError,
        r"alpha must be in \(0, inf\)",
        id="alpha-0",
    ),
    pytest.param(
        lambda: lora_scaling(2, "8"),
        TypeError,
        "alpha must be a number",
        id="alpha-str",
    ),
    pytest.param(
        lambda: lora_scaling(2, 8, rslora=1),
        TypeError,
        "rslora must be a bool",
        id="rslora-int",
    ),
    pytest.param(
        lambda: LoRALinear(BASE, 2, 4, dropout=1.0),
        ValueError,
        r"dropout must be in \[0, 1\)",
        id="dropout-1",
    ),
    pytest.param(
        lambda: LoRALinear(nn.Conv1d(2, 2, 1), 1, 1),
        TypeError,
        "base must be an nn.Linear",
        id="base-conv",
    ),
    pytest.param(
        lambda: LoRALinear(BASE, 2, 4)(torch.randn(3, 7)),
        ValueError,
        "x must end in in_features=8",
        id="x-features",
    ),
    pytest.param(
        lambda: LoRALinear(BASE, 2, 4)(torch.ones(3, 8, dtype=torch.long)),
        TypeError,
        "x must be a floating-point",
        id="x-long",
    ),
    pytest.param(
        lambda: LoRALinear(BASE, 2, 4)(torch.tensor(1.0)),
        ValueError,
        "x must end in",
        id="x-0d",
    ),
    pytest.param(
        lambda: LoRALinear(BASE, 2, 4).unmerge(),
        RuntimeError,
        "not merged",
        id="unmerge-unmerged",
    ),
    pytest.param(
        lambda: _merged(LoRALinear(BASE, 2, 4)).merge(),
        RuntimeError,
        "already merged",
        id="merge-merged",
    ),
    # apply_lora
    pytest.param(
        lambda: apply_lora(mlp(), ["q_proj"], 2, 4),
        ValueError,
        "no module of the model is named like",
        id="targets-none",
    ),
    pytest.param(
        lambda: apply_lora(mlp(), "0", 2, 4),
        TypeError,
        "target_names must be a list",
        id="targets-str",
    ),
    pytest.param(
        lambda: apply_lora(mlp(), [], 2, 4),
        ValueError,
        "target_names must be non-empty",
        id="targets-empty",
    ),
    pytest.param(
        lambda: apply_lora(mlp(), ["1"], 2, 4),
        TypeError,
        "1 is a ReLU; LoRA here wraps nn.Linear only",
        id="targets-relu",
    ),
    pytest.param(
        lambda: apply_lora(mlp(), ["0"], -1, 4),
        ValueError,
        "r must be positive",
        id="apply-r",
    ),
    pytest.param(
        lambda: apply_lora(mlp(), ["0"], 2, 4, dropout=-0.1),
        ValueError,
        "dropout must be in",
        id="apply-dropout",
    ),
    pytest.param(
        lambda: apply_lora(mlp(d_in=3), ["0"], 4, 4),
        ValueError,
        "r=4 must not exceed min",
        id="apply-r-too-large",
    ),
    pytest.param(
        lambda: apply_lora(_with_adapter(), ["0"], 2, 4),
        ValueError,
        "0 already has a LoRA adapter",
        id="targets-twice",
    ),
    pytest.param(
        lambda: apply_lora("model", ["0"], 2, 4),
        TypeError,
        "model must be an nn.Module",
        id="apply-model",
    ),
    # the helpers
    pytest.param(
        lambda: trainable_parameters("model"),
        TypeError,
        "model must be an nn.Module",
        id="count-model",
    ),
    pytest.param(
        lambda: lora_layers("model"),
        TypeError,
        "model must be an nn.Module",
        id="layers-model",
    ),
    pytest.param(
        lambda: merge_and_unload(mlp()),
        ValueError,
        "model has no LoRA layers",
        id="merge-none",
    ),
    pytest.param(
        lambda: adapter_state(mlp()),
        ValueError,
        "model has no LoRA layers",
        id="state-none",
    ),
    pytest.param(
        lambda: load_adapter(mlp(), {}),
        ValueError,
        "model has no LoRA layers",
        id="load-none",
    ),
    pytest.param(
        lambda: load_adapter(_with_adapter(), {"0.lora_A": torch.zeros(2, 12)}),
        ValueError,
        "state does not fit the model: missing",
        id="state-missing",
    ),
    pytest.param(
        lambda: load_adapter(
            _with_adapter(),
            {**adapter_state(_with_adapter()), "0.lora_A": torch.zeros(3, 12)},
        ),
        ValueError,
        r"state\['0.lora_A'\] has shape",
        id="state-shape",
    ),
    pytest.param(
        lambda: load_adapter(_with_adapter(), [adapter_state(_with_adapter())]),
        TypeError,
        "state must be a dict",
        id="state-list",
    ),
    pytest.param(
        lambda: load_adapter(_merged_model(), adapter_state(_merged_model())),
        RuntimeError,
        "0 is merged: unmerge it before switching",
        id="load-merged",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
