"""dlabc.checks: the argument checks every module uses."""

import math
import re

import numpy as np
import pytest
import torch

from dlabc import checks
from dlabc.checks import check_array, check_number, check_positive_int, check_tensor


def test_check_tensor_accepts_and_returns():
    x = torch.zeros(2, 3)
    assert check_tensor(x, "x", ndim=(2, 3), floating=True, dtype=torch.float32) is x


@pytest.mark.parametrize(
    "value, kwargs, error, match",
    [
        ([1.0], {}, TypeError, "x must be a torch.Tensor, got list"),
        (
            torch.zeros(2),
            {"ndim": 2},
            ValueError,
            r"x must have 2 dimensions, got shape \(2,\)",
        ),
        (torch.zeros(2), {"ndim": (3, 4)}, ValueError, "3 or 4 dimensions"),
        (
            torch.zeros(2, dtype=torch.long),
            {"floating": True},
            TypeError,
            "floating-point",
        ),
        (torch.zeros(2), {"dtype": torch.bool}, TypeError, "dtype torch.bool"),
    ],
)
def test_check_tensor_rejects(value, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_tensor(value, "x", **kwargs)


def test_check_positive_int():
    assert check_positive_int(3, "n") == 3
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_positive_int(True, "n")
    with pytest.raises(TypeError, match="got float"):
        check_positive_int(2.0, "n")
    with pytest.raises(ValueError, match="n must be positive, got 0"):
        check_positive_int(0, "n")


@pytest.mark.parametrize(
    "value, kwargs",
    [
        (3, {}),
        (-2.5, {}),
        (0, {"low": 0}),  # closed bounds include themselves
        (1, {"low": 0, "high": 1}),
        (0.5, {"low": 0, "high": 1, "low_open": True, "high_open": True}),
        (1e-300, {"low": 0, "low_open": True}),
        (-7, {"high": -7}),
    ],
)
def test_check_number_accepts_and_returns_a_float(value, kwargs):
    result = check_number(value, "x", **kwargs)
    assert type(result) is float and result == value


@pytest.mark.parametrize(
    "value, got", [(True, "bool"), ("0.1", "str"), (None, "NoneType"), ([1.0], "list")]
)
def test_check_number_rejects_non_numbers(value, got):
    with pytest.raises(TypeError, match=f"x must be a number, got {got}"):
        check_number(value, "x")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_number_rejects_non_finite(value):
    with pytest.raises(ValueError, match=f"x must be finite, got {value}"):
        check_number(value, "x", low=-math.inf)


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        (-1, {"low": 0}, "lr must be in [0, inf), got -1"),
        (0, {"low": 0, "low_open": True}, "lr must be in (0, inf), got 0"),
        (1, {"low": 0, "high": 1, "high_open": True}, "lr must be in [0, 1), got 1"),
        (1.5, {"low": 0, "high": 1}, "lr must be in [0, 1], got 1.5"),
        (2, {"high": 1}, "lr must be in (-inf, 1], got 2"),
        (1, {"high": 1, "high_open": True}, "lr must be in (-inf, 1), got 1"),
        (-0.001, {"low": 0, "high": 0.1}, "lr must be in [0, 0.1], got -0.001"),
        (-1e-8, {"low": 0}, "lr must be in [0, inf), got -1e-08"),
    ],
)
def test_check_number_rejects_values_out_of_bounds(value, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_number(value, "lr", **kwargs)


def test_check_number_accepts_numpy_scalars_but_not_bools():
    assert check_number(np.float32(0.5), "x", low=0) == 0.5
    assert check_number(np.int64(3), "x", low=0) == 3.0
    with pytest.raises(TypeError, match="x must be a number, got bool"):
        check_number(np.bool_(True), "x")


@pytest.mark.parametrize(
    "x, kwargs",
    [
        (np.zeros((2, 3)), {"ndim": 2}),
        (np.zeros(4, dtype=np.float32), {}),
        (np.zeros((1, 1, 1, 1), dtype=np.float16), {"ndim": 4}),
        (np.array(1.5), {"ndim": 0}),
        (np.zeros((2, 2), dtype=np.int64), {"ndim": 2, "floating": False}),
        (np.zeros(3, dtype=bool), {"floating": False}),
    ],
)
def test_check_array_accepts_and_returns_the_same_array(x, kwargs):
    assert check_array(x, "x", **kwargs) is x


@pytest.mark.parametrize(
    "value, kwargs, error, match",
    [
        ([1.0, 2.0], {}, TypeError, "x must be a NumPy array, got list"),
        (torch.zeros(2), {}, TypeError, "x must be a NumPy array, got Tensor"),
        (1.0, {}, TypeError, "x must be a NumPy array, got float"),
        (np.float64(1.0), {}, TypeError, "x must be a NumPy array, got float64"),
        (
            np.zeros(3),
            {"ndim": 2},
            ValueError,
            r"x must have 2 dimensions, got shape \(3,\)",
        ),
        (np.zeros((1, 2, 3)), {"ndim": 4}, ValueError, "x must have 4 dimensions"),
        (
            np.zeros(2, dtype=np.int64),
            {},
            TypeError,
            "x must be a floating-point array, got dtype int64",
        ),
        (np.zeros(2, dtype=bool), {}, TypeError, "got dtype bool"),
        (np.zeros(2, dtype=np.complex128), {}, TypeError, "got dtype complex128"),
        (np.array(["a"]), {"floating": False, "ndim": 2}, ValueError, "2 dimensions"),
    ],
)
def test_check_array_rejects(value, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_array(value, "x", **kwargs)


def test_check_ids_range_on_the_cpu_names_the_argument():
    from dlabc.checks import check_ids

    check_ids(torch.tensor([[0, 4]]), "ids", 5)
    check_ids(torch.empty(0, dtype=torch.long), "ids", 5)
    with pytest.raises(ValueError, match=r"src ids must lie in 0\.\.4 .* from -1 to 4"):
        check_ids(torch.tensor([[-1, 4]]), "src ids", 5)
    with pytest.raises(ValueError, match=r"tokens must lie in 0\.\.4 .* from 0 to 5"):
        check_ids(torch.tensor([0, 5]), "tokens", 5)


def test_check_edge_index_accepts_an_edge_list_and_names_what_is_wrong():
    edges = torch.tensor([[0, 1, 2], [1, 2, 0]])
    assert checks.check_edge_index(edges, 3) is edges
    assert checks.check_edge_index(torch.zeros(2, 0, dtype=torch.int64), 0).numel() == 0
    with pytest.raises(ValueError, match=r"shape \(2, E\), got \(3, 3\)"):
        checks.check_edge_index(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="edge_index"):
        checks.check_edge_index(edges.float(), 3)
    with pytest.raises(ValueError, match=r"node ids in 0\.\.1, got values from 0 to 2"):
        checks.check_edge_index(edges, 2)
