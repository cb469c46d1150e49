r"""The generators of the part side by side: each trained from scratch at one budget on
the same 4,000 digits, and measured with the same yardstick.

Chapter: ``book/generative/compare.md``.

Every generator chapter exports ``generate_digits(steps, n, seed, **options)``, which
trains its model from scratch and returns ``n`` samples ``(n, 1, 28, 28)`` in [0, 1].
:data:`ENTRANTS` lists them with a number of steps chosen so that each trains for about
the same CPU time (:data:`BUDGET_SECONDS` on one thread of the machine that builds the
book, from the cost per step each chapter's docstring states): the table answers
"what does a small, equal amount of computation buy?", not "which model is best". Models
with a likelihood also report it, in bits per dimension on the binarised test digits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dlabc.checks import check_number, check_positive_int
from dlabc.generative import (
    cvae_vqvae,
    ddpm,
    flows,
    gan,
    latent_diffusion,
    pixelcnn,
    stylegan,
    vae,
    wgan_gp,
)
from dlabc.generative.yardstick import Yardstick, binarize, digits

__all__ = ["BUDGET_SECONDS", "SAMPLES", "Entrant", "ENTRANTS", "scaled", "measure"]

#: The training time each entrant gets, in seconds of one CPU thread (approximately:
#: the steps are fixed, so that every run of the page trains the same models).
BUDGET_SECONDS = 2.0

#: The digits each entrant draws for the yardstick: half the chapters' 1,000, so that
#: the slow samplers (a U-Net run per diffusion step, a pass per pixel) fit the page's
#: minute. Distances are comparable only at equal sample sizes: within this table.
SAMPLES = 500


@dataclass(frozen=True)
class Entrant:
    """One generator of the table: its chapter's ``generate_digits``, the options it is
    called with, and the steps that fit :data:`BUDGET_SECONDS`.

    ``step_seconds`` is the cost of one step on one thread (from the chapter);
    ``bits_per_dim``, for models with a likelihood, maps ``(model, binary images)`` to
    the negative log-likelihood (or its bound) in bits per dimension; those entrants are
    called with ``return_model=True``.
    """

    name: str
    family: str
    chapter: str
    generate: Callable[..., object]
    step_seconds: float
    options: dict = field(default_factory=dict)
    bits_per_dim: Callable[[torch.nn.Module, torch.Tensor], float] | None = None

    @property
    def steps(self) -> int:
        """The steps that take about :data:`BUDGET_SECONDS`."""
        return max(2, round(BUDGET_SECONDS / self.step_seconds))


ENTRANTS = (
    Entrant("MLP GAN", "adversarial", "gan", gan.generate_digits, 0.008, {"model": "mlp"}),
    Entrant("DCGAN", "adversarial", "gan", gan.generate_digits, 0.025, {"model": "dcgan"}),
    Entrant("WGAN-GP", "adversarial", "wgan_gp", wgan_gp.generate_digits, 0.07),
    Entrant("StyleGAN", "adversarial", "stylegan", stylegan.generate_digits, 0.05),
    Entrant(
        "VAE", "latent variable", "vae", vae.generate_digits, 0.006,
        bits_per_dim=vae.negative_elbo_bits_per_dim,
    ),
    Entrant("CVAE", "latent variable", "cvae_vqvae", cvae_vqvae.generate_digits, 0.0055),
    Entrant(
        "DDPM (DDIM, 10 steps)", "diffusion", "ddpm", ddpm.generate_digits, 0.07,
        {"sampling_steps": 10},
    ),
    Entrant(
        "latent diffusion", "diffusion", "latent_diffusion",
        latent_diffusion.generate_digits, 0.004,
    ),
    Entrant(
        "PixelCNN", "autoregressive", "pixelcnn", pixelcnn.generate_digits, 0.3,
        bits_per_dim=pixelcnn.nll_bits_per_dim,
    ),
    Entrant(
        "Glow-like flow", "flow", "flows", flows.generate_digits, 0.05,
        bits_per_dim=flows.nll_bits_per_dim,
    ),
)  # fmt: skip


def scaled(entrant: Entrant, factor: float) -> int:
    """The steps of ``entrant`` for ``factor`` times the budget (at least 2)."""
    check_number(factor, "factor", low=0, low_open=True)
    return max(2, round(factor * entrant.steps))


def measure(
    entrant: Entrant,
    yardstick: Yardstick,
    seed: int = 0,
    factor: float = 1.0,
    n: int = SAMPLES,
) -> tuple[dict[str, float], torch.Tensor]:
    """Train ``entrant`` from scratch at ``factor`` times the budget, draw ``n`` digits,
    and measure them: returns the table's row and the samples."""
    # by its fields, not isinstance: a Colab notebook may redefine Entrant after
    # ENTRANTS were made (its editable cell of the class)
    if not all(
        hasattr(entrant, f) for f in ("generate", "steps", "options", "bits_per_dim")
    ):
        raise TypeError(f"entrant must be an Entrant, got {type(entrant).__name__}")
    if not isinstance(yardstick, Yardstick):
        raise TypeError(
            f"yardstick must be a Yardstick, got {type(yardstick).__name__}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    check_positive_int(n, "n")
    return _measure(entrant, yardstick, seed, scaled(entrant, factor), n)


def _measure(entrant, yardstick, seed, steps, n):
    options = dict(entrant.options)
    if entrant.bits_per_dim is not None:
        options["return_model"] = True
    start = time.process_time()  # the CPU time of this process: fair on a busy machine
    out = entrant.generate(steps, n=n, seed=seed, **options)
    seconds = time.process_time() - start
    samples, model = out if entrant.bits_per_dim is not None else (out, None)
    row = {"steps": steps, "seconds": seconds, **yardstick.evaluate(samples)}
    if model is not None:
        test = binarize(digits("test")[0])
        with torch.no_grad():
            row["bits_per_dim"] = entrant.bits_per_dim(model, test)
    return row, samples
