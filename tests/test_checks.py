"""dlabc.checks: the argument checks every module uses."""

import pytest
import torch

from dlabc.checks import check_positive_int, check_tensor


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
