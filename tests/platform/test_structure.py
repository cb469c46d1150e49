"""The architecture: book/X.md <-> code/dlabc/X.py <-> tests/X/test_X.py, and the anatomy of a chapter."""

import re

import pytest
from pybtex.database import parse_file

import chapters
import diagrams
import plumbing
import prose
import shown_code
from dlabc import plot

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
        assert page.stem in ("intro", "index", "glossary"), (
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


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapters.module_path)
def test_every_chapter_shows_its_diagram(chapter):
    name = chapters.module_path(chapter)
    if name in diagrams.EXEMPT:
        pytest.skip(f"no diagram: {diagrams.EXEMPT[name]}")
    shown = diagrams.referenced(chapter)
    assert shown, f"book/{name}.md includes no diagrams/*.svg (tools/diagrams.py)"
    for path in shown:
        assert path.is_file(), f"book/{name}.md includes a missing {path.name}"


@pytest.mark.parametrize("path", diagrams.files(), ids=lambda p: p.name)
def test_diagrams_follow_the_conventions(path):
    assert diagrams.problems(path) == []


def test_every_diagram_is_shown_by_a_page():
    used = {p.resolve() for page in chapters.pages() for p in diagrams.referenced(page)}
    unused = [p.name for p in diagrams.files() if p.resolve() not in used]
    assert not unused, f"diagrams no page includes: {unused}"


def test_the_diagram_check_catches_small_text_and_a_missing_title(tmp_path):
    svg = tmp_path / "x.svg"
    svg.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="700" height="100" '
        'viewBox="0 0 700 100" font-size="12"><text>x</text></svg>'
    )
    found = " ".join(diagrams.problems(svg))
    assert "font size 12 is below" in found and "no <title>" in found
    svg.write_text(svg.read_text().replace('font-size="12"', 'font-size="18"'))
    svg.write_text(svg.read_text().replace("<text>", "<title>t</title><text>"))
    assert diagrams.problems(svg) == []


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapters.module_path)
def test_code_cells_show_the_experiment(chapter):
    """The glue and claim lines sit in collapsed cells, not in the experiment's."""
    over = plumbing.measure(chapter)
    assert not over, (
        f"visible cells with more than {plumbing.LIMIT} lines of book.glue/claim/assert "
        f"(line, count): {over}; `python tools/plumbing.py --rewrite` moves them"
    )


def test_the_plumbing_counter_and_mover(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```{code-cell} ipython3\n"
        "x = 2\n"
        "book.claim('x is 2', x, '==', 2)\n"
        "assert x > 1\n"
        "book.glue_all(\n    x=x,\n)\n"
        "print(x)\n"
        "```\n"
    )
    assert plumbing.measure(page) == [(1, 5)]
    plumbing.rewrite(page)
    assert plumbing.measure(page) == []
    assert plumbing.totals(page) == (0, 5)
    cells = plumbing.code_cells(page.read_text().splitlines())
    assert [sorted(c.tags) for c in cells] == [[], ["hide-input"]]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapters.module_path)
def test_figures_are_drawn_for_the_column_with_readable_text(chapter):
    """Figures no wider than the 1280-px column (the browser test measures the shown
    size) and no font under 8 pt (12 px at the book's 110 dpi)."""
    text = chapter.read_text()
    for width in re.findall(r"figsize=\(\s*([\d.]+)", text):
        assert float(width) <= FIGURE_INCHES, (
            f"figsize width {width} in: drawn wider than the column ({FIGURE_INCHES} in)"
        )
    for size in re.findall(r"fontsize=([\d.]+)", text):
        assert float(size) >= 8, f"fontsize={size} is below 8 pt"


FIGURE_INCHES = plot.COLUMN_INCHES


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapters.module_path)
def test_code_cells_fit_the_code_box(chapter):
    """88 columns, like the package (the box holds 92 at 1280 px); `make lint` formats
    the cells, and a long string is split by hand."""
    long = [
        line
        for cell in chapters.read(chapter).cells
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if len(line) > 88
    ]
    assert not long, f"code-cell lines over 88 columns: {long}"
