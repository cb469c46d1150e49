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
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import chapters
import notebooks

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
    nb = notebooks.convert(chapter)
    nbformat.validate(nb)
    setup = nb.cells[0]
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
    code = [c.source for c in nb.cells[1:] if c.cell_type == "code"]
    assert code == [
        c.source for c in chapters.read(chapter).cells if c.cell_type == "code"
    ]


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
    """The `%pip install` lines of the set-up cell, with the wheel for the repository."""
    url, branch = chapters.repository()
    lines = []
    for line in notebooks.setup_cell_source().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("%pip install"):
            line = line.replace(f"git+{url}@{branch}", wheel.as_uri())
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


def _run_like_colab(chapter: Path, site: Path, workdir: Path) -> nbformat.NotebookNode:
    """Execute the chapter's notebook in a fresh kernel of the Colab environment."""
    nb = notebooks.convert(chapter)
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

    def run(chapter):
        workdir = tmp_path_factory.mktemp("run")
        try:
            return chapter, (
                _run_like_colab(chapter, installed_dlabc, workdir),
                workdir,
            )
        except Exception as err:  # reported by the chapter's own test below
            return chapter, err

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, COLAB_CHAPTERS))


@pytest.mark.slow
@pytest.mark.parametrize("chapter", COLAB_CHAPTERS, ids=chapters.module_path)
def test_notebook_runs_like_colab(chapter, colab_runs, installed_dlabc):
    result = colab_runs[chapter]
    if isinstance(result, Exception):
        raise result
    nb, workdir = result
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
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
