"""The book's plumbing in a chapter's code cells: what a reader sees vs what records numbers.

A code cell shows an experiment. The lines that hand its numbers to the prose
(``book.glue``, ``book.glue_all``) and assert the claims the prose makes (``book.claim``,
``assert``) are plumbing: they run in the notebook too, but they sit in a collapsed cell
(tag ``hide-input``) right after the experiment, so the visible cell reads as the
experiment alone. This module measures the plumbing left in visible cells (the test holds
each visible cell to :data:`LIMIT` lines) and moves it out where it can (``--rewrite``).

    python tools/plumbing.py                 # plumbing lines per chapter, visible vs hidden
    python tools/plumbing.py --rewrite [CH]  # move plumbing into collapsed cells
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import chapters

#: The most plumbing lines a visible code cell may hold (one ``glue_all`` call, say).
LIMIT = 2
HIDDEN_TAGS = {"hide-input", "remove-input", "remove-cell", "hide-cell"}
HEADER = (
    "# The numbers the text quotes, and the claims it makes (checked on every build)"
)
_FENCE = re.compile(r"^```\{code-cell\}")


@dataclass
class Cell:
    start: int  # index of the ```{code-cell} line
    body: int  # index of the first code line
    end: int  # index of the closing ``` line
    tags: set[str]

    @property
    def visible(self) -> bool:
        return not (self.tags & HIDDEN_TAGS)


def code_cells(lines: list[str]) -> list[Cell]:
    """The code cells of a MyST chapter given as lines, with their tags."""
    cells, i = [], 0
    while i < len(lines):
        if not _FENCE.match(lines[i]):
            i += 1
            continue
        start, j, tags = i, i + 1, set()
        if j < len(lines) and lines[j].strip() == "---":  # YAML options block
            j += 1
            while lines[j].strip() != "---":
                tags |= _tags(lines[j])
                j += 1
            j += 1
        while j < len(lines) and lines[j].startswith(":"):  # short options
            tags |= _tags(lines[j])
            j += 1
        end = j
        while lines[end].rstrip() != "```":
            end += 1
        cells.append(Cell(start, j, end, tags))
        i = end + 1
    return cells


def _tags(option: str) -> set[str]:
    match = re.match(r"\s*:?tags:\s*\[(.*)\]", option)
    return (
        {t.strip().strip("'\"") for t in match.group(1).split(",")} if match else set()
    )


def _is_plumbing(node: ast.stmt) -> bool:
    if isinstance(node, ast.Assert):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func = node.value.func
        return (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "book"
            and func.attr in ("glue", "glue_all", "claim")
        )
    return False


def plumbing_lines(source: str) -> int:
    """How many lines of ``source`` are plumbing statements, at any depth."""
    try:
        tree = ast.parse(_no_magics(source))
    except SyntaxError:
        return 0
    return sum(
        node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.stmt) and _is_plumbing(node)
    )


def _no_magics(source: str) -> str:
    return "\n".join(
        "pass" if line.lstrip().startswith(("%", "!")) else line
        for line in source.splitlines()
    )


def measure(path: Path) -> list[tuple[int, int]]:
    """``(line number, plumbing lines)`` of every visible cell of a chapter over the limit."""
    lines = path.read_text().splitlines()
    over = []
    for cell in code_cells(lines):
        if cell.visible:
            n = plumbing_lines("\n".join(lines[cell.body : cell.end]))
            if n > LIMIT:
                over.append((cell.start + 1, n))
    return over


def totals(path: Path) -> tuple[int, int]:
    """Plumbing lines in visible and in collapsed cells."""
    lines = path.read_text().splitlines()
    visible = hidden = 0
    for cell in code_cells(lines):
        n = plumbing_lines("\n".join(lines[cell.body : cell.end]))
        if cell.visible:
            visible += n
        else:
            hidden += n
    return visible, hidden


def _names(node: ast.AST, ctx: type) -> set[str]:
    return {
        n.id
        for n in ast.walk(node)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)
    }


def _split(code: list[str]) -> tuple[list[str], list[str], list[str]] | None:
    """Split a cell's lines into (kept, moved, warnings): top-level plumbing statements
    whose inputs the rest of the cell does not change afterwards move to a new cell."""
    try:
        tree = ast.parse(_no_magics("\n".join(code)))
    except SyntaxError:
        return None
    body = tree.body
    moved: list[ast.stmt] = []
    for k, node in enumerate(body):
        if not _is_plumbing(node):
            continue
        later = [n for n in body[k + 1 :] if not _is_plumbing(n)]
        rebound = (
            set().union(*(_names(n, ast.Store) for n in later)) if later else set()
        )
        if _names(node, ast.Load) & rebound:
            continue
        moved.append(node)
    if not moved:
        return None
    taken = set()
    for node in moved:
        taken.update(range(node.lineno - 1, node.end_lineno))
    kept = [line for i, line in enumerate(code) if i not in taken]
    out = [line for i, line in enumerate(code) if i in taken]
    while kept and not kept[-1].strip():
        kept.pop()
    warnings = []
    rest = [n for n in body if n not in moved]
    if rest and moved[-1] is body[-1]:
        last = rest[-1]
        if isinstance(last, ast.Expr) and not (
            isinstance(last.value, ast.Call)
            and ast.unparse(last.value.func) in ("plt.show", "print", "display")
        ):
            warnings.append(
                f"now ends in an expression that shows: {ast.unparse(last)[:60]}"
            )
    return kept, out, warnings


def rewrite(path: Path) -> list[str]:
    """Move the plumbing of every visible cell over the limit into a collapsed cell."""
    lines = path.read_text().splitlines()
    notes = []
    for cell in reversed(code_cells(lines)):
        code = lines[cell.body : cell.end]
        if not cell.visible or plumbing_lines("\n".join(code)) <= LIMIT:
            continue
        split = _split(code)
        if split is None:
            notes.append(f"{path.name}:{cell.start + 1}: nothing movable")
            continue
        kept, out, warnings = split
        notes += [f"{path.name}:{cell.start + 1}: {w}" for w in warnings]
        if not any(line.strip() and not line.lstrip().startswith("#") for line in kept):
            # the whole cell is plumbing: collapse it as it is
            lines[cell.start + 1 : cell.body] = [":tags: [hide-input]"]
            continue
        new = [
            "",
            "```{code-cell} ipython3",
            ":tags: [hide-input]",
            "",
            HEADER,
            *out,
            "```",
        ]
        lines[cell.body : cell.end + 1] = [*kept, "```", *new]
    path.write_text("\n".join(lines) + "\n")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rewrite", action="store_true")
    parser.add_argument("chapters", nargs="*", help="e.g. improvements/lora")
    args = parser.parse_args(argv)
    paths = [
        p
        for p in chapters.chapters()
        if not args.chapters or chapters.module_path(p) in args.chapters
    ]
    bad = 0
    for path in paths:
        if args.rewrite:
            for note in rewrite(path):
                print(note)
        visible, hidden = totals(path)
        over = measure(path)
        bad += bool(over)
        print(
            f"{chapters.module_path(path):40s} visible {visible:3d}  collapsed {hidden:3d}"
            + (f"  cells over {LIMIT}: {over}" if over else "")
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
