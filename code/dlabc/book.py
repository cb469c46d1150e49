"""What every chapter calls: set-up and device, showing this package's code, gluing
numbers.

A chapter starts with ``device = book.setup()``, shows an implementation with
``book.show_source(fn)`` (the code on the page *is* the code in ``code/dlabc``), hands
every number its prose quotes to the text with ``book.glue(name, value)`` (or several at
once with ``book.glue_all``), and asserts every claim its prose makes about a
measurement with ``book.claim(statement, value, op, bound)``, which also records the
claim's margin for ``make claims`` (the same chapters under other CPUs' kernels and
other seeds).
"""

from __future__ import annotations
import __future__

import inspect
import json
import operator
import os
import random
import textwrap
import warnings
from pathlib import Path

import numpy as np
import torch
from IPython.display import Markdown
from threadpoolctl import threadpool_limits

from dlabc import __version__, plot

#: When True, :func:`glue` prints ``name = value`` instead of storing it for the book's
#: text. The first cell of every generated notebook (Colab, Jupyter) sets it, because
#: there the Markdown cannot show glued values.
SHOW_GLUED = False


def device() -> torch.device:
    """The device a chapter computes on: ``$DLABC_DEVICE`` if set, else CUDA when
    present, else CPU."""
    name = os.environ.get("DLABC_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has finished the work queued on it, before reading a clock.

    CUDA runs kernels asynchronously, so a timer stopped right after a call measures
    only the launch; on the CPU every operation has finished when it returns.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_offset() -> int:
    """What ``$DLABC_SEED`` adds to every seed a chapter asks for (0 when unset).

    ``make claims`` sets it to run the chapters under other seeds: a claim that holds
    only for one seed is luck, not a result.
    """
    raw = os.environ.get("DLABC_SEED", "0") or "0"
    try:
        offset = int(raw)
    except ValueError as err:
        raise ValueError(f"DLABC_SEED must be an integer, got {raw!r}") from err
    if offset < 0:
        raise ValueError(f"DLABC_SEED must be non-negative, got {offset}")
    return offset


def seed(k: int = 0) -> int:
    """Seed Python, NumPy and PyTorch with ``k`` plus ``$DLABC_SEED``; return that seed.

    Chapters call ``book.seed(k)`` wherever they would call ``torch.manual_seed(k)``,
    and pass its value to functions that take a seed (``train.fit(...,
    seed=book.seed(1))``), so that one variable moves every random choice a chapter
    makes.
    """
    return _reseed(k)


def _reseed(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"seed must be a non-negative int, got {k!r}")
    value = k + seed_offset()
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


def setup(seed: int = 0, threads: int = 1) -> torch.device:
    """Make a chapter reproducible and fast on a small CPU; return the device to compute
    on.

    Seeds Python, NumPy and PyTorch, limits PyTorch and NumPy's BLAS to ``threads`` CPU
    threads (one thread is the fastest for the book's small models on a 2-core machine,
    and several threads fighting over busy cores make small matrix products ten times
    slower), and sets the figure style.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    _reseed(seed)
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)  # NumPy's BLAS; stays in force for the process
    # tqdm (imported by transformers) warns in Jupyter without ipywidgets; its text
    # progress bars work, and the book's pages must not show the warning
    warnings.filterwarnings("ignore", message="IProgress not found")
    # peft 0.21 calls a transformers 5 method that transformers deprecated in favour of
    # a new name; the warning is about peft's code, not the reader's
    warnings.filterwarnings(
        "ignore",
        message="`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
    )
    plot.use_style()
    dev = device()
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU, {threads} thread(s)"
    )
    print(
        f"dlabc {__version__}, torch {torch.__version__}, computing on {dev} ({name})"
    )
    return dev


def source_path(obj: object) -> tuple[str, int, int]:
    """Where ``obj`` is defined, as the book's readers find it: ``code/dlabc/...``,
    first and last line."""
    path = Path(inspect.getsourcefile(obj)).resolve()  # type: ignore[arg-type]
    package_root = Path(__file__).resolve().parent
    try:
        relative = path.relative_to(package_root)
    except ValueError as err:
        raise ValueError(f"{obj!r} is not defined in the dlabc package") from err
    lines, first = inspect.getsourcelines(obj)  # type: ignore[arg-type]
    return f"code/dlabc/{relative.as_posix()}", first, first + len(lines) - 1


def show_source(obj: object) -> Markdown:
    """Display the source of a function or class of ``dlabc``, with the file and lines
    it comes from.

    The output is Markdown with a fenced code block, so it is highlighted the same way
    on the book's pages (myst-nb renders ``text/markdown``) and in Jupyter or Colab.
    """
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)):
        raise TypeError(
            f"show_source expects a function, method or class, got {type(obj).__name__}"
        )
    path, first, last = source_path(obj)
    code = textwrap.dedent(inspect.getsource(obj)).rstrip()  # type: ignore[arg-type]
    code, doc = split_docstring(code)
    text = f"`{path}`, lines {first}–{last}"
    if doc:
        text += ", its docstring first:\n\n" + _docstring_markdown(doc)
    return Markdown(f"{text}\n\n```python\n{code}\n```")


def split_docstring(code: str) -> tuple[str, str | None]:
    """``code`` (one function or class) without its docstring, and the docstring.

    The page shows a docstring as text above the code, where its math is typeset and
    its lines wrap, and the code box holds only code.
    """
    import ast

    tree = ast.parse(code)
    node = tree.body[0]
    if not (
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    ):
        return code, None
    doc = node.body[0]
    lines = code.splitlines()
    rest = lines[: doc.lineno - 1] + lines[doc.end_lineno :]
    if len(node.body) == 1:  # a function that is only a docstring keeps a body
        indent = lines[doc.lineno - 1][: doc.col_offset]
        rest.insert(doc.lineno - 1, f"{indent}...")
    # a blank line left at the top of the body by the docstring's removal
    k = doc.lineno - 1
    if k < len(rest) and not rest[k].strip():
        del rest[k]
    return "\n".join(rest), inspect.cleandoc(doc.value.value)


def _docstring_markdown(doc: str) -> str:
    """A docstring as Markdown: reST literals and roles become code, a paragraph that
    is one ``$...$`` formula becomes a display equation."""
    import re

    doc = re.sub(r":(?:func|class|meth|data|attr|mod|obj):`~?([^`]+)`", r"``\1``", doc)
    doc = re.sub(r"``([^`]+)``", r"`\1`", doc)
    paragraphs = []
    for paragraph in doc.split("\n\n"):
        stripped = paragraph.strip()
        if (
            stripped.startswith("$")
            and stripped.endswith("$")
            and stripped.count("$") == 2
        ):
            paragraph = f"$$\n{stripped[1:-1].strip()}\n$$"
        paragraphs.append(paragraph)
    return "\n>\n".join("> " + p.replace("\n", "\n> ") for p in paragraphs)


def glue(name: str, value: object) -> None:
    """Hand a computed value to the chapter's text, where ``{glue:text}`name``` shows
    it.

    Inside the book's build this is myst-nb's ``glue`` (nothing is shown under the
    cell); in a generated notebook, or wherever myst-nb is missing, it prints ``name =
    value``. Tensors and NumPy scalars are turned into Python numbers first. Returns
    nothing, so that a cell ending in ``book.glue(...)`` shows no stray value.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"glue name must be an identifier-like string, got {name!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"glue {name!r}: only one-element tensors can be glued, got shape {tuple(value.shape)}"
            )
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    try:
        from myst_nb import glue as myst_glue
    except ImportError:  # Colab, or a plain Jupyter without the book's build tools
        myst_glue = None
    if SHOW_GLUED or myst_glue is None:
        print(f"{name} = {value}")
    else:
        myst_glue(name, value, display=False)


def glue_all(values: dict[str, object] | None = None, /, **more: object) -> None:
    """Glue several values in one call: ``book.glue_all(loss=loss, accuracy=acc)``.

    Keeps the book's plumbing to one line under an experiment; each pair goes through
    :func:`glue`.
    """
    for name, value in {**(values or {}), **more}.items():
        glue(name, value)


class ClaimError(AssertionError):
    """A claim the chapter's prose makes does not hold for the numbers just computed."""


_OPS = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}


def claim(statement: str, value: object, op: str, bound: object) -> None:
    """Assert ``value op bound``, a claim the prose makes, and record how much room it
    had.

    ``statement`` says the claim in words (it names the failing claim in the error).
    ``op`` is one of ``>``, ``>=``, ``<``, ``<=`` (a measurement against a bound) or
    ``==`` (an exact fact). The margin is how far ``value`` is on the right side of
    ``bound`` (negative: the claim fails).

    When ``$DLABC_CLAIMS_LOG`` names a file, each claim is appended to it as a JSON
    line; ``make claims`` collects them over other CPUs' kernels and other seeds. With
    ``$DLABC_CLAIMS_KEEP_GOING=1`` a failing claim is recorded instead of raised, so
    that one run measures every claim of a chapter.
    """
    if not isinstance(statement, str) or not statement.strip():
        raise ValueError("claim: statement must be a non-empty string")
    if op not in _OPS:
        raise ValueError(f"claim: op must be one of {sorted(_OPS)}, got {op!r}")
    value, bound = (
        v.item() if isinstance(v, (torch.Tensor, np.generic)) else v
        for v in (value, bound)
    )
    holds = bool(_OPS[op](value, bound))
    if op == "==":
        margin = 0.0 if holds else None
    else:
        margin = float(value) - float(bound)
        margin = margin if op in (">", ">=") else -margin
    log = os.environ.get("DLABC_CLAIMS_LOG")
    if log:
        record = {
            "statement": statement,
            "value": value if isinstance(value, (int, float)) else repr(value),
            "op": op,
            "bound": bound if isinstance(bound, (int, float)) else repr(bound),
            "margin": margin,
            "holds": holds,
        }
        with open(log, "a") as file:
            file.write(json.dumps(record) + "\n")
    if not holds and os.environ.get("DLABC_CLAIMS_KEEP_GOING") != "1":
        raise ClaimError(
            f"claim does not hold: {statement}: {value!r} {op} {bound!r} is false"
        )


def implementation(line: str, cell: str) -> None:
    """The ``%%implementation MODULE QUALNAME`` cell magic of the generated notebooks.

    A chapter's page shows an implementation read-only (:func:`show_source`); its
    notebook gives the same source as a cell that starts with this magic. Running the
    cell defines the object again *inside its module* of ``dlabc`` (so the module's
    other code, and the cells below, use the reader's version) and in the notebook's
    own namespace; a method (``QUALNAME`` ``Class.method``) replaces the class's method.
    Run unchanged, the cell defines exactly what the package has. The cell is also
    remembered, so that the processes a chapter starts (:mod:`dlabc.distributed`) run
    the reader's version too.
    """
    obj = define(line, cell)
    _EDITED[line.strip()] = cell
    shell = _shell()
    if shell is not None and "." not in line.split()[1]:
        shell.user_ns[line.split()[1]] = obj


#: The implementation cells run in this process, by ``"MODULE QUALNAME"``.
_EDITED: dict[str, str] = {}


def edited_implementations() -> list[tuple[str, str]]:
    """The ``(line, cell)`` pairs of the implementation cells run so far, oldest
    first."""
    return list(_EDITED.items())


def define(line: str, cell: str) -> object:
    """Define ``QUALNAME`` of ``MODULE`` (``line``) again from the source ``cell``,
    inside its module; return the new object. What :func:`implementation` runs."""
    import importlib

    parts = line.split()
    if len(parts) != 2:
        raise ValueError("usage: %%implementation dlabc.module Name (or Class.method)")
    module = importlib.import_module(parts[0])
    *owners, name = parts[1].split(".")
    code = textwrap.dedent(cell)
    # compiled as its module is (``from __future__ import annotations`` and the like)
    flags = sum(
        feature.compiler_flag
        for feature in vars(module).values()
        if isinstance(feature, __future__._Feature)
    )
    if owners:
        owner = module
        for attribute in owners:
            owner = getattr(owner, attribute)
        # compiled inside a function that provides ``__class__``, so that a method's
        # zero-argument ``super()`` works as it does in the class body
        wrapped = "def __define(__class__):\n" + textwrap.indent(code, "    ")
        wrapped += f"\n    return {name}\n"
        scope: dict[str, object] = {}
        compiled = compile(wrapped, f"<{parts[1]}>", "exec", flags, dont_inherit=True)
        exec(compiled, module.__dict__, scope)
        method = scope["__define"](owner)
        setattr(owner, name, method)
        return method
    exec(compile(code, f"<{parts[1]}>", "exec", flags, dont_inherit=True), vars(module))
    return module.__dict__[name]


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with Jupyter and Colab
        return None
    return get_ipython()


def notebook_mode() -> None:
    """What the first cell of every generated notebook turns on: :func:`glue` prints
    ``name = value`` (a notebook's Markdown cannot show glued values), and the
    ``%%implementation`` cells can run."""
    global SHOW_GLUED
    SHOW_GLUED = True
    shell = _shell()
    if shell is not None:
        shell.register_magic_function(implementation, "cell", "implementation")
