"""Format the chapters' code cells with ruff, like the package's code (88 columns).

The page's code column holds 92 columns at a 1280-px window, so a cell formatted to ruff's
88 never scrolls sideways. Cells with IPython magics or shell lines are left alone.

    python tools/format_cells.py           # format every chapter's code cells in place
    python tools/format_cells.py --check   # write nothing; exit 1 if a cell would change
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import chapters
import plumbing

RUFF = Path(sys.executable).with_name("ruff")


def format_code(code: str) -> str:
    """``code`` as ``ruff format`` writes it (the project's settings in pyproject.toml)."""
    result = subprocess.run(
        [str(RUFF), "format", "--stdin-filename", "cell.py", "-"],
        input=code,
        capture_output=True,
        text=True,
        cwd=chapters.ROOT,
    )
    if result.returncode != 0:
        raise ValueError(f"ruff cannot format this cell:\n{code}\n{result.stderr}")
    return result.stdout


def format_chapter(path: Path, write: bool = True) -> int:
    """Format the code cells of one chapter; return how many changed."""
    lines = path.read_text().splitlines()
    changed = 0
    for cell in reversed(plumbing.code_cells(lines)):
        code = lines[cell.body : cell.end]
        if any(line.lstrip().startswith(("%", "!")) for line in code):
            continue
        text = "\n".join(code).strip("\n")
        if not text:
            continue
        new = format_code(text + "\n").rstrip("\n")
        if new != text:
            changed += 1
            # keep the blank lines that separate the cell's options from its code
            lead = len(code) - len("\n".join(code).lstrip("\n").splitlines())
            lines[cell.body : cell.end] = [""] * lead + new.splitlines()
    if changed and write:
        path.write_text("\n".join(lines) + "\n")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = 0
    for path in chapters.chapters():
        n = format_chapter(path, write=not args.check)
        if n:
            stale += 1
            verb = "would change" if args.check else "formatted"
            print(f"{chapters.module_path(path)}: {n} cells {verb}")
    if args.check and stale:
        print("run `python tools/format_cells.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
