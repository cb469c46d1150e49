"""Shared test set-up: one CPU thread (fast and deterministic for small tensors), and the book's tools importable."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # chapters, notebooks, book_ext, timings
# helper modules of the tests (helpers_*.py): the processes that tests/test_distributed.py
# and tests/scaling spawn import their workers from there by name
sys.path.insert(0, str(ROOT / "tests"))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
