"""Tests for ``dlabc.generative.compare``: the registry calls every chapter's contract
correctly (tiny budgets on the cheap entrants), the budget arithmetic, and bad input."""

from __future__ import annotations

import inspect

import pytest

from dlabc.generative.compare import (
    BUDGET_SECONDS,
    ENTRANTS,
    SAMPLES,
    Entrant,
    measure,
    scaled,
)
from dlabc.generative.yardstick import Yardstick


@pytest.fixture(scope="module")
def quick_yardstick():
    return Yardstick(steps=5)


def _entrant(name: str) -> Entrant:
    return next(e for e in ENTRANTS if e.name == name)


def test_steps_fit_the_budget():
    for e in ENTRANTS:
        assert e.steps == max(2, round(BUDGET_SECONDS / e.step_seconds))
        assert scaled(e, 2.0) == max(2, round(2 * e.steps))
    names = [e.name for e in ENTRANTS]
    assert len(set(names)) == len(names)


def test_every_entrant_accepts_its_options():
    for e in ENTRANTS:
        parameters = inspect.signature(e.generate).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        for option in (*e.options, *(["return_model"] if e.bits_per_dim else [])):
            assert takes_any or option in parameters, (e.name, option)


@pytest.mark.parametrize("name", ["VAE", "CVAE"])
def test_a_row_measures_fresh_samples(name, quick_yardstick):
    entrant = _entrant(name)
    row, samples = measure(entrant, quick_yardstick, factor=3 / entrant.steps)
    assert samples.shape == (SAMPLES, 1, 28, 28)
    assert 0.0 <= float(samples.min()) and float(samples.max()) <= 1.0
    assert row["steps"] == 3 and row["seconds"] > 0
    assert row["fd"] == pytest.approx(quick_yardstick.fd(samples))
    assert ("bits_per_dim" in row) == (entrant.bits_per_dim is not None)
    if "bits_per_dim" in row:
        assert 0 < row["bits_per_dim"] < 2


def test_bad_input_is_rejected(quick_yardstick):
    with pytest.raises(TypeError, match="Entrant"):
        measure("VAE", quick_yardstick)
    with pytest.raises(TypeError, match="Yardstick"):
        measure(ENTRANTS[0], None)
    with pytest.raises(ValueError, match="seed"):
        measure(ENTRANTS[0], quick_yardstick, seed=-1)
    with pytest.raises(ValueError, match="factor"):
        scaled(ENTRANTS[0], 0.0)
