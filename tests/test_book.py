"""dlabc.book: set-up, showing source, gluing numbers."""

import inspect
import json

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

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


def blas_threads() -> list[int]:
    """The thread count of every BLAS library loaded in this process (NumPy's)."""
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_setup_limits_numpy_blas_to_one_thread(monkeypatch):
    monkeypatch.delenv("DLABC_DEVICE", raising=False)
    np.ones((2, 2)) @ np.ones((2, 2))  # NumPy's BLAS is loaded
    before = blas_threads()
    assert before, "threadpoolctl finds no BLAS behind NumPy"
    torch_threads = torch.get_num_threads()
    try:
        threadpool_limits(limits=2, user_api="blas")  # as a fresh process may have it
        book.setup()
        assert blas_threads() == [1] * len(before)
        a = np.random.default_rng(0).normal(size=(64, 64))
        np.testing.assert_allclose(a @ np.linalg.inv(a), np.eye(64), atol=1e-8)
    finally:
        threadpool_limits(limits=max(before), user_api="blas")
        torch.set_num_threads(torch_threads)


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
    source = "\n".join(file_lines[first - 1 : last])
    code, doc = book.split_docstring(source)
    assert '"""' not in code and "return e / e.sum(" in code
    assert "```python\n" + code + "\n```" in shown  # the code, without its docstring
    assert (
        doc.startswith("Max-subtraction trick") and "> Max-subtraction trick" in shown
    )


def test_a_docstring_is_shown_as_text_and_its_formulas_as_display_math():
    source = (
        'def f(x):\n    """Doubles ``x``, see :func:`g`.\n\n    $y = 2x$\n    """\n'
        "    return 2 * x"
    )
    code, doc = book.split_docstring(source)
    assert code == "def f(x):\n    return 2 * x"
    markdown = book._docstring_markdown(doc)
    assert markdown == "> Doubles `x`, see `g`.\n>\n> $$\n> y = 2x\n> $$"
    assert book.split_docstring("def f():\n    return 1") == (
        "def f():\n    return 1",
        None,
    )
    assert (
        book.split_docstring('def f():\n    """Only this."""')[0] == "def f():\n    ..."
    )


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


def test_synchronize_waits_only_where_work_is_queued(monkeypatch):
    calls = []
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda device=None: calls.append(device)
    )
    book.synchronize("cpu")  # the CPU has nothing queued: no call
    book.synchronize(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]
    with pytest.raises((TypeError, RuntimeError)):
        book.synchronize(3.5)


def test_seed_adds_the_offset_from_the_environment(monkeypatch):
    monkeypatch.delenv("DLABC_SEED", raising=False)
    assert book.seed(3) == 3
    first = torch.rand(2)
    monkeypatch.setenv("DLABC_SEED", "10")
    assert book.seed(3) == 13
    assert not torch.equal(torch.rand(2), first)
    torch.manual_seed(13)
    expected = torch.rand(2)
    book.seed(3)
    assert torch.equal(torch.rand(2), expected)  # the same as torch.manual_seed(3 + 10)


@pytest.mark.parametrize(
    "k, env, match",
    [
        (-1, None, "seed"),
        (1.5, None, "seed"),
        (0, "x", "DLABC_SEED"),
        (0, "-2", "DLABC_SEED"),
    ],
)
def test_seed_rejects_bad_values(monkeypatch, k, env, match):
    if env is None:
        monkeypatch.delenv("DLABC_SEED", raising=False)
    else:
        monkeypatch.setenv("DLABC_SEED", env)
    with pytest.raises(ValueError, match=match):
        book.seed(k)


def test_glue_all_glues_each_pair(monkeypatch, capsys):
    monkeypatch.setattr(book, "SHOW_GLUED", True)
    book.glue_all({"a": 1}, b=torch.tensor(2.5))
    assert capsys.readouterr().out == "a = 1\nb = 2.5\n"


def test_claim_passes_silently_and_raises_naming_the_claim(monkeypatch):
    monkeypatch.delenv("DLABC_CLAIMS_LOG", raising=False)
    monkeypatch.delenv("DLABC_CLAIMS_KEEP_GOING", raising=False)
    book.claim("bigger", torch.tensor(2.0), ">", 1.0)
    book.claim("exact", 3, "==", 3)
    with pytest.raises(book.ClaimError, match="residual is better: 0.5 < 0.25"):
        book.claim("residual is better", 0.5, "<", 0.25)
    assert issubclass(book.ClaimError, AssertionError)


def test_claim_records_margins_and_keeps_going_when_asked(monkeypatch, tmp_path):
    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv("DLABC_CLAIMS_LOG", str(log))
    monkeypatch.setenv("DLABC_CLAIMS_KEEP_GOING", "1")
    book.claim("above", 3.0, ">", 1.0)
    book.claim("below", 3.0, "<", 1.0)  # fails, recorded, not raised
    book.claim("same", 2, "==", 3)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["statement"], r["margin"], r["holds"]) for r in records] == [
        ("above", 2.0, True),
        ("below", -2.0, False),
        ("same", None, False),
    ]


@pytest.mark.parametrize(
    "args, match",
    [(("", 1, ">", 0), "statement"), (("x", 1, "!=", 0), "op must be one of")],
)
def test_claim_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        book.claim(*args)
