"""What the book's tools know about its chapters: where they are, and which code they import.

Used by the Sphinx extension (``book_ext``), the notebook generator (``notebooks``), the timing
benchmark (``timings``) and the tests. Chapters are the files listed in ``_toc.yml``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import time
from pathlib import Path

import jupytext
import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "code" / "dlabc"


def config() -> dict:
    """The book's ``_config.yml``."""
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def repository() -> tuple[str, str]:
    """The repository URL and branch, set in one place: ``_config.yml``'s ``repository`` section."""
    repo = config()["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def pages() -> list[Path]:
    """Every page listed in ``_toc.yml``, in reading order, as absolute ``.md`` paths."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    found = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                found.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    walk(toc.get("chapters", []))
    return [ROOT / f"{name}.md" for name in found]


def read(path: Path) -> nbformat.NotebookNode:
    """A MyST Markdown chapter as a notebook (jupytext's ``md:myst`` format)."""
    return jupytext.read(path, fmt="md:myst")


def chapters() -> list[Path]:
    """The pages that execute code (they have code cells): the ones timed, converted and checked."""
    return [
        p for p in pages() if _has_code(p, p.stat().st_mtime_ns if p.exists() else 0)
    ]


@functools.lru_cache(maxsize=None)
def _has_code(path: Path, mtime_ns: int) -> bool:
    """Whether the page has a code cell (remembered per version of the file: the tests
    ask for the chapters many times)."""
    return path.exists() and any(c.cell_type == "code" for c in read(path).cells)


def module_path(path: Path) -> str:
    """``book/transformers/attention.md`` -> ``transformers/attention``.

    The name shared by ``book/``, ``code/dlabc/`` and ``tests/``.
    """
    return path.resolve().relative_to(ROOT / "book").with_suffix("").as_posix()


_MAGIC = re.compile(r"^\s*[%!]")


def _imports(source: str, package: str | None = None) -> set[str]:
    """Names of the ``dlabc`` modules that ``source`` imports (cell magics and shell lines skipped)."""
    code = "\n".join("" if _MAGIC.match(line) else line for line in source.splitlines())
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and package:  # a relative import inside the package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(
                f"{base}.{a.name}" for a in node.names
            )  # `from dlabc import book`
    return {n for n in names if n == "dlabc" or n.startswith("dlabc.")}


def _file_of(module: str) -> Path | None:
    parts = module.split(".")[1:]
    candidate = PACKAGE.joinpath(*parts)
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file():
            return path
    return None  # an attribute, not a module (`from dlabc.x import some_function`)


def dependencies(path: Path) -> list[Path]:
    """Every file of ``code/dlabc`` that running the chapter at ``path`` imports, directly or not."""
    todo = set()
    for cell in read(path).cells:
        if cell.cell_type == "code":
            todo |= _imports(cell.source)
    seen: dict[str, Path] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        file = _file_of(module)
        if file is None:
            continue
        seen[module] = file
        parts = module.split(".")
        todo |= {
            ".".join(parts[:i]) for i in range(1, len(parts))
        }  # parent packages run their __init__
        package = module if file.name == "__init__.py" else ".".join(parts[:-1])
        todo |= _imports(file.read_text(), package)
    return sorted(set(seen.values()))


def code_hash(path: Path) -> str:
    """A fingerprint of the code a chapter imports: it changes exactly when one of those files does."""
    digest = hashlib.sha256()
    for file in dependencies(path):
        digest.update(os.path.relpath(file, ROOT).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def missing_pieces(paths: list[Path] | None = None) -> list[str]:
    """What breaks the book/X.md <-> code/dlabc/X.py <-> tests/.../test_X.py mapping, one line each.

    Checks the given chapters (default: every chapter in ``_toc.yml``) and, in reverse, that
    every module of a part under ``code/dlabc`` has its chapter.
    """
    whole_book = paths is None
    paths = chapters() if whole_book else paths
    problems = []
    for path in paths:
        name = module_path(path)
        folder, _, stem = name.rpartition("/")
        if not path.is_file():
            problems.append(f"book/{name}.md: listed but missing")
            continue
        if not (PACKAGE / f"{name}.py").is_file():
            problems.append(f"book/{name}.md: no module code/dlabc/{name}.py")
        if not (ROOT / "tests" / folder / f"test_{stem}.py").is_file():
            problems.append(
                f"book/{name}.md: no test file tests/{folder}/test_{stem}.py"
            )
        if f"dlabc.{name.replace('/', '.')}" not in {
            m
            for c in read(path).cells
            if c.cell_type == "code"
            for m in _imports(c.source)
        }:
            problems.append(
                f"book/{name}.md: does not import its module dlabc.{name.replace('/', '.')}"
            )
    if whole_book:
        listed = {module_path(p) for p in paths}
        for module in sorted(PACKAGE.glob("*/*.py")):
            name = module.relative_to(PACKAGE).with_suffix("").as_posix()
            if module.name != "__init__.py" and name not in listed:
                problems.append(
                    f"code/dlabc/{name}.py: no chapter book/{name}.md in _toc.yml"
                )
    return problems


def execute(
    nb: nbformat.NotebookNode | Path,
    *,
    workdir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: int = 600,
    kernel_name: str = "python3",
) -> tuple[nbformat.NotebookNode, float, str | None]:
    """Run a chapter (its path, or a notebook) top to bottom in a fresh kernel.

    The one place that sets up ``nbclient`` for the book's tools and tests. ``workdir`` is
    the kernel's working directory (default: the chapter's folder), ``env`` the kernel's
    environment (default: this process's). Returns the executed notebook, the seconds it
    took and ``None``, or the error's last line where a cell raised.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    if isinstance(nb, Path):
        workdir = workdir or nb.parent
        nb = read(nb)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(workdir or ROOT)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=dict(os.environ) if env is None else env)
    except CellExecutionError as err:
        return nb, time.perf_counter() - start, str(err).strip().splitlines()[-1]
    return nb, time.perf_counter() - start, None


def changed(hours: float = 6.0) -> list[Path]:
    """The chapters that the last ``hours`` of commits (before HEAD's) or the working tree
    changed: their page, or a file of ``code/dlabc`` that they import. All of them where git
    has no commit that old (a shallow clone, a new repository)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head_time = int(git("log", "-1", "--format=%ct", "HEAD"))
        base = git(
            "rev-list", "-1", f"--before={head_time - int(hours * 3600)}", "HEAD"
        )
        if not base:
            return chapters()
        names = set(git("diff", "--name-only", base).splitlines())
        names |= {line[3:] for line in git("status", "--porcelain").splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return chapters()
    touched = {(ROOT / n).resolve() for n in names}
    return [
        path
        for path in chapters()
        if path in touched or touched.intersection(dependencies(path))
    ]


def rotating_sample(
    k: int = 4, day: int | None = None, among: list[Path] | None = None
) -> list[Path]:
    """``k`` chapters that change every day, so that every chapter is run like Colab within
    a few days even when nothing touches it (``day``: days since the epoch, default today;
    ``among``: the chapters, default every chapter of ``_toc.yml``)."""
    every = chapters() if among is None else among
    day = int(time.time() // 86400) if day is None else day
    return [every[(day * k + i) % len(every)] for i in range(min(k, len(every)))]
