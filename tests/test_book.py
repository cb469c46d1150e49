"""dlabc.book: set-up, showing source, gluing numbers."""

import inspect
import json

import numpy as np
import pytest
import torch

from dlabc import book
from dlabc.transformers import attention_from_scratch as afs


def test_setup_seeds_threads_and_device(monkeypatch):
    monkeypatch.delenv("DLABC_DEVICE", raising=False)
    threads = torch.get_num_threads()
    try:
        device = book.setup(seed=3, threads=1)
        a = torch.rand(3)
        book.setup(seed=3, threads=1)
        assert torch.equal(a, torch.rand(3))
        assert torch.get_num_threads() == 1
        assert device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        torch.set_num_threads(threads)


def test_device_override(monkeypatch):
    monkeypatch.setenv("DLABC_DEVICE", "cpu")
    assert book.device() == torch.device("cpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"threads": 0}, "threads"),
        ({"threads": True}, "threads"),
    ],
)
def test_setup_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        book.setup(**kwargs)


def test_show_source_is_the_module_code():
    shown = book.show_source(afs.softmax).data
    path, first, last = book.source_path(afs.softmax)
    assert path == "code/dlabc/transformers/attention_from_scratch.py"
    file_lines = open(inspect.getsourcefile(afs.softmax)).read().splitlines()
    assert file_lines[first - 1].startswith("def softmax(")
    assert f"lines {first}–{last}" in shown
    assert "```python\n" + "\n".join(file_lines[first - 1 : last]) + "\n```" in shown


def test_show_source_rejects_what_it_cannot_show():
    with pytest.raises(TypeError, match="function, method or class"):
        book.show_source(42)
    with pytest.raises(ValueError, match="not defined in the dlabc package"):
        book.show_source(json.dumps)


def test_glue_prints_outside_the_build(monkeypatch, capsys):
    monkeypatch.setattr(book, "SHOW_GLUED", True)
    assert book.glue("err", torch.tensor(0.25)) is None
    book.glue("count", np.int64(7))
    assert capsys.readouterr().out == "err = 0.25\ncount = 7\n"


def test_glue_hands_python_numbers_to_myst_nb(monkeypatch):
    import myst_nb

    calls = []
    monkeypatch.setattr(book, "SHOW_GLUED", False)
    monkeypatch.setattr(
        myst_nb,
        "glue",
        lambda name, value, display: calls.append((name, value, display)),
    )
    book.glue("acc", torch.tensor([0.5]))
    assert calls == [("acc", 0.5, False)] and type(calls[0][1]) is float


def test_glue_rejects_bad_input():
    with pytest.raises(ValueError, match="identifier"):
        book.glue("not a name", 1)
    with pytest.raises(ValueError, match="one-element"):
        book.glue("x", torch.zeros(2))
