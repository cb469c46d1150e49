"""The Language models part: tokenizers, BERT and its family, fine-tuning, GPT-2,
GPT-3 and in-context learning, T5, Transformer-XL and XLNet."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["count_parameters", "published_sizes"]


def count_parameters(make: Callable[[], nn.Module]) -> int:
    """The number of parameters of the model that ``make()`` builds, without memory.

    The model is made on PyTorch's ``meta`` device, where tensors have shapes but no
    storage, so even a 175-billion-parameter configuration is counted in milliseconds
    and no memory. A tensor shared by two modules (tied embeddings) counts once.
    """
    if isinstance(make, nn.Module) or not callable(make):
        raise TypeError(f"make must be a callable that returns a module, got {make!r}")
    with torch.device("meta"):
        model = make()
    if not isinstance(model, nn.Module):
        raise TypeError(f"make() must return an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())  # parameters() skips repeats


def published_sizes() -> list[dict]:
    """The published models of this part with their sizes, for the part's introduction.

    One row per model: its ``name``, ``family`` (encoder, decoder, encoder-decoder),
    ``layers``, ``width``, ``heads`` from the chapter's configuration, ``parameters``
    counted by :func:`count_parameters` on the chapter's own model class, and ``stated``
    (the size the paper gives, or ``None``) with the ``source`` to cite. The chapters'
    modules are imported here, not at the top: each of them imports this package.
    """
    from dlabc.improvements.modern_block import BlockLM
    from dlabc.language_models import bert, bert_family, gpt2, gpt3_icl, t5
    from dlabc.language_models import transformer_xl as xl

    def row(name, family, config, make, stated, source, width=None, heads=None):
        layers = getattr(config, "n_layers", None)
        width = width or getattr(config, "hidden_size", None) or config.d_model
        heads = heads or config.n_heads
        return dict(
            name=name,
            family=family,
            layers=layers,
            width=width,
            heads=heads,
            parameters=count_parameters(make),
            stated=stated,
            source=source,
        )

    rows = []
    for key, name, stated in [
        ("bert-base", "BERT-base", 110e6),
        ("bert-large", "BERT-large", 340e6),
    ]:
        c = bert.CONFIGS[key]
        rows.append(
            row(
                name,
                "encoder",
                c,
                lambda c=c: bert.BertModel(c),
                stated,
                "devlin2019bert",
            )
        )
    for key, name, stated, source in [
        ("roberta-large", "RoBERTa-large", None, "liu2019roberta"),
        ("albert-base", "ALBERT-base", 12e6, "lan2020albert"),
        ("albert-xxlarge", "ALBERT-xxlarge", 235e6, "lan2020albert"),
        ("distilbert-base", "DistilBERT", 66e6, "sanh2019distilbert"),
        ("deberta-large", "DeBERTa-large", None, "he2021deberta"),
    ]:
        c = bert_family.CONFIGS[key]
        rows.append(
            row(name, "encoder", c, lambda c=c: bert_family.build(c), stated, source)
        )
    c = bert.CONFIGS["all-MiniLM-L6-v2"]
    rows.append(
        row(
            "all-MiniLM-L6-v2",
            "encoder",
            c,
            lambda: bert.BertModel(c),
            None,
            "wang2020minilm",
        )
    )
    for key, name, stated in [
        ("gpt2", "GPT-2 small", 117e6),
        ("gpt2-medium", "GPT-2 medium", 345e6),
        ("gpt2-large", "GPT-2 large", 762e6),
        ("gpt2-xl", "GPT-2 XL", 1542e6),
    ]:
        c = gpt2.CONFIGS[key]
        rows.append(
            row(
                name,
                "decoder",
                c,
                lambda c=c: gpt2.GPT2(c),
                stated,
                "radford2019language",
            )
        )
    for key in ("gpt3-small", "gpt3-xl", "gpt3-13b", "gpt3-175b"):
        c = gpt3_icl.CONFIGS[key]
        name = "GPT-3 " + key.removeprefix("gpt3-").replace("b", "B").replace(
            "xl", "XL"
        )
        stated = gpt3_icl.TABLE_2_1[key][0]
        rows.append(
            row(
                name,
                "decoder",
                c,
                lambda c=c: gpt3_icl.GPT3(c),
                stated,
                "brown2020language",
            )
        )
    rows.append(
        dict(
            name="SmolLM2-135M",
            family="decoder",
            layers=30,
            width=576,
            heads=9,
            parameters=count_parameters(
                lambda: BlockLM(
                    49152, 576, 9, 30, 1536, n_kv_heads=3, base=1e5, tie_embeddings=True
                )
            ),
            stated=135e6,
            source="allal2025smollm2",
        )
    )
    for key, name in [("xlnet-base", "XLNet-base"), ("xlnet-large", "XLNet-large")]:
        c = xl.CONFIGS[key]
        rows.append(
            row(name, "decoder", c, lambda c=c: xl.XLNet(c), None, "yang2019xlnet")
        )
    for key, name in [
        ("t5-small", "T5-small"),
        ("t5-base", "T5-base"),
        ("t5-large", "T5-large"),
        ("t5-3B", "T5-3B"),
        ("t5-11B", "T5-11B"),
    ]:
        c = t5.CONFIGS[key]
        stated = t5.PUBLISHED_SIZES[key]
        rows.append(
            row(
                name,
                "encoder-decoder",
                c,
                lambda c=c: t5.T5(c),
                stated,
                "raffel2020exploring",
            )
        )
    return rows
