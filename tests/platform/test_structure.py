"""The architecture: book/X.md <-> code/dlabc/X.py <-> tests/X/test_X.py, and the anatomy of a chapter."""

import re

import pytest
from pybtex.database import parse_file

import chapters
import prose
import shown_code

CHAPTERS = chapters.chapters()


def test_every_page_in_the_toc_exists():
    missing = [
        str(p.relative_to(chapters.ROOT)) for p in chapters.pages() if not p.is_file()
    ]
    assert not missing, f"_toc.yml lists missing pages: {missing}"


def test_there_are_chapters():
    assert CHAPTERS, "_toc.yml lists no chapter with code"


def test_every_chapter_has_its_module_and_tests():
    problems = chapters.missing_pieces()
    assert not problems, "\n".join(problems)


def test_the_structure_check_catches_a_missing_chapter_module_and_test(tmp_path):
    ghost = chapters.ROOT / "book" / "transformers" / "ghost.md"
    assert chapters.missing_pieces([ghost]) == [
        "book/transformers/ghost.md: listed but missing"
    ]
    real = CHAPTERS[0]
    assert chapters.missing_pieces([real]) == []


def test_pages_without_code_are_only_introductions():
    for page in set(chapters.pages()) - set(CHAPTERS):
        assert page.stem in ("intro", "index"), (
            f"{page} has no code cell: every chapter runs code"
        )


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapters.module_path)
def test_chapter_anatomy(chapter):
    text = chapter.read_text()
    name = chapters.module_path(chapter)
    assert text.startswith("---\njupytext:") and "kernelspec:" in text, (
        "front matter that makes it a notebook"
    )
    assert re.search(r"^# \S", text, flags=re.M), "a title"
    assert "After this chapter you will be able to" in text, (
        "what the reader will be able to do"
    )
    assert re.search(r"^\$\$ *\([\w-]+\)$", text, flags=re.M), (
        "at least one numbered equation"
    )
    assert "book.setup()" in text, "the set-up (device, one thread, seed)"
    assert "book.show_source(" in text, (
        f"the implementation shown from code/dlabc/{name}.py"
    )
    assert re.search(r"book\.glue(_all)?\(", text) and "{glue:text}" in text, (
        "numbers glued into the prose"
    )
    assert "plt.show()" in text, "at least one live figure"
    assert ":::{exercise}" in text and ":::{solution}" in text, (
        "exercises with solutions"
    )
    assert "```{bibliography}" in text and "{cite" in text, "references"


def test_every_citation_is_in_the_bibliography():
    keys = set(parse_file(str(chapters.ROOT / "book" / "references.bib")).entries)
    for page in chapters.pages():
        for group in re.findall(r"\{cite(?::[pt])?\}`([^`]+)`", page.read_text()):
            for key in group.split(","):
                assert key.strip() in keys, (
                    f"{page.name} cites {key!r}, missing from book/references.bib"
                )


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapters.module_path)
def test_the_code_a_page_shows_is_the_algorithm(chapter):
    """Argument checks live in constructors and thin entry points the page does not show."""
    checking, shown = shown_code.measure(chapter)
    assert shown > 0
    assert checking <= shown_code.LIMIT * shown, (
        f"{checking} of the {shown} lines the page shows check arguments "
        f"(limit {shown_code.LIMIT:.0%}): move them out of the shown objects"
    )


def test_the_check_counter_sees_guards_asserts_and_check_calls():
    source = '''
def f(x, n):
    """Doc."""
    if n <= 0:
        raise ValueError("n")
    x = check_tensor(x, "x", ndim=2)
    assert x.shape[0] == n
    return x * n
'''
    assert shown_code.check_lines(source) == (4, 7)


@pytest.mark.parametrize("page", chapters.pages(), ids=chapters.module_path)
def test_measured_numbers_in_the_prose_are_glued(page):
    typed = prose.typed_measurements(page)
    assert not typed, (
        "measured results typed by hand (glue them, or cite their source, or allow them "
        f"with a reason in tools/prose.py): {typed}"
    )


def test_the_prose_check_finds_a_typed_percentage(tmp_path):
    page = chapters.ROOT / "book" / "foundations" / "ghost.md"
    text = (
        "It reached 94 % in {glue:text}`t` s, about $3\\%$ `5 %`.\n\n"
        "| table | 3 % |\n\nPublished: 3.57 % {cite:p}`he2016deep`. Took 30 s.\n"
    )
    try:
        page.write_text(text)
        assert [t for _, t in prose.typed_measurements(page)] == ["94 %", "30 s"]
    finally:
        page.unlink()
