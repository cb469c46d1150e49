"""Numbers typed by hand into a chapter's prose, where a computed one belongs.

A measured result (an accuracy, a time, a memory size, a speed-up) must come from the code
through ``{glue:text}``; a typed one goes stale the day the code or the machine changes.
:func:`typed_measurements` finds a digit followed by a percent sign or a unit of time,
memory or speed in the Markdown of a chapter, leaving out what may hold typed numbers:

- math (``$...$``, ``$$...$$``, ``{math}`` blocks) and inline code;
- glue roles, and code cells;
- table rows (tables of paper facts: published sizes and scores);
- a sentence that cites its source (``{cite:p}``/``{cite:t}``): a published number;
- the entries of :data:`ALLOWED`, each with the reason it is not a measurement.

``tests/platform/test_structure.py`` fails on any other. ``python tools/prose.py`` lists them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import chapters

UNIT = (
    r"\s?(?:%|percent\b|per cent\b|[KMGT]i?B\b|bytes\b|"
    r"× (?:faster|slower|less|more|fewer|smaller|larger)|"
    r"times (?:faster|slower|less|more|fewer|smaller|larger))"
    r"|\s(?:ms|s|seconds?|minutes?|hours?)\b"
)
MEASUREMENT = re.compile(r"(?<![\w.])\d[\d,.]*(?:" + UNIT + ")")

#: (chapter, the exact text matched) -> why it is not a measured result.
ALLOWED: dict[tuple[str, str], str] = {
    (
        "improvements/flash_attention",
        "40 MB",
    ): "the size of the tensor the code allocates",
    (
        "improvements/flash_attention",
        "20 MB",
    ): "the size of the tensor the code allocates",
    ("rnn/seq2seq", "99 %"): "an exercise's question: does the model still reach 99 %?",
    (
        "transformers/attention_with_pytorch",
        "10%",
    ): "the chance level of a ten-way guess",
    ("transformers/attention_with_pytorch", "100%"): "perfect accuracy, as a limit",
    (
        "transformers/transformer",
        "99%",
    ): "an exercise's question: which runs reach 99%?",
    (
        "improvements/gqa_kv_cache",
        "140 GB",
    ): "Llama 2 70B's weights in float16: 70e9 × 2",
    (
        "improvements/gqa_kv_cache",
        "80 GB",
    ): "the memory of an 80 GB accelerator (A100/H100)",
    (
        "improvements/gqa_kv_cache",
        "5%",
    ): "the GQA paper's uptraining budget (cited above)",
    (
        "scaling/index",
        "112 GB",
    ): "arithmetic: 16 bytes per parameter (the table above) times 7e9 parameters",
}

_HIDE = [
    re.compile(
        r"```.*?```", re.S
    ),  # code cells and directives (math blocks among them)
    re.compile(r"^:::.*$|^:\w+:.*$", re.M),  # colon fences and their options; their
    # content (exercises, solutions, notes) is prose and stays checked
    re.compile(r"\$\$.*?\$\$", re.S),
    re.compile(r"(?<!\\)\$[^$\n]+\$"),
    re.compile(r"\{[\w:-]+\}`[^`]*`"),  # roles: glue, cite, eq, ref ...
    re.compile(r"`[^`\n]*`"),
    re.compile(r"^---\n.*?\n---\n", re.S),  # front matter
]
_SENTENCE_END = re.compile(r"[.!?]\s")


def _blank(text: str, pattern: re.Pattern) -> str:
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def typed_measurements(path: Path) -> list[tuple[int, str]]:
    """(line number, the matched text) for each typed measurement in a chapter's prose."""
    original = path.read_text()
    text = original
    # directives whose body is prose (exercises, solutions, admonitions) stay checked
    text = re.sub(
        r"^```\{(exercise|solution|note|tip|warning|important)\}.*$",
        "",
        text,
        flags=re.M,
    )
    text = re.sub(
        r"^```\{(exercise|solution|note|tip|warning|important)[^\n]*\n",
        "",
        text,
        flags=re.M,
    )
    for pattern in _HIDE:
        text = _blank(text, pattern)
    text = "\n".join(
        " " * len(line) if line.lstrip().startswith("|") else line
        for line in text.split("\n")
    )
    name = chapters.module_path(path)
    found = []
    for match in MEASUREMENT.finditer(text):
        start = max(
            (m.end() for m in _SENTENCE_END.finditer(original, 0, match.start())),
            default=0,
        )
        end_match = _SENTENCE_END.search(original, match.end())
        sentence = original[start : end_match.start() if end_match else len(original)]
        if "{cite" in sentence:
            continue
        if (name, match.group(0).strip()) in ALLOWED:
            continue
        line = original.count("\n", 0, match.start()) + 1
        found.append((line, match.group(0).strip()))
    return found


def main() -> int:
    n = 0
    for path in chapters.pages():
        for line, text in typed_measurements(path):
            n += 1
            print(f"{path.relative_to(chapters.ROOT)}:{line}: {text!r}")
    print(f"{n} typed measurements")
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
