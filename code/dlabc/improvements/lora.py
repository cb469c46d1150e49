"""LoRA: fine-tune a frozen linear layer through a trainable low-rank update.

Chapter: ``book/improvements/lora.md``.

References:
- Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang & Chen (2022), *LoRA: Low-Rank
  Adaptation of Large Language Models*, eq. 3 ($h = W_0 x + \\frac{\\alpha}{r} B A x$,
  $A$ random, $B = 0$ at the start, merging $W = W_0 + \\frac{\\alpha}{r} B A$).
- Aghajanyan, Gupta & Zettlemoyer (2021), *Intrinsic Dimensionality Explains the
  Effectiveness of Language Model Fine-Tuning* (why a small update suffices).
- Kalajdzievski (2023), *A Rank Stabilization Scaling Factor for Fine-Tuning with
  LoRA* (rsLoRA: the scaling $\\alpha / \\sqrt{r}$).

The names follow the paper and Hugging Face's ``peft``: a :class:`LoRALinear` wraps
the frozen ``base`` ``nn.Linear`` (weight $W_0$ of shape ``(out, in)``) and holds
``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``, the shapes of peft's
``lora_A[name].weight`` and ``lora_B[name].weight``, so copying an adapter between the
two is a renaming. :func:`apply_lora` wraps the chosen layers of any model and freezes
everything else; :func:`merge_and_unload` folds the updates into the weights;
:func:`adapter_state` and :func:`load_adapter` save and switch adapters on one base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "lora_scaling",
    "LoRALinear",
    "apply_lora",
    "lora_layers",
    "trainable_parameters",
    "merge_and_unload",
    "adapter_state",
    "load_adapter",
]


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    r"""The factor $s$ in front of $BA$: $s = \alpha / r$, or $\alpha / \sqrt{r}$
    for rsLoRA.

    With $s = \alpha / r$ and $\alpha$ fixed, changing the rank needs no new learning
    rate at small ranks (Hu et al., section 4.1); rsLoRA's $\alpha / \sqrt{r}$ keeps
    the update from fading at large ranks.
    """
    check_positive_int(r, "r")
    check_number(alpha, "alpha", low=0, low_open=True)
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora must be a bool, got {type(rslora).__name__}")
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    r"""A frozen ``nn.Linear`` plus a trainable low-rank update.

    $h = W_0 x + b + s\, B A\, \mathrm{dropout}(x), \qquad
    A \in \mathbb{R}^{r \times k},\; B \in \mathbb{R}^{d \times r},\;
    s = \alpha / r,$

    with $k$ = ``in_features``, $d$ = ``out_features``. $A$ starts random (Kaiming
    uniform, as ``nn.Linear`` and peft), $B$ at zero, so the wrapped layer computes
    exactly what ``base`` computes until training moves $B$. :meth:`merge` adds
    $s BA$ to $W_0$ (then the layer costs what ``base`` costs), :meth:`unmerge`
    subtracts it again. ``x`` ``(..., k)`` -> ``(..., d)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
    ) -> None:
        super().__init__()
        _check_layer(base, r, alpha, dropout, rslora)
        self.scaling = lora_scaling(r, alpha, rslora)  # s = alpha/r, or alpha/sqrt(r)
        self.base = base
        self.r, self.alpha, self.rslora = r, alpha, rslora
        for p in self.base.parameters():  # W_0 and b stay frozen
            p.requires_grad_(False)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))  # (r, k)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))  # (d, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, peft
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        """The wrapped layer's ``k`` (code written for ``nn.Linear`` reads it)."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """The wrapped layer's ``d``."""
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        r"""The update $\Delta W = s\, B A$, of shape ``(out, in)`` and rank $\le r$."""
        return self.scaling * (self.lora_B @ self.lora_A)  # (d, r) @ (r, k) -> (d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.base.in_features)
        # W_0 x + b (after merge() the weight already holds W_0 + s B A)
        h = self.base(x)  # (..., d)
        if self.merged:
            return h
        # + s B (A x): two thin products, never the (d, k) matrix B A
        z = self.dropout(x) @ self.lora_A.t()  # (..., r)
        return h + self.scaling * (z @ self.lora_B.t())  # (..., d)

    @torch.no_grad()
    def merge(self) -> None:
        r"""$W_0 \leftarrow W_0 + s BA$: the layer becomes a plain linear layer."""
        if self.merged:
            raise RuntimeError("the adapter is already merged")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        r"""$W_0 \leftarrow W_0 - s BA$: back to the frozen weight and the adapter."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule: a target is a module's full name or the end of it after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_layer(
    base: object, r: object, alpha: object, dropout: object, rslora: object
) -> None:
    """The arguments of :class:`LoRALinear`, checked before anything is built."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
    lora_scaling(r, alpha, rslora)  # checks r, alpha and rslora
    check_number(dropout, "dropout", low=0, high=1, high_open=True)
    if r > min(base.in_features, base.out_features):
        raise ValueError(
            f"r={r} must not exceed min(in_features, out_features) = "
            f"{min(base.in_features, base.out_features)}: a larger rank adds "
            "parameters but no expressiveness"
        )


def _check_input(x: object, in_features: int) -> None:
    """A floating-point ``x`` of shape ``(..., in_features)`` (metadata, no sync)."""
    check_tensor(x, "x", floating=True)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x must end in in_features={in_features}, got shape {tuple(x.shape)}"
        )


def _find_targets(
    model: object,
    target_names: object,
    r: object,
    alpha: object,
    dropout: object,
    rslora: object,
) -> list[tuple[str, nn.Linear]]:
    """The ``(name, layer)`` pairs that :func:`apply_lora` wraps, by peft's name rule.

    Checks everything before the model is changed: the model, the names, that every
    hit is a plain ``nn.Linear`` without an adapter, and the hyper-parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(target_names, str) or not isinstance(target_names, (list, tuple)):
        raise TypeError(
            f"target_names must be a list of module names, got {target_names!r}"
        )
    if not target_names or not all(isinstance(t, str) and t for t in target_names):
        raise ValueError(
            f"target_names must be non-empty names of modules, got {target_names!r}"
        )
    lora_scaling(r, alpha, rslora)  # check the hyper-parameters before changing model
    targets = tuple(target_names)
    hits = [
        (name, module)
        for name, module in model.named_modules()
        if name and _matches(name, targets)
    ]
    if not hits:
        raise ValueError(
            f"no module of the model is named like {list(targets)}; its linear "
            f"layers are {[n for n, m in model.named_modules() if type(m) is nn.Linear]}"
        )
    for name, module in hits:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if type(module) is not nn.Linear:
            raise TypeError(
                f"{name} is a {type(module).__name__}; LoRA here wraps nn.Linear only"
            )
        _check_layer(module, r, alpha, dropout, rslora)
    return hits


def apply_lora(
    model: nn.Module,
    target_names: list[str] | tuple[str, ...],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
) -> nn.Module:
    """Wrap the targeted ``nn.Linear`` layers of ``model`` in :class:`LoRALinear`
    and freeze every other parameter; returns ``model``, changed in place.

    A layer is targeted when its name (as in ``model.named_modules()``) equals an
    entry of ``target_names`` or ends with ``"." + entry``, the rule of peft's
    ``LoraConfig(target_modules=[...])``: ``["q_proj", "v_proj"]`` hits the query
    and value projections of every block. Only ``lora_A`` and ``lora_B`` remain
    trainable.
    """
    hits = _find_targets(model, target_names, r, alpha, dropout, rslora)
    for p in model.parameters():  # freeze everything ...
        p.requires_grad_(False)
    for name, module in hits:  # ... then add the trainable A and B
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(module, r, alpha, dropout, rslora))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The :class:`LoRALinear` layers of ``model``, by name, in model order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``: how many parameters the optimizer updates, of all.

    For LoRA on a $d \\times k$ layer the trainable count is $r (d + k)$ instead of
    $d k$.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(
        p.numel() for p in params
    )


def merge_and_unload(model: nn.Module) -> nn.Module:
    r"""Replace every :class:`LoRALinear` by its ``base`` with $W_0 + sBA$ merged in.

    The result has the original architecture: inference costs nothing extra. Changes
    ``model`` in place and returns it (peft's ``merge_and_unload``).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to merge")
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()  # W_0 <- W_0 + s B A, without gradients
        parent_name, _, child = name.rpartition(".")
        if not child:  # the model itself is a LoRALinear
            return layer.base
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone: a copy of every trainable parameter, by name.

    After :func:`apply_lora` these are the ``lora_A`` and ``lora_B`` of every wrapped
    layer, $r (d + k)$ numbers per layer, plus whatever was unfrozen on purpose (a new
    classification head, peft's ``modules_to_save``). This is what one stores per
    task; the frozen base is shared by all of them.
    """
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers")
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_adapter(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Switch ``model`` to another adapter saved by :func:`adapter_state`.

    Copies the tensors into the trainable parameters of the same names. The LoRA
    layers must be unmerged (a merged model would keep the old update in its
    weights), and the names and shapes must match exactly.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing, extra = (
            sorted(set(params) - set(state)),
            sorted(set(state) - set(params)),
        )
        raise ValueError(
            f"state does not fit the model: missing {missing}, unexpected {extra}"
        )
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"{name} is merged: unmerge it before switching")
    for name, param in params.items():
        value = check_tensor(state[name], f"state[{name!r}]")
        if value.shape != param.shape:
            raise ValueError(
                f"state[{name!r}] has shape {tuple(value.shape)}, the model needs "
                f"{tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(value)
