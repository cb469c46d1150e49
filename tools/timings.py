"""`make timings`: execute every chapter from nothing, in a fresh kernel, and print how long each took.

A benchmark, not a test: each chapter has a budget of 60 s on the 2-core reference machine,
and the chapters together 30 s on average (so that the whole book, executed two chapters at a
time, builds from nothing in minutes). The table flags chapters over budget, and the command
exits with 1 if any chapter failed or went over, or the average did.
``python tools/timings.py book/transformers/attention.md`` times only that chapter
(`make chapter CH=transformers/attention`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import chapters

BUDGET_S = 60.0
AVERAGE_BUDGET_S = 30.0


def execute(path: Path) -> tuple[float, str | None]:
    """Run the chapter at ``path`` top to bottom in a fresh kernel; return (seconds, error or None)."""
    _, seconds, error = chapters.execute(path)
    return seconds, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "chapters",
        nargs="*",
        type=Path,
        help="chapter .md files (default: every chapter in _toc.yml)",
    )
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.chapters] or chapters.chapters()
    rows, bad = [], 0
    width = max(len(chapters.module_path(p)) for p in paths)
    print(f"{'chapter':<{width}}  {'seconds':>7}  status", flush=True)
    for path in paths:
        seconds, error = execute(path)
        status = "ok" if error is None else f"FAILED: {error}"
        if error is None and seconds > BUDGET_S:
            status = f"OVER BUDGET ({BUDGET_S:.0f} s)"
        bad += status != "ok"
        rows.append((chapters.module_path(path), seconds, status))
        print(f"{rows[-1][0]:<{width}}  {seconds:7.1f}  {status}", flush=True)
    total = sum(r[1] for r in rows)
    print(
        f"{'total':<{width}}  {total:7.1f}  {len(rows) - bad} of {len(rows)} ok, budget {BUDGET_S:.0f} s per chapter"
    )
    average = total / len(rows)
    whole_book = not args.chapters
    over_average = whole_book and average > AVERAGE_BUDGET_S
    print(
        f"{'average':<{width}}  {average:7.1f}  "
        + (f"OVER BUDGET ({AVERAGE_BUDGET_S:.0f} s)" if over_average else "ok")
    )
    return 1 if bad or over_average else 0


if __name__ == "__main__":
    sys.exit(main())
