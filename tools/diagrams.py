"""The book's architecture diagrams: hand-written SVG files, one way for the whole book.

Each chapter that introduces an architecture or an algorithm's data flow shows a diagram
near its start: ``book/<part>/diagrams/<chapter>.svg`` (more as
``<chapter>-<topic>.svg``), included with a MyST ``figure`` directive. SVG source is text in
the repository, reviewable in a diff, sharp at any zoom, and needs no tool to build.

The conventions, checked by :func:`problems` (and the tests):

- ``width``/``height`` attributes equal the ``viewBox`` size, and the width is at most
  :data:`MAX_WIDTH`, so the diagram is shown at the size it is drawn in the 1280-px column;
- every font size is at least :data:`MIN_FONT`, so the text stays at least 9 px when a
  phone shrinks the diagram to its :data:`PHONE_COLUMN`-px column;
- it has a ``<title>`` (the alternative text screen readers announce);
- nothing external: no ``http`` links, images, scripts or ``foreignObject``;
- transparent background, dark strokes and text, light fills: the theme puts a white card
  behind images in dark mode, so one file serves both modes.

    python tools/diagrams.py                # check every diagram, list the chapters without one
    python tools/diagrams.py --render DIR   # PNGs of each diagram at desktop and phone width
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import chapters

MAX_WIDTH = 720
PHONE_COLUMN = (
    358  # the content column's width on a 390-px phone (measured in Chromium)
)
MIN_TEXT_PX = 9.0
SVG_NS = "{http://www.w3.org/2000/svg}"
_REFERENCE = re.compile(r"diagrams/([\w.-]+\.svg)")

#: Chapters without a diagram, and why (none so far: every chapter has one).
EXEMPT: dict[str, str] = {}


def files() -> list[Path]:
    return sorted((chapters.ROOT / "book").glob("*/diagrams/*.svg"))


def referenced(page: Path) -> list[Path]:
    """The diagram files a page includes."""
    return [
        page.parent / "diagrams" / name for name in _REFERENCE.findall(page.read_text())
    ]


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    match = re.fullmatch(r"\s*([\d.]+)\s*(px)?\s*", value)
    return float(match.group(1)) if match else None


def _font_sizes(root: ET.Element) -> list[float]:
    sizes = []
    for element in root.iter():
        size = element.get("font-size")
        style = element.get("style", "")
        match = re.search(r"font-size:\s*([\d.]+)", style)
        if match:
            size = match.group(1)
        if size is not None:
            number = _number(size)
            sizes.append(number if number is not None else 0.0)
    for css in root.iter(f"{SVG_NS}style"):
        sizes += [
            float(v) for v in re.findall(r"font-size:\s*([\d.]+)", css.text or "")
        ]
    return sizes


def min_font(width: float) -> float:
    """The smallest font size a diagram ``width`` wide may use."""
    return MIN_TEXT_PX / min(1.0, PHONE_COLUMN / width)


def problems(path: Path) -> list[str]:
    """What is wrong with one diagram file (empty when it follows the conventions)."""
    text = path.read_text()
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        return [f"not well-formed XML: {err}"]
    found = []
    if root.tag != f"{SVG_NS}svg":
        return ["the root element is not <svg xmlns='http://www.w3.org/2000/svg'>"]
    width, height = _number(root.get("width")), _number(root.get("height"))
    box = [float(v) for v in re.split(r"[\s,]+", root.get("viewBox", "").strip()) if v]
    if width is None or height is None or len(box) != 4:
        return ["needs numeric width, height and a viewBox"]
    if (box[2], box[3]) != (width, height):
        found.append(
            f"width/height {width}x{height} differ from the viewBox {box[2]}x{box[3]}"
        )
    if width > MAX_WIDTH:
        found.append(f"{width:.0f} px wide; at most {MAX_WIDTH} fits the column")
    sizes = _font_sizes(root)
    if not sizes:
        found.append("no font-size set (set it on the <svg> or each <text>)")
    elif min(sizes) < min_font(width):
        found.append(
            f"font size {min(sizes):g} is below {min_font(width):.1f}, the least that stays "
            f"{MIN_TEXT_PX:g} px on a phone at this width ({width:.0f})"
        )
    if root.find(f"{SVG_NS}title") is None:
        found.append("no <title> (the text a screen reader says)")
    for bad in ("http://", "https://", "<script", "<image", "foreignObject"):
        if bad in text.replace('xmlns="http://www.w3.org/2000/svg"', ""):
            found.append(f"contains {bad!r}: diagrams are self-contained")
    return found


def render(out: Path) -> list[Path]:
    """Screenshots of every diagram as shown in the desktop column and on a phone."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        for path in files():
            for label, column in (("desktop", 800), ("phone", PHONE_COLUMN)):
                page = browser.new_page(viewport={"width": column + 20, "height": 400})
                data = base64.b64encode(path.read_bytes()).decode()
                page.set_content(
                    "<body style='margin:10px;background:#fff'><img "
                    f"src='data:image/svg+xml;base64,{data}' style='max-width:{column}px'>"
                    "</body>"
                )
                page.wait_for_load_state("load")
                shot = out / f"{path.stem}-{label}.png"
                page.screenshot(path=str(shot), full_page=True)
                shots.append(shot)
                page.close()
        browser.close()
    return shots


def _chromium() -> str:
    import layout

    found = layout.chromium()
    if not found:
        raise SystemExit(
            "Chromium is needed to render diagrams (apt-get install chromium)"
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    bad = 0
    for path in files():
        for problem in problems(path):
            bad += 1
            print(f"{path.relative_to(chapters.ROOT)}: {problem}")
    used = {p.resolve() for page in chapters.pages() for p in referenced(page)}
    for page in chapters.chapters():
        name = chapters.module_path(page)
        if name not in EXEMPT and not referenced(page):
            bad += 1
            print(f"book/{name}.md: no diagram")
        for path in referenced(page):
            if not path.is_file():
                bad += 1
                print(
                    f"book/{name}.md: includes missing {path.relative_to(chapters.ROOT)}"
                )
    for path in files():
        if path.resolve() not in used:
            bad += 1
            print(f"{path.relative_to(chapters.ROOT)}: no page includes it")
    if args.render:
        for shot in render(args.render):
            print(shot)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
