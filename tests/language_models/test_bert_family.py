"""Tests for ``dlabc.language_models.bert_family``.

Each encoder is compared, in float64, with its Hugging Face reference built from a tiny
random configuration (``RobertaModel``, ``AlbertModel``, ``DistilBertModel``,
``DebertaModel`` v1), our random weights loaded into it strictly with ``hf_state_dict``,
on a batch with padding (compared at the real positions). Hugging Face computes
DeBERTa's LayerNorm in float32 whatever the input's precision; the test patches it to
the input's precision, and uses heads of 12 features, where the $\\sqrt{3d} = 6$ that
Hugging Face computes in float32 is exact. RoBERTa's positions are compared with Hugging
Face's ``create_position_ids_from_input_ids``, DeBERTa's relative index with a double
loop, the parameter counts of the published configurations with Hugging Face's models
built on the meta device, the distillation loss with ``F.kl_div``,
``nn.CosineEmbeddingLoss`` and the closed-form gradient of the soft-target loss. Bad
input must fail clearly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers.models.deberta.modeling_deberta as hf_deberta
from torch import nn

import transformers
from dlabc.language_models import count_parameters
from dlabc.language_models.bert import (
    BertConfig,
    BertForPreTraining,
    BertModel,
    mask_tokens,
)
from dlabc.language_models.bert_family import (
    CONFIGS,
    AlbertConfig,
    AlbertModel,
    DebertaConfig,
    DebertaModel,
    DisentangledSelfAttention,
    DistilBertConfig,
    DistilBertModel,
    MaskedLM,
    RobertaConfig,
    RobertaModel,
    build,
    distillation_loss,
    hf_state_dict,
    masked_lm_loss,
    pretrain,
    relative_position_index,
    roberta_position_ids,
    static_masks,
    student_from_teacher,
)

transformers.logging.set_verbosity_error()
ATOL = 1e-10
SIZES = dict(vocab_size=40, hidden_size=24, n_heads=2, intermediate_size=36)
HF_SIZES = dict(
    vocab_size=40,
    hidden_size=24,
    num_attention_heads=2,
    intermediate_size=36,
    hidden_act="gelu",
)


def _randomize(model: nn.Module) -> nn.Module:
    """Random weights everywhere, norm scales too; float64, evaluation mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p.dim() == 1) + 0.3 * torch.randn_like(p))
    return model.double().eval()


def _batch(pad_id: int, length: int = 11):
    torch.manual_seed(1)
    ids = torch.randint(3, 40, (3, length))
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = pad_id, 0
    ids[2, 4:], mask[2, 4:] = pad_id, 0
    return ids, mask


def _gap(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> float:
    return (ours - theirs)[mask.bool()].abs().max().item()


# ------------------------------------------------------------------ RoBERTa


def test_roberta_position_ids_match_hugging_face():
    ids, _ = _batch(pad_id=1)
    hf = transformers.models.roberta.modeling_roberta.RobertaEmbeddings
    expected = hf.create_position_ids_from_input_ids(ids, padding_idx=1)
    assert torch.equal(roberta_position_ids(ids, 1), expected)
    assert roberta_position_ids(ids, 1)[0, 0] == 2  # starts at pad_id + 1


@pytest.mark.parametrize("n_layers", [1, 3])
def test_roberta_matches_hugging_face(n_layers):
    config = RobertaConfig(**SIZES, n_layers=n_layers, max_position=20)
    ours = _randomize(RobertaModel(config))
    hf = transformers.RobertaModel(
        transformers.RobertaConfig(
            **HF_SIZES,
            num_hidden_layers=n_layers,
            max_position_embeddings=20,
            type_vocab_size=1,
            pad_token_id=1,
            layer_norm_eps=1e-5,
        )
    )
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    hf.double().eval()
    ids, mask = _batch(pad_id=1)
    h, pooled = ours(ids, attention_mask=mask)
    out = hf(ids, attention_mask=mask)
    assert _gap(h, out.last_hidden_state, mask) < ATOL
    assert (pooled - out.pooler_output).abs().max() < ATOL


# ------------------------------------------------------------------ ALBERT


@pytest.mark.parametrize(("n_layers", "n_groups"), [(4, 1), (4, 2), (3, 3)])
def test_albert_matches_hugging_face(n_layers, n_groups):
    config = AlbertConfig(
        **SIZES,
        embedding_size=10,
        n_layers=n_layers,
        n_groups=n_groups,
        max_position=20,
    )
    ours = _randomize(AlbertModel(config))
    hf = transformers.AlbertModel(
        transformers.AlbertConfig(
            **HF_SIZES,
            embedding_size=10,
            num_hidden_layers=n_layers,
            num_hidden_groups=n_groups,
            inner_group_num=1,
            max_position_embeddings=20,
            layer_norm_eps=1e-12,
        )
    )
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    hf.double().eval()
    ids, mask = _batch(pad_id=0)
    types = (torch.arange(11) > 5).long().expand(3, -1)
    h, pooled = ours(ids, types, mask)
    out = hf(ids, attention_mask=mask, token_type_ids=types)
    assert _gap(h, out.last_hidden_state, mask) < ATOL
    assert (pooled - out.pooler_output).abs().max() < ATOL


def test_albert_sharing_divides_the_stack_and_factorising_the_embedding():
    shared = AlbertConfig(**SIZES, embedding_size=8, n_layers=6, n_groups=1)
    unshared = dataclasses.replace(shared, n_groups=6)
    layer = sum(p.numel() for p in AlbertModel(shared).groups[0].parameters())
    gap = count_parameters(lambda: AlbertModel(unshared)) - count_parameters(
        lambda: AlbertModel(shared)
    )
    assert gap == 5 * layer


# ------------------------------------------------------------------ DistilBERT


def test_distilbert_matches_hugging_face():
    config = DistilBertConfig(**SIZES, n_layers=2, max_position=20)
    ours = _randomize(DistilBertModel(config))
    hf = transformers.DistilBertModel(
        transformers.DistilBertConfig(
            vocab_size=40,
            dim=24,
            n_layers=2,
            n_heads=2,
            hidden_dim=36,
            max_position_embeddings=20,
            activation="gelu",
        )
    )
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    hf.double().eval()
    ids, mask = _batch(pad_id=0)
    assert (
        _gap(ours(ids, mask), hf(ids, attention_mask=mask).last_hidden_state, mask)
        < ATOL
    )


def test_student_from_teacher_runs_every_other_teacher_layer():
    teacher = _randomize(BertModel(BertConfig(**SIZES, n_layers=5, max_position=20)))
    student, kept = student_from_teacher(teacher)
    assert kept == [0, 2, 4] and len(student.layers) == 3
    student.double().eval()
    ids, mask = _batch(pad_id=0)
    # the teacher's own pieces, run by hand without the segment embedding
    emb = teacher.embeddings
    x = emb.norm(emb.word_embeddings(ids) + emb.position_embeddings.weight[:11])
    for i in kept:
        x = teacher.layers[i](x, mask.bool()[:, None, :])
    assert _gap(student(ids, mask), x, mask) < ATOL


def _distillation_reference(s, t, labels, hs, ht, T, w):
    soft = F.kl_div(
        F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean"
    ) * (T**2)
    hard = F.cross_entropy(s, labels)
    cos = nn.CosineEmbeddingLoss()(hs, ht, torch.ones(len(hs), dtype=hs.dtype))
    return w[0] * soft + w[1] * hard + w[2] * cos


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_distillation_loss_matches_torch_losses(T):
    torch.manual_seed(2)
    s, t = (
        torch.randn(7, 13, dtype=torch.float64),
        torch.randn(7, 13, dtype=torch.float64),
    )
    labels = torch.randint(13, (7,))
    hs, ht = (
        torch.randn(9, 5, dtype=torch.float64),
        torch.randn(9, 5, dtype=torch.float64),
    )
    w = (5.0, 2.0, 1.0)
    ours = distillation_loss(s, t, labels, hs, ht, T, w)
    assert abs(ours - _distillation_reference(s, t, labels, hs, ht, T, w)) < 1e-12


def test_soft_target_gradient_is_t_times_the_difference_of_distributions():
    """Hinton et al.: d(T^2 KL)/dz_s = T (q_s - q_t) per position."""
    torch.manual_seed(3)
    T = 3.0
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64)
    h = torch.randn(4, 2, dtype=torch.float64)
    loss = distillation_loss(s, t, torch.zeros(4, dtype=torch.long), h, h, T, (1, 0, 0))
    (grad,) = torch.autograd.grad(loss, s)
    expected = T * (F.softmax(s / T, -1) - F.softmax(t / T, -1)) / 4
    assert torch.allclose(grad, expected, atol=1e-14, rtol=0)


# ------------------------------------------------------------------ DeBERTa


def test_relative_position_index_is_the_clipped_distance():
    for length, k in [(5, 2), (6, 10), (1, 1)]:
        delta = relative_position_index(length, k)
        for i in range(length):
            for j in range(length):
                assert delta[i, j] == min(max(i - j + k, 0), 2 * k - 1)


def _float64_layer_norm(self, x):
    mean = x.mean(-1, keepdim=True)
    variance = (x - mean).pow(2).mean(-1, keepdim=True)
    return (
        self.weight * (x - mean) / torch.sqrt(variance + self.variance_epsilon)
        + self.bias
    )


@pytest.mark.parametrize("k", [3, 16])  # clipped (k < T) and not (k > T)
def test_deberta_matches_hugging_face(k, monkeypatch):
    monkeypatch.setattr(hf_deberta.DebertaLayerNorm, "forward", _float64_layer_norm)
    config = DebertaConfig(
        **SIZES, n_layers=2, max_position=20, max_relative_positions=k
    )
    ours = _randomize(DebertaModel(config))
    hf = transformers.DebertaModel(
        transformers.DebertaConfig(
            **HF_SIZES,
            num_hidden_layers=2,
            max_position_embeddings=20,
            relative_attention=True,
            max_relative_positions=k,
            pos_att_type=["c2p", "p2c"],
            position_biased_input=False,
            type_vocab_size=0,
            layer_norm_eps=1e-7,
        )
    )
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    hf.double().eval()
    ids, mask = _batch(pad_id=0)
    assert (
        _gap(ours(ids, mask), hf(ids, attention_mask=mask).last_hidden_state, mask)
        < ATOL
    )


def test_disentangled_attention_sees_only_relative_positions():
    """Without absolute positions, shifting a sequence inside a longer one (padded
    keys around it hidden) leaves the outputs unchanged."""
    torch.manual_seed(4)
    attn = DisentangledSelfAttention(24, 2, k=4).double()
    P = torch.randn(8, 24, dtype=torch.float64)
    h = torch.randn(1, 6, 24, dtype=torch.float64)
    full = torch.ones(1, 1, 6, dtype=torch.bool)
    padded = torch.cat([torch.randn(1, 3, 24, dtype=torch.float64), h], 1)  # (1, 9, 24)
    mask = torch.ones(1, 1, 9, dtype=torch.bool)
    mask[..., :3] = False
    assert torch.allclose(attn(padded, P, mask)[:, 3:], attn(h, P, full), atol=1e-12)


# ------------------------------------------------------------------ counts, heads


def test_published_counts_equal_hugging_face_models():
    cases = {
        "roberta-base": (
            transformers.RobertaModel,
            transformers.RobertaConfig(max_position_embeddings=514, type_vocab_size=1),
        ),
        "albert-base": (
            transformers.AlbertModel,
            transformers.AlbertConfig(
                hidden_size=768, num_attention_heads=12, intermediate_size=3072
            ),
        ),
        "albert-xlarge": (
            transformers.AlbertModel,
            transformers.AlbertConfig(
                hidden_size=2048,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=8192,
            ),
        ),
        "albert-xxlarge": (transformers.AlbertModel, transformers.AlbertConfig()),
        "distilbert-base": (
            transformers.DistilBertModel,
            transformers.DistilBertConfig(),
        ),
        "deberta-base": (
            transformers.DebertaModel,
            transformers.DebertaConfig(
                relative_attention=True,
                max_relative_positions=-1,
                position_biased_input=False,
                pos_att_type=["c2p", "p2c"],
                type_vocab_size=0,
            ),
        ),
    }
    for name, (model, config) in cases.items():
        with torch.device("meta"):
            hf = model(config)
        expected = sum(p.numel() for p in hf.parameters())
        assert count_parameters(lambda c=CONFIGS[name]: build(c)) == expected, name


def test_build_makes_the_model_of_each_config():
    kinds = {
        RobertaConfig: RobertaModel,
        AlbertConfig: AlbertModel,
        DistilBertConfig: DistilBertModel,
        DebertaConfig: DebertaModel,
    }
    for config in CONFIGS.values():  # the published kinds, at a tiny size
        tiny = dataclasses.replace(config, **SIZES, n_layers=2, max_position=20)
        if isinstance(tiny, AlbertConfig):
            tiny = dataclasses.replace(tiny, n_groups=1)
        assert type(build(tiny)) is kinds[type(config)]
    assert type(build(BertConfig(**SIZES, n_layers=1))) is BertModel


def test_masked_lm_equals_bert_for_pre_training_head():
    config = BertConfig(**SIZES, n_layers=2, max_position=20)
    reference = _randomize(BertForPreTraining(config))
    model = MaskedLM(BertModel(config)).double().eval()
    model.encoder.load_state_dict(reference.bert.state_dict())
    model.mlm.load_state_dict(reference.mlm.state_dict())
    assert model.mlm.decoder.weight is model.encoder.embeddings.word_embeddings.weight
    ids, _ = _batch(pad_id=0)
    logits, h = model(ids, return_hidden=True)
    assert (logits - reference(ids)[0]).abs().max() < ATOL
    assert h.shape == (3, 11, 24)
    for encoder in (
        DebertaModel(DebertaConfig(**SIZES, n_layers=1, max_relative_positions=4)),
        AlbertModel(AlbertConfig(**SIZES, n_layers=2, embedding_size=24)),
    ):
        assert MaskedLM(encoder).double()(ids).shape == (3, 11, 40)


# ------------------------------------------------------------------ the experiment


def _tiny_lm(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(**SIZES, n_layers=1, max_position=20, dropout=0.0)
    return MaskedLM(BertModel(config)).double()


def test_pretrain_first_loss_is_the_masked_cross_entropy():
    windows = torch.randint(5, 40, (6, 10))
    model = _tiny_lm()
    reference = _tiny_lm()  # the same initial weights
    losses = pretrain(model, windows, 2, mask_id=4, batch_size=3, seed=5)
    generator = torch.Generator().manual_seed(5)
    index = torch.randint(6, (3,), generator=generator)
    inputs, labels = mask_tokens(windows[index], 4, 40, generator=generator)
    expected = F.cross_entropy(
        reference(inputs).flatten(0, 1), labels.flatten(), ignore_index=-100
    )
    assert len(losses) == 2 and abs(losses[0] - expected.item()) < 1e-12
    assert not model.training


def test_pretrain_with_static_masks_and_a_teacher():
    windows = torch.randint(5, 40, (6, 10))
    static = static_masks(windows, 4, 40, seed=1)
    again = static_masks(windows, 4, 40, seed=1)
    assert torch.equal(static[0], again[0]) and torch.equal(static[1], again[1])
    teacher, student, reference = _tiny_lm(1), _tiny_lm(), _tiny_lm()
    losses = pretrain(
        student, windows, 1, 4, batch_size=3, seed=2, static=static, teacher=teacher
    )
    index = torch.randint(6, (3,), generator=torch.Generator().manual_seed(2))
    inputs, labels = static[0][index], static[1][index]
    chosen = labels != -100
    s, hs = reference(inputs, return_hidden=True)
    t, ht = teacher.eval()(inputs, return_hidden=True)
    expected = _distillation_reference(
        s[chosen], t[chosen], labels[chosen], hs.flatten(0, 1), ht.flatten(0, 1), 2.0,
        (5.0, 2.0, 1.0),
    )  # fmt: skip
    assert abs(losses[0] - expected.item()) < 1e-12


def test_masked_lm_loss_matches_cross_entropy_with_ignore_index():
    model = _tiny_lm().eval()
    inputs, labels = mask_tokens(
        torch.randint(5, 40, (4, 9)), 4, 40, generator=torch.Generator().manual_seed(0)
    )
    expected = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
    assert abs(masked_lm_loss(model, inputs, labels) - expected.item()) < 1e-12


# ------------------------------------------------------------------ bad input


def test_bad_configurations_fail_clearly():
    with pytest.raises(ValueError, match="pad_id"):
        RobertaConfig(pad_id=600)
    with pytest.raises(TypeError, match="pad_id must be an int"):
        RobertaConfig(pad_id=True)
    with pytest.raises(ValueError, match="n_groups"):
        AlbertConfig(n_layers=12, n_groups=5)
    with pytest.raises(ValueError, match="embedding_size"):
        AlbertConfig(embedding_size=0)
    with pytest.raises(ValueError, match="max_relative_positions"):
        DebertaConfig(max_relative_positions=0)
    with pytest.raises(TypeError, match="RobertaConfig"):
        RobertaModel(BertConfig())
    with pytest.raises(TypeError, match="AlbertConfig"):
        AlbertModel(BertConfig())
    with pytest.raises(TypeError, match="DistilBertConfig"):
        DistilBertModel(BertConfig())
    with pytest.raises(TypeError, match="DebertaConfig"):
        DebertaModel(BertConfig())
    with pytest.raises(TypeError, match="BertConfig"):
        build("roberta-base")


def test_bad_inputs_fail_clearly():
    roberta = RobertaModel(RobertaConfig(**SIZES, n_layers=1, max_position=10))
    with pytest.raises(ValueError, match="pad_id - 1 = 8"):
        roberta(torch.ones(1, 9, dtype=torch.long))
    deberta = DebertaModel(DebertaConfig(**SIZES, n_layers=1, max_position=10))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        deberta(torch.full((1, 3), 40))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        deberta(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4))
    with pytest.raises(ValueError, match="more than max_position"):
        deberta(torch.ones(1, 11, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        deberta(torch.ones(1, 3))
    with pytest.raises(ValueError, match="k must be positive"):
        relative_position_index(4, 0)
    with pytest.raises(ValueError, match="not divisible"):
        DisentangledSelfAttention(10, 3, 4)
    with pytest.raises(TypeError, match="teacher must be a BertModel"):
        student_from_teacher(deberta)
    with pytest.raises(TypeError, match="model must be a RobertaModel"):
        hf_state_dict(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="encoder must be"):
        MaskedLM(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="steps must be positive"):
        pretrain(_tiny_lm(), torch.ones(2, 5, dtype=torch.long), 0, mask_id=4)
    with pytest.raises(TypeError, match="windows"):
        pretrain(_tiny_lm(), torch.ones(2, 5), 1, mask_id=4)


def test_bad_distillation_inputs_fail_clearly():
    s, labels, h = (
        torch.randn(4, 6),
        torch.zeros(4, dtype=torch.long),
        torch.randn(5, 3),
    )
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(s, torch.randn(4, 7), labels, h, h)
    with pytest.raises(ValueError, match="labels must have 4"):
        distillation_loss(s, s, labels[:3], h, h)
    with pytest.raises(ValueError, match="teacher_hidden"):
        distillation_loss(s, s, labels, h, h[:4])
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, s, labels, h, h, temperature=0.0)
    with pytest.raises(ValueError, match="weights must be 3"):
        distillation_loss(s, s, labels, h, h, weights=(1.0, 2.0))
