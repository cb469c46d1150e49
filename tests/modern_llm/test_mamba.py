"""Tests for ``dlabc.modern_llm.mamba``.

The discretisations are compared with matrix exponentials (``torch.linalg.matrix_exp``,
the augmented-matrix form of the zero-order hold); the three scans with a brute-force
sum of products and with each other; the convolution form with ``torch.nn.functional.
conv1d``; the selective scan with Hugging Face's own ``mamba_selective_scan``; the
mixer and the language model with ``MambaMixer`` and ``MambaForCausalLM`` (random
weights copied through the renaming table), in their parallel, recurrent and
token-by-token paths, their gradients, and greedy decoding with HF's ``generate``
(its cached step path). HF's slow path casts to float32 inside the scan, so the comparisons with HF hold
to float32's rounding even in float64; our paths agree with each other to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer
from transformers.models.mamba.modeling_mamba import mamba_selective_scan
from transformers.utils import logging

from dlabc.language_models import count_parameters
from dlabc.modern_llm.mamba import (
    CONFIGS,
    MambaConfig,
    MambaLM,
    MambaMixer,
    associative_recall,
    convolution_form,
    discretize,
    largest_tensor_bytes,
    mamba_from_hf_state_dict,
    parallel_scan,
    recurrent_scan,
    scan,
    selective_scan,
    ssm_kernel,
    zoh,
)
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM

logging.set_verbosity_error()
F64 = dict(atol=1e-10, rtol=1e-10)
HF = dict(atol=1e-5, rtol=1e-5)  # HF's scan rounds to float32 inside
V = 37


def _hf_model(seed: int = 0, layers: int = 2) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = HFMambaConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=layers,
        state_size=4,
        time_step_rank=3,
        residual_in_fp32=False,
        use_associative_scan=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = MambaForCausalLM(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # no norm scale left at 1, no bias at 0
            p.add_(0.1 * torch.randn_like(p))
    return model


def _ours(hf: MambaForCausalLM) -> MambaLM:
    c = hf.config
    ours = MambaLM(
        MambaConfig(
            vocab_size=c.vocab_size,
            d_model=c.hidden_size,
            n_layers=c.num_hidden_layers,
            d_state=c.state_size,
            dt_rank=c.time_step_rank,
        )
    ).double()
    ours.load_state_dict(mamba_from_hf_state_dict(hf.state_dict()), strict=True)
    return ours.eval()


@pytest.fixture(scope="module")
def pair():
    hf = _hf_model()
    return hf, _ours(hf)


def test_discretize_is_the_matrix_exponential_and_euler_step():
    torch.manual_seed(0)
    delta = torch.rand(3, dtype=torch.float64) + 0.1
    A = -torch.rand(3, 4, dtype=torch.float64) - 0.5
    B = torch.randn(4, dtype=torch.float64)
    A_bar, B_bar = discretize(delta, A, B)
    for d in range(3):
        exact = torch.linalg.matrix_exp(delta[d] * torch.diag(A[d]))
        torch.testing.assert_close(A_bar[d], exact.diagonal(), **F64)
        torch.testing.assert_close(B_bar[d], delta[d] * B, **F64)


def test_zoh_is_the_augmented_matrix_exponential():
    """exp([[A, B], [0, 0]] Delta) = [[A_bar, B_bar], [0, I]] (Van Loan)."""
    torch.manual_seed(1)
    delta = torch.rand(2, dtype=torch.float64) + 0.2
    A = -torch.rand(2, 3, dtype=torch.float64) - 0.5
    B = torch.randn(3, dtype=torch.float64)
    A_bar, B_bar = zoh(delta, A, B)
    for d in range(2):
        M = torch.zeros(6, 6, dtype=torch.float64)
        M[:3, :3] = torch.diag(A[d])
        M[:3, 3:] = torch.diag(B)  # one input per state, to read B_bar off
        E = torch.linalg.matrix_exp(delta[d] * M)
        torch.testing.assert_close(A_bar[d], E[:3, :3].diagonal(), **F64)
        torch.testing.assert_close(B_bar[d], E[:3, 3:].diagonal(), **F64)


def test_mambas_b_is_zoh_to_second_order():
    A = -torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    B = torch.tensor([1.0, -2.0], dtype=torch.float64)
    errors = []
    for step in (0.01, 0.005):
        delta = torch.tensor([step], dtype=torch.float64)
        errors.append((discretize(delta, A, B)[1] - zoh(delta, A, B)[1]).abs().max())
    assert 3.9 < errors[0] / errors[1] < 4.1  # the error is O(Delta^2)


def _brute_force(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = sum_s (a_{s+1} ... a_t) b_s."""
    T = b.shape[1]
    h = torch.zeros(torch.broadcast_shapes(a.shape, b.shape), dtype=b.dtype)
    for t in range(T):
        for s in range(t + 1):
            h[:, t] += torch.prod(a[:, s + 1 : t + 1], dim=1) * b[:, s]
    return h


@pytest.mark.parametrize("T", [1, 2, 7, 16, 13])
def test_the_scans_equal_the_sum_of_products(T):
    torch.manual_seed(T)
    a = torch.rand(2, T, 3, dtype=torch.float64)
    b = torch.randn(2, T, 3, dtype=torch.float64)
    expected = _brute_force(a, b)
    torch.testing.assert_close(recurrent_scan(a, b), expected, **F64)
    torch.testing.assert_close(parallel_scan(a, b), expected, **F64)
    torch.testing.assert_close(scan(a, b, "recurrent"), expected, **F64)


def test_parallel_scan_broadcasts_and_has_gradients():
    torch.manual_seed(2)
    a = torch.rand(1, 9, 3, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 9, 3, 4, dtype=torch.float64)
    grads = []
    for fn in (parallel_scan, recurrent_scan, _brute_force):
        (fn(a, b) * w).sum().backward()
        grads.append((a.grad.clone(), b.grad.clone()))
        a.grad, b.grad = None, None
    torch.testing.assert_close(grads[0], grads[2], **F64)  # autograd of the sum
    torch.testing.assert_close(grads[1], grads[2], **F64)


def test_the_convolution_form_equals_the_recurrence_and_conv1d():
    torch.manual_seed(3)
    Bt, T, D, N = 2, 11, 3, 4
    A_bar, B_bar = discretize(
        torch.rand(D, dtype=torch.float64) + 0.1,
        -torch.rand(D, N, dtype=torch.float64) - 0.2,
        torch.randn(N, dtype=torch.float64),
    )
    C = torch.randn(D, N, dtype=torch.float64)
    x = torch.randn(Bt, T, D, dtype=torch.float64)
    K = ssm_kernel(A_bar, B_bar, C, T)  # (D, T)
    y = convolution_form(x, K)
    h = recurrent_scan(A_bar.expand(Bt, T, D, N), B_bar * x[..., None])
    torch.testing.assert_close(y, torch.einsum("btdn,dn->btd", h, C), **F64)
    # PyTorch's conv1d is a cross-correlation: flip the kernel, pad on the left
    ref = F.conv1d(F.pad(x.transpose(1, 2), (T - 1, 0)), K.flip(1)[:, None], groups=D)
    torch.testing.assert_close(y, ref.transpose(1, 2), **F64)


def test_selective_scan_equals_hf():
    torch.manual_seed(4)
    Bt, T, D, N = 2, 9, 5, 3
    x = torch.randn(Bt, T, D)
    delta = F.softplus(torch.randn(Bt, T, D))
    A = -torch.rand(D, N) - 0.1
    B, C = torch.randn(Bt, T, N), torch.randn(Bt, T, N)
    Dskip = torch.randn(D)
    ref = mamba_selective_scan(
        x.transpose(1, 2),
        delta.transpose(1, 2),
        A,
        B.transpose(1, 2),
        C.transpose(1, 2),
        D=Dskip,
    ).transpose(1, 2)
    for fn in (parallel_scan, recurrent_scan):
        torch.testing.assert_close(
            selective_scan(x, delta, A, B, C, Dskip, fn), ref, atol=1e-5, rtol=1e-5
        )


def test_the_mixer_equals_hf_mamba_mixer(pair):
    hf, ours = pair
    torch.manual_seed(5)
    u = torch.randn(2, 10, 16, dtype=torch.float64)
    mixer = ours.layers[0].mixer
    reference = hf.backbone.layers[0].mixer
    assert isinstance(reference, HFMambaMixer) and isinstance(mixer, MambaMixer)
    with torch.no_grad():
        expected = reference(u)
        torch.testing.assert_close(mixer(u), expected, **HF)
        torch.testing.assert_close(mixer(u, recurrent_scan), expected, **HF)


def test_the_model_equals_hf_in_every_path(pair):
    hf, ours = pair
    ids = torch.randint(V, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf(ids).logits
        parallel = ours(ids)
        torch.testing.assert_close(parallel, expected.double(), **HF)
        torch.testing.assert_close(ours(ids, scan="recurrent"), parallel, **F64)
        torch.testing.assert_close(ours.sequential(ids), parallel, **F64)
    assert ours.head.weight is ours.embedding.weight


def test_greedy_decoding_with_the_state_equals_hf_generate(pair):
    hf, ours = pair
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        expected = hf.generate(
            prompt,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        state = ours.new_state(1)
        for t in range(prompt.shape[1]):
            logits, state = ours.step(prompt[:, t], state)
        out = prompt
        for hf_logits in expected.logits:  # HF's logits of each generated token
            torch.testing.assert_close(logits, hf_logits.double(), **HF)
            token = logits.argmax(-1)
            out = torch.cat([out, token[:, None]], 1)
            logits, state = ours.step(token, state)
    assert out.tolist() == expected.sequences.tolist()


def test_gradients_equal_hf_in_both_paths(pair):
    hf, ours = pair
    ids = torch.randint(V, (1, 6), generator=torch.Generator().manual_seed(7))
    hf.zero_grad()
    hf(ids).logits.logsumexp(-1).sum().backward()
    names = ("dt_proj.weight", "x_proj.weight", "A_log", "conv1d.weight")
    reference = [hf.backbone.layers[0].mixer.get_parameter(n).grad for n in names]
    hf.zero_grad()
    for s in ("parallel", "recurrent"):
        ours.zero_grad()
        ours(ids, scan=s).logsumexp(-1).sum().backward()
        grads = [ours.layers[0].mixer.get_parameter(n).grad for n in names]
        for grad, expected in zip(grads, reference, strict=True):
            scale = expected.abs().max()  # dt_proj's gradients are ~1e-5 here
            assert scale > 0  # dt_proj and the rest are really used
            torch.testing.assert_close(grad, expected, atol=1e-5 * scale, rtol=1e-4)
    ours.zero_grad()


def test_configs_have_hf_parameter_counts():
    for name in ("mamba-130m", "mamba-370m"):
        c = CONFIGS[name]
        hf_config = HFMambaConfig(hidden_size=c.d_model, num_hidden_layers=c.n_layers)
        with torch.device("meta"):
            hf_count = sum(p.numel() for p in MambaForCausalLM(hf_config).parameters())
        assert count_parameters(lambda c=c: MambaLM(c)) == hf_count
    assert 129e6 < count_parameters(lambda: MambaLM(CONFIGS["mamba-130m"])) < 130e6


def test_associative_recall_answers_are_the_values_of_the_query():
    ids, targets = associative_recall(50, 4, 6, 5, torch.Generator().manual_seed(0))
    assert ids.shape == (50, 9) and targets.shape == (50,)
    for row, target in zip(ids.tolist(), targets.tolist(), strict=True):
        keys, values = row[0:8:2], row[1:8:2]
        assert len(set(keys)) == 4 and all(0 <= k < 6 for k in keys)
        assert all(6 <= v < 11 for v in values)
        assert values[keys.index(row[8])] == target


def test_largest_tensor_bytes_counts_allocations_not_views():
    a, b = torch.randn(30, 5), torch.randn(5, 70)
    assert largest_tensor_bytes(lambda: a @ b) == 30 * 70 * 4
    assert largest_tensor_bytes(lambda: a[:, :1].expand(30, 1000) + 0) == 30 * 1000 * 4
    assert largest_tensor_bytes(lambda: a[:, :1].expand(30, 1000)) == 30 * 5 * 4


def test_bad_input_gets_clear_errors(pair):
    _, ours = pair
    a = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        scan(a, a, "fast")
    with pytest.raises(ValueError, match="does not broadcast"):
        scan(torch.rand(2, 4, 3), a)
    with pytest.raises(ValueError, match=r"b must be \(B, T"):
        scan(torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match=r"K must be \(D, T\)"):
        convolution_form(a, torch.rand(3, 4))
    with pytest.raises(ValueError, match="no zero entry"):
        zoh(torch.rand(2), torch.zeros(2, 3), torch.rand(3))
    with pytest.raises(ValueError, match="d_state must be positive"):
        MambaConfig(d_state=0)
    with pytest.raises(TypeError, match="config must be a MambaConfig"):
        MambaLM({"d_model": 8})
    with pytest.raises(ValueError, match="ids must lie in"):
        ours(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match="scan must be one of"):
        ours(torch.tensor([[0, 1]]), scan="fast")
    with pytest.raises(ValueError, match="state must be a list of 2"):
        ours.step(torch.tensor([1]), ours.new_state(1)[:1])
    with pytest.raises(ValueError, match="needs at least as many keys"):
        associative_recall(3, 5, 4, 4)
    with pytest.raises(TypeError, match="fn must be callable"):
        largest_tensor_bytes(3)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        mamba_from_hf_state_dict([])
