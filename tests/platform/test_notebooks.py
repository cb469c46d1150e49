"""The Colab notebooks: up to date, free of MyST syntax, and runnable the way Colab gets them.

The last test (``make colab``) is the proof: dlabc is built as a wheel and installed, with
the pip lines of the notebooks' own first cell, into an environment that had only what Colab
preinstalls (torch, numpy, matplotlib and a kernel: ``$DLABC_COLAB_PYTHON``, made by
``make colab``); each chapter's notebook runs there in a fresh kernel, from a working
directory that holds nothing of the repository. ``$DLABC_COLAB_CHAPTERS=changed`` runs only
the chapters changed recently plus a rotating sample (CI); ``all`` runs every chapter; names
(``cnn/resnet rnn/char_lm``) run those.
"""

import concurrent.futures
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

import chapters
import notebooks
import shown_code

CHAPTERS = chapters.chapters()
MYST = (
    "{glue",
    "{cite",
    "{eq}",
    "{math}",
    ":::",
    "```{",
    "{bibliography}",
    "{exercise}",
    ":label:",
)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapters.module_path)
def test_committed_notebook_is_up_to_date(chapter):
    target = chapter.with_suffix(".ipynb")
    assert target.is_file(), f"{target.name} missing: run `make notebooks`"
    assert target.read_text() == notebooks.render(chapter), (
        f"{target.name} is stale: run `make notebooks`"
    )


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapters.module_path)
def test_notebook_is_plain_jupyter(chapter):
    # the committed file, which the test above keeps equal to a fresh conversion
    # (converting once per chapter, not twice, keeps the suite inside its budget)
    nb = nbformat.read(chapter.with_suffix(".ipynb"), as_version=4)
    nbformat.validate(nb)
    title, setup = nb.cells[:2]
    assert title.cell_type == "markdown" and re.fullmatch(r"# \S.*", title.source), (
        "the chapter's title comes first"
    )
    assert setup.cell_type == "code" and '"google.colab" in sys.modules' in setup.source
    url, branch = chapters.repository()
    assert f"git+{url}@{branch}" in setup.source
    for cell in nb.cells:
        assert not cell.get("outputs"), "notebooks are committed without outputs"
        if cell.cell_type == "markdown":
            for myst in MYST:
                assert myst not in cell.source, (
                    f"raw MyST {myst!r} left in a Markdown cell:\n{cell.source}"
                )
    # the chapter's code cells, in order: a cell that only shows code on the page
    # becomes the shown objects' editable source, a collapsed one a collapsed form
    code = [c for c in nb.cells[2:] if c.cell_type == "code"]
    expected = []
    for cell in chapters.read(chapter).cells:
        if cell.cell_type != "code":
            continue
        calls = notebooks._SHOW.findall(cell.source)
        if calls and not notebooks._SHOW.sub("", cell.source).strip():
            expected += ["%%implementation"] * len(calls)
        else:
            expected.append(cell.source)
    assert len(code) == len(expected)
    for cell, source in zip(code, expected, strict=True):
        if source == "%%implementation":
            assert cell.source.startswith("%%implementation dlabc.")
        elif cell.metadata.get("cellView") == "form":
            assert cell.source.startswith("# @title ")
            assert cell.source.partition("\n")[2] in source
        else:
            assert cell.source == source


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapters.module_path)
def test_the_editable_cells_define_what_the_package_has(chapter, monkeypatch):
    """Each %%implementation cell, run as given, redefines its object with the same code
    (the same bytecode, constants and names), so the experiments below it compute the
    same numbers; the slow test below runs whole notebooks to prove it end to end."""
    from dlabc import book

    # the cells run here are undone below: processes that later tests of this worker
    # launch must not replay them
    monkeypatch.setattr(book, "_EDITED", {})

    for obj in shown_code.shown_objects(chapter):
        module = sys.modules[obj.__module__]
        *owners, name = obj.__qualname__.split(".")
        owner = module
        for attribute in owners:
            owner = getattr(owner, attribute)
        saved_module, saved_attr = dict(module.__dict__), owner.__dict__.get(name)
        source = notebooks.implementation_cell(obj)
        line, _, cell = source.partition("\n")
        code = "\n".join(x for x in cell.splitlines() if not x.startswith("# "))
        assert code == textwrap.dedent(inspect.getsource(obj)).rstrip()
        try:
            book.implementation(line.removeprefix("%%implementation "), cell)
            new = getattr(owner, name) if owners else module.__dict__[name]
            assert new is not obj, "the cell did not redefine the object"
            assert (
                (new.fget if isinstance(new, property) else new).__code__.co_filename
                == (f"<{obj.__qualname__}>")
                if not isinstance(new, type)
                else new.__module__ == obj.__module__
            )
            assert _code_of(new) == _code_of(obj), f"{obj.__qualname__} changed"
        finally:
            module.__dict__.clear()
            module.__dict__.update(saved_module)
            if owners:
                setattr(owner, name, saved_attr)


def _code_of(obj) -> list:
    """What an object computes: the bytecode, constants and names of its functions."""
    import inspect
    import types

    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if inspect.ismethod(obj):
        obj = obj.__func__
    if isinstance(obj, type):
        return [
            (key, _code_of(value))
            for key, value in sorted(vars(obj).items())
            if isinstance(
                value, (types.FunctionType, staticmethod, classmethod, property)
            )
        ]
    if isinstance(obj, property):
        return [_code_of(f) for f in (obj.fget, obj.fset) if f is not None]

    def flat(code):
        # names, variables and constants (bytecode itself differs between builds of the
        # same Python: a module's cached .pyc may come from another patch release)
        return (
            code.co_names,
            code.co_varnames,
            tuple(
                flat(c) if isinstance(c, types.CodeType) else c for c in code.co_consts
            ),
        )

    return [flat(obj.__code__)]


def _colab_chapters() -> list[Path]:
    which = os.environ.get("DLABC_COLAB_CHAPTERS", "all")
    if which == "all":
        return CHAPTERS
    if which == "changed":
        chosen = set(chapters.changed()) | set(chapters.rotating_sample())
    else:  # names: "cnn/resnet rnn/char_lm"
        chosen = {chapters.ROOT / "book" / f"{name}.md" for name in which.split()}
    return [c for c in CHAPTERS if c in chosen]


COLAB_CHAPTERS = _colab_chapters()


def _pip_lines_of_the_first_cell(wheel: Path) -> list[list[str]]:
    """The `%pip install` lines of the set-up cells of the chapters to run, each once,
    with the wheel for the repository."""
    url, branch = chapters.repository()
    lines = []
    for chapter in COLAB_CHAPTERS or [None]:
        for line in notebooks.setup_cell_source(chapter).splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("%pip install"):
                line = line.replace(f"git+{url}@{branch}", wheel.as_uri())
                if shlex.split(line)[2:] not in lines:
                    lines.append(shlex.split(line)[2:])
    assert lines, "the set-up cell installs nothing"
    return lines


@pytest.fixture(scope="module")
def installed_dlabc(tmp_path_factory):
    """dlabc built as a wheel, installed like the first cell does in Colab's environment."""
    python = os.environ.get("DLABC_COLAB_PYTHON")
    if not python:
        pytest.fail(
            "run this test with `make colab`, which makes the Colab environment"
        )
    root = tmp_path_factory.mktemp("colab")
    wheels, source = root / "wheels", root / "source"
    # build from a copy, so that setuptools' build/ folder never lands in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(chapters.ROOT / name, source / name)
    shutil.copytree(
        chapters.ROOT / "code",
        source / "code",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("dlabc-*.whl")
    colab_pip = [python, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*colab_pip, "uninstall", "--yes", "dlabc"], check=True)
    for args in _pip_lines_of_the_first_cell(wheel):
        subprocess.run([*colab_pip, "install", *args], check=True)
    kernels = root / "jupyter"
    subprocess.run(
        [python, "-m", "ipykernel", "install", "--prefix", str(kernels)]
        + ["--name", "dlabc-colab"],
        check=True,
        capture_output=True,
    )
    os.environ["JUPYTER_PATH"] = str(kernels / "share" / "jupyter")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return Path(site)


def _run_like_colab(
    chapter: Path, site: Path, workdir: Path, as_on_the_page: bool = False
) -> nbformat.NotebookNode:
    """Execute the chapter's notebook in a fresh kernel of the Colab environment.

    ``as_on_the_page``: the chapter's own code cells instead (``book.show_source``
    where the notebook has the editable ``%%implementation`` cells)."""
    nb = notebooks.convert(chapter)
    if as_on_the_page:
        cells = [c for c in chapters.read(chapter).cells if c.cell_type == "code"]
        nb.cells = [nb.cells[1], *(nbformat.v4.new_code_cell(c.source) for c in cells)]
    nb.cells.append(
        nbformat.v4.new_code_cell("import dlabc\nprint('dlabc from', dlabc.__file__)")
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    nb, _, error = chapters.execute(
        nb, workdir=workdir, env=env, timeout=300, kernel_name="dlabc-colab"
    )
    if error:
        raise RuntimeError(f"{chapters.module_path(chapter)}: {error}")
    return nb


@pytest.fixture(scope="module")
def colab_runs(installed_dlabc, tmp_path_factory):
    """Every chapter's notebook, executed two at a time (one kernel per core).

    Each chapter computes on one thread, so two kernels side by side halve the time of
    this, the slowest part of the test suite. Failures are kept and reported per chapter.
    """

    def run(job):
        chapter, as_on_the_page = job
        workdir = tmp_path_factory.mktemp("run")
        try:
            nb = _run_like_colab(chapter, installed_dlabc, workdir, as_on_the_page)
            return job, (nb, workdir)
        except Exception as err:  # reported by the chapter's own test below
            return job, err

    jobs = [(c, False) for c in COLAB_CHAPTERS] + [(c, True) for c in COLAB_CHAPTERS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, jobs))


def _printed(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )


#: Glued values that measure wall-clock time or memory use, so differ from run to run.
MEASURED = {
    "": r"second|time|speed",
    "improvements/flash_attention": r"_mb|mib|growth|tiled|naive|fused|floor|factor"
    r"|ratio|numbers_8k",
    "improvements/efficient_attention": r"_mb|growth|slope|dense_max|ratio|matrices",
    "cnn/convolution": r"_vs_",  # how many times faster one convolution is than another
    "improvements/gqa_kv_cache": r"growth",  # how a step's time grows with the length
    "scaling/data_parallel": r"_ms|comm_share",  # a step's compute and communication
    "scaling/zero_fsdp": r"^ms\d",  # milliseconds per step
    # the measured pipeline bubbles, and the cores and load they were measured under
    "scaling/model_parallel": r"^(cores|load|gpipe_\w+|ofob_\w+)$",
    "graphs/graphsage": r"_ms$",  # milliseconds per epoch, full batch and mini-batches
    "vision/vit": r"^s_",  # each model's training seconds
    "vision/segformer": r"^s_",  # each model's training seconds
    "vision/yolo": r"_ms$|_train$",  # inference milliseconds, training seconds
}


@pytest.mark.slow
@pytest.mark.parametrize("chapter", COLAB_CHAPTERS, ids=chapters.module_path)
def test_notebook_runs_like_colab(chapter, colab_runs, installed_dlabc):
    result = colab_runs[chapter, False]
    if isinstance(result, Exception):
        raise result
    nb, workdir = result
    printed = _printed(nb)
    where = Path(printed.split("dlabc from ")[-1].strip())
    assert where.is_relative_to(installed_dlabc), (
        f"the notebook imported dlabc from {where}, not the installed wheel"
    )
    assert not where.is_relative_to(chapters.PACKAGE.parent), "the repository's code"
    images = sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert images > 0, "the notebook drew no figure"
    glued = set(re.findall(r"\{glue:text\}`(\w+)", chapter.read_text()))
    for name in glued:
        assert f"{name} = " in printed, (
            f"the notebook does not print the glued value {name}"
        )
    assert os.listdir(workdir) == [], (
        "the chapter wrote files into its working directory"
    )


@pytest.mark.slow
@pytest.mark.parametrize("chapter", COLAB_CHAPTERS, ids=chapters.module_path)
def test_the_editable_cells_compute_the_numbers_of_the_page(chapter, colab_runs):
    """The notebook, whose shown implementations are editable cells run as given,
    prints the same glued numbers as the chapter's own cells (which only show the
    code) in the same environment."""
    runs = [colab_runs[chapter, as_page] for as_page in (False, True)]
    for run in runs:
        if isinstance(run, Exception):
            raise run
    glued = set(re.findall(r"\{glue:text\}`(\w+)", chapter.read_text()))
    values = [
        dict(re.findall(r"^(\w+) = (.*)$", _printed(nb), flags=re.M)) for nb, _ in runs
    ]
    measured = "|".join(
        v for k, v in MEASURED.items() if k in ("", chapters.module_path(chapter))
    )
    compared = [n for n in sorted(glued) if not re.search(measured, n)]
    assert compared, "no glued number to compare"
    differ = {
        n: (values[0].get(n), values[1].get(n))
        for n in compared
        if values[0].get(n) != values[1].get(n)
    }
    assert not differ, f"notebook vs page: {differ}"
