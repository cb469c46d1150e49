"""`make claims`: run the chapters under other CPUs' kernels and other seeds; report every claim.

A chapter asserts what its prose claims with ``book.claim(statement, value, op, bound)``. A
claim that holds on the machine it was written on can fail on the next one: PyTorch, oneDNN
and MKL pick kernels by instruction set (other last bits, which training amplifies), and
another seed draws other weights. This command executes each chapter once per
configuration, records every claim's value and margin (``$DLABC_CLAIMS_LOG``; failing claims
are recorded, not raised, so one run measures them all) and prints, per claim, the value
under each configuration and the smallest margin.

A claim is

- ``FAIL`` where it does not hold under some configuration;
- ``THIN`` where its smallest margin is less than the distance between the worst and the
  median run (the next machine or seed may fall as far again, over the edge), or under 5 %
  of the bound's size; where the values and the bound are all positive (losses, ratios,
  sizes, which vary by factors) it must be thin as ratios (on a log scale) too;
- ``ok`` otherwise (``exact`` for ``==`` facts that hold everywhere).

The command exits with 1 when any claim fails or is thin, or a chapter raises. Each run's
claims are kept under ``_build/claims/`` with a fingerprint of the code the chapter runs, so
a second ``make claims`` re-runs only the chapters whose code changed.

    python tools/claims.py                       # every chapter, every configuration
    python tools/claims.py book/cnn/resnet.md --configs native,avx2
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import chapters

#: Each configuration is a set of environment variables for the chapter's kernel.
CONFIGS: dict[str, dict[str, str]] = {
    "native": {},
    # what a reader's CPU without AVX-512 runs (most laptops, Apple silicon under Rosetta)
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    # PyTorch's portable kernels: no vector instruction set beyond the baseline
    "default": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    },
    "seed1": {"DLABC_SEED": "1"},
    "seed2": {"DLABC_SEED": "2"},
}
THIN_RELATIVE = 0.05


STORE = chapters.ROOT / "_build" / "claims"


def _code_only(file: Path) -> str:
    """The syntax tree of a module without its docstrings (comments are not in it)."""
    tree = ast.parse(file.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return ast.dump(tree)


def fingerprint(path: Path) -> str:
    """Changes when the code a chapter runs changes: its code cells, or the code (not the
    docstrings and comments) of a file of ``code/dlabc`` that it imports. Edits to prose
    keep the stored claims."""
    cells = [c.source for c in chapters.read(path).cells if c.cell_type == "code"]
    digest = hashlib.sha256("\n\0".join(cells).encode())
    for file in chapters.dependencies(path):
        digest.update(file.relative_to(chapters.ROOT).as_posix().encode())
        digest.update(_code_only(file).encode())
    return digest.hexdigest()


def cached_run(
    path: Path, config: str, stored_only: bool = False
) -> tuple[list[dict], str | None, float, bool]:
    """:func:`run`, or its stored result when neither the chapter nor its code changed."""
    store = STORE / f"{chapters.module_path(path).replace('/', '--')}.{config}.json"
    key = fingerprint(path)
    if store.is_file():
        saved = json.loads(store.read_text())
        if saved["fingerprint"] == key and not saved["error"]:
            return saved["records"], None, saved["seconds"], True
    if stored_only:
        return [], "not run since the chapter or its code changed", 0.0, True
    records, error, seconds = run(path, config)
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(
        json.dumps(
            {
                "fingerprint": key,
                "records": records,
                "error": error,
                "seconds": seconds,
            }
        )
    )
    return records, error, seconds, False


def run(path: Path, config: str) -> tuple[list[dict], str | None, float]:
    """Execute one chapter under one configuration; return its claims, error, seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "claims.jsonl"
        env = {
            **os.environ,
            **CONFIGS[config],
            "DLABC_CLAIMS_LOG": str(log),
            "DLABC_CLAIMS_KEEP_GOING": "1",
        }
        _, seconds, error = chapters.execute(path, env=env)
        records = (
            [json.loads(line) for line in log.read_text().splitlines()]
            if log.is_file()
            else []
        )
    return records, error, seconds


def _thin(margins: list[float], too_close: float) -> bool:
    smallest = min(margins)
    # how far the worst run fell short of the typical (median) run: the next machine or
    # seed may fall as far again
    typical = sorted(margins)[len(margins) // 2]
    return smallest < typical - smallest or smallest < too_close


def judge(values: list, margins: list, op: str, bound) -> str:
    """The verdict on one claim over all configurations (see the module's docstring)."""
    if any(m is None or m < 0 for m in margins):
        return "FAIL"
    if op == "==":
        return "exact"
    size = abs(bound) if isinstance(bound, (int, float)) else 0.0
    thin = _thin(margins, THIN_RELATIVE * size)
    positive = isinstance(bound, (int, float)) and bound > 0
    if thin and positive and all(isinstance(v, (int, float)) and v > 0 for v in values):
        # losses, ratios, sizes vary by factors: thin only if thin as ratios too
        sign = 1 if op in (">", ">=") else -1
        ratios = [sign * math.log10(v / bound) for v in values]
        thin = _thin(ratios, math.log10(1 + THIN_RELATIVE))
    return "THIN" if thin else "ok"


def report(results: dict, configs: list[str]) -> tuple[list[dict], int]:
    """One row per claim (chapter, statement, occurrence): values, margins and verdict."""
    rows, bad = [], 0
    for chapter, by_config in results.items():
        keyed: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
        for config in configs:
            records, error, _ = by_config[config]
            if error:
                rows.append(
                    {"chapter": chapter, "statement": f"RAISED under {config}: {error}"}
                )
                bad += 1
            seen: dict[str, int] = defaultdict(int)
            for record in records:
                key = (record["statement"], seen[record["statement"]])
                seen[record["statement"]] += 1
                keyed[key][config] = record
        for (statement, _), found in keyed.items():
            missing = [c for c in configs if c not in found]
            margins = [found[c]["margin"] for c in configs if c in found]
            values = [found[c]["value"] for c in configs if c in found]
            first = next(iter(found.values()))
            verdict = judge(values, margins, first["op"], first["bound"])
            if missing:
                verdict = f"MISSING in {','.join(missing)}"
            bad += verdict not in ("ok", "exact")
            rows.append(
                {
                    "chapter": chapter,
                    "statement": statement,
                    "op": first["op"],
                    "bound": first["bound"],
                    "values": {c: found[c]["value"] for c in found},
                    "min_margin": min(
                        (m for m in margins if m is not None), default=None
                    ),
                    "verdict": verdict,
                }
            )
    return rows, bad


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", type=Path, help="default: all")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, from {', '.join(CONFIGS)}",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--stored", action="store_true", help="report the stored runs, run nothing"
    )
    parser.add_argument(
        "--json", type=Path, default=chapters.ROOT / "_build" / "claims.json"
    )
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
    paths = [p.resolve() for p in args.chapters] or chapters.chapters()
    jobs = [(p, c) for p in paths for c in configs]
    results: dict[str, dict] = defaultdict(dict)
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(cached_run, p, c, args.stored): (p, c) for p, c in jobs}
        for future in concurrent.futures.as_completed(futures):
            path, config = futures[future]
            records, error, seconds, reused = future.result()
            name = chapters.module_path(path)
            results[name][config] = (records, error, seconds)
            print(
                f"{'kept' if reused else 'ran'} {name} [{config}] in {seconds:.0f} s: "
                f"{len(records)} claims" + (f", RAISED {error}" if error else ""),
                flush=True,
            )
    ordered = {chapters.module_path(p): results[chapters.module_path(p)] for p in paths}
    rows, bad = report(ordered, configs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print()
    print("| chapter | claim | " + " | ".join(configs) + " | min margin | verdict |")
    print("| --- | --- | " + " | ".join("---" for _ in configs) + " | --- | --- |")
    for row in rows:
        if "verdict" not in row:
            print(f"| {row['chapter']} | {row['statement']} |" + " |" * len(configs))
            continue
        cells = [_fmt(row["values"].get(c, "-")) for c in configs]
        claim = f"{row['statement']} ({row['op']} {_fmt(row['bound'])})"
        print(
            f"| {row['chapter']} | {claim} | "
            + " | ".join(cells)
            + f" | {_fmt(row['min_margin'])} | {row['verdict']} |"
        )
    n = sum("verdict" in r for r in rows)
    print(f"\n{n} claims in {len(paths)} chapters under {len(configs)} configurations;")
    print(f"{bad} failed, thin or raised. Table saved to {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
