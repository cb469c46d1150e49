"""Shared test set-up: one CPU thread (fast and deterministic for small tensors), and the book's tools importable."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # chapters, notebooks, book_ext, timings

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
