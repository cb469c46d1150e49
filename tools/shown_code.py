"""What the pages show of ``code/dlabc``, and how much of it is argument checking.

A chapter puts our code on its page with ``book.show_source(obj)``. Readers come for the
algorithm, so the lines that only check arguments (an ``if`` whose body only raises, a call
of a ``check_*`` helper, an ``assert``) belong in constructors and thin public entry points
that the page does not show. ``python tools/shown_code.py`` prints, per chapter, the shown
lines and the share of them that check arguments; ``tests/platform/test_structure.py`` keeps
every chapter under :data:`LIMIT`.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
from pathlib import Path

import chapters

LIMIT = 0.10
_SHOWN = re.compile(r"show_source\(\s*([A-Za-z_][\w.]*)\s*\)")
_CHECK_CALL = re.compile(r"^_?(check|validate)", re.IGNORECASE)


def shown_objects(path: Path) -> list[object]:
    """The objects a chapter passes to ``show_source``, imported the way the chapter does."""
    cells = [c.source for c in chapters.read(path).cells if c.cell_type == "code"]
    namespace: dict = {}
    for source in cells:
        tree = ast.parse(
            "\n".join(
                "" if chapters._MAGIC.match(x) else x for x in source.splitlines()
            )
        )
        for node in tree.body:
            # only our own modules: shown objects come from dlabc, and importing other
            # packages here (some import lazily) from the threads of the notebook tests
            # can race: diffusers' lazy module once answered "cannot import name"
            if _imports_dlabc(node):
                exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    objects = []
    for source in cells:
        for expression in _SHOWN.findall(source):
            objects.append(eval(expression, namespace))  # noqa: S307 - our own chapters
    return objects


def _imports_dlabc(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] == "dlabc"
    if isinstance(node, ast.Import):
        return all(alias.name.split(".")[0] == "dlabc" for alias in node.names)
    return False


def _is_check_call(node: ast.AST) -> bool:
    value = getattr(node, "value", None)
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return bool(_CHECK_CALL.match(name))


def _only_raises(body: list[ast.stmt]) -> bool:
    return all(
        isinstance(s, ast.Raise) or (isinstance(s, ast.If) and _guard(s)) for s in body
    )


def _guard(node: ast.If) -> bool:
    return _only_raises(node.body) and (not node.orelse or _only_raises(node.orelse))


def check_lines(source: str) -> tuple[int, int]:
    """(lines that check arguments, non-blank lines) in one shown object's source."""
    source = textwrap.dedent(source)
    lines = source.splitlines()
    checking: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Assert)
            or (isinstance(node, ast.If) and _guard(node))
            or (isinstance(node, (ast.Expr, ast.Assign)) and _is_check_call(node))
        ):
            checking.update(range(node.lineno, node.end_lineno + 1))
    total = [i for i, line in enumerate(lines, 1) if line.strip()]
    return sum(i in checking for i in total), len(total)


def measure(path: Path) -> tuple[int, int]:
    """(checking lines, shown lines) over everything the chapter shows."""
    checking = shown = 0
    for obj in shown_objects(path):
        c, t = check_lines(inspect.getsource(obj))
        checking, shown = checking + c, shown + t
    return checking, shown


def main() -> int:
    total_c = total_s = 0
    for path in chapters.chapters():
        c, s = measure(path)
        total_c, total_s = total_c + c, total_s + s
        share = c / s if s else 0.0
        flag = "  OVER" if share > LIMIT else ""
        print(f"{chapters.module_path(path):40s} {c:4d} / {s:4d}  {share:6.1%}{flag}")
    print(f"{'all chapters':40s} {total_c:4d} / {total_s:4d}  {total_c / total_s:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
