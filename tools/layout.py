"""Does every page fit? Equations, code boxes, figures and the page itself, measured in Chromium.

On the built site (``make book`` first), at the widths readers use::

    python tools/layout.py                      # every page at 1280 and 390 px
    python tools/layout.py rnn/lstm_gru         # some pages

Without a build, one chapter's display equations typeset alone in a column as wide as the
site's (quick, while splitting long equations)::

    python tools/layout.py --equations rnn/lstm_gru

What counts as a problem (the browser test, tests/platform/test_site.py, fails on it):

- at 1280 px, a display equation or a code box wider than the column (it scrolls or is cut);
- at 390 px, anything that makes the page scroll sideways (a box may scroll inside itself);
- a figure shown below :data:`MIN_SHOWN` of the size it was drawn at (its text shrinks below
  9 px: draw it at the size it is shown instead).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import chapters

SITE = chapters.ROOT / "_build" / "html"
WIDTHS = (1280, 390)
#: The least fraction of its drawn width a figure may be shown at.
MIN_SHOWN = 0.95
#: What the local server lets the browser cache.
CACHED = (".js", ".css", ".woff", ".woff2", ".ttf", ".png", ".svg")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]

# Everything that can be too wide, measured in the page: display equations (MathJax's
# container against its block), code boxes (the <pre>'s content against its box), images
# (drawn vs shown width) and the page (document vs window).
MEASURE = """(width) => {
  const article = document.querySelector('article') || document.body;
  const label = (e) => {
    const text = (e.innerText || e.textContent || '').replace(/\\s+/g, ' ').trim();
    return [...text].slice(0, 70).join('');  // by code point: math letters are pairs
  };
  const section = (e) => {
    const s = e.closest('section[id]');
    return s ? s.id : '';
  };
  const equations = [...article.querySelectorAll('mjx-container[display="true"]')]
    .filter(m => m.scrollWidth > m.clientWidth + 1 ||
                 m.getBoundingClientRect().right > article.getBoundingClientRect().right + 1)
    .map(m => ({where: section(m), what: label(m.closest('.math') || m),
                over: m.scrollWidth - m.clientWidth}));
  const code = [...article.querySelectorAll('div.highlight pre, div.cell_output pre')]
    .filter(p => p.scrollWidth > p.clientWidth + 1)
    .map(p => ({where: section(p), what: label(p),
                over: p.scrollWidth - p.clientWidth}));
  const images = [...article.querySelectorAll('img')]
    .filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0)
    .map(i => ({src: i.getAttribute('src'), natural: i.naturalWidth,
                shown: Math.round(i.getBoundingClientRect().width)}));
  const column = article.getBoundingClientRect().width;
  // boxes that scroll inside themselves, and the theme's off-canvas sidebars
  const SCROLLS_ITSELF = 'pre, mjx-container, .table-wrapper, .bd-sidebar-primary, ' +
    '.bd-sidebar-secondary, .search-button__wrapper';
  const wide = [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1 &&
                 !e.closest(SCROLLS_ITSELF))
    .map(e => e.tagName.toLowerCase() + ': ' + label(e).slice(0, 40));
  return {
    width, column,
    scroll: document.documentElement.scrollWidth > window.innerWidth,
    equations, code, images, wide: wide.slice(0, 5),
  };
}"""


def chromium() -> str | None:
    import os

    names = ("chromium", "chromium-browser", "google-chrome")
    return os.environ.get("CHROMIUM") or next(
        filter(None, map(shutil.which, names)), None
    )


@contextmanager
def serve(directory: Path):
    """The built site on a local port, for as long as the ``with`` lasts."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_response(self, code, message=None):
            super().send_response(code, message)
            # Scripts, styles and fonts are the same on every page: let the browser keep
            # them (and V8 its compiled code), so that a page loads in half the time.
            # Pages, and anything that is not found, are always fetched anew.
            if code == 200 and self.path.split("?")[0].endswith(CACHED):
                self.send_header("Cache-Control", "max-age=3600")

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def wait_for_math(page) -> None:
    """Wait until MathJax has typeset the page (pages without math load no MathJax)."""
    if not page.evaluate("() => !!document.querySelector('script[src*=\"mathjax\"]')"):
        return
    page.wait_for_function(
        "() => window.MathJax && MathJax.startup && MathJax.startup.promise",
        timeout=20000,
    )
    page.evaluate("() => MathJax.startup.promise")


def measure(browser, url: str, width: int, screenshot: Path | None = None) -> dict:
    """What is too wide on one page at one window width."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(url, wait_until="load")
    wait_for_math(page)
    report = page.evaluate(MEASURE, width)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    return report


def problems(report: dict) -> list[str]:
    """The measurements that break the rules in this module's docstring."""
    found = []
    if report["width"] >= 1000:
        found += [
            f"equation over by {e['over']} px in #{e['where']}: {e['what']}"
            for e in report["equations"]
        ]
        found += [
            f"code box over by {c['over']} px in #{c['where']}: {c['what']}"
            for c in report["code"]
        ]
        found += [
            f"figure {i['src']} drawn {i['natural']} px wide, shown at {i['shown']} px"
            for i in report["images"]
            if i["shown"] < MIN_SHOWN * i["natural"]
        ]
    elif report["scroll"]:
        found.append(
            f"the page scrolls sideways at {report['width']} px: {report['wide']}"
        )
    return found


def equations_alone(path: Path, column: float) -> list[tuple[str, float]]:
    """Each display equation of a chapter typeset by the site's MathJax in a column
    ``column`` px wide: ``(first line of its TeX, how many px it is too wide)`` for those
    that do not fit."""
    from playwright.sync_api import sync_playwright

    mathjax = (
        chapters.ROOT / ".venv" / "mathjax" / "static" / "mathjax" / "tex-chtml.js"
    )
    if not mathjax.is_file():
        raise SystemExit(f"no MathJax at {mathjax}: run `make book` once")
    blocks = re.findall(r"^\$\$\n(.*?)\n\$\$", path.read_text(), flags=re.M | re.S)
    blocks += docstring_equations(path)
    html = [
        "<html><head><script>MathJax={tex:{tags:'none'}};</script>",
        f"<script src='file://{mathjax}'></script></head>",
        f"<body style='font-family:system-ui,sans-serif;font-size:16px;width:{column}px'>",
    ]
    for tex in blocks:
        safe = tex.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        html.append(f"<div class='eq'>\\[{safe}\\]</div>")
    html.append("</body></html>")
    with tempfile.NamedTemporaryFile("w", suffix=".html", delete=False) as f:
        f.write("\n".join(html))
    too_wide = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": int(column) + 200, "height": 900})
        page.goto(f"file://{f.name}", wait_until="load")
        wait_for_math(page)
        widths = page.evaluate(
            "() => [...document.querySelectorAll('.eq mjx-container')].map(m => "
            "m.firstElementChild.getBoundingClientRect().width)"
        )
        browser.close()
    for tex, width in zip(blocks, widths, strict=True):
        if width > column:
            too_wide.append((tex.strip().splitlines()[0][:70], round(width - column)))
    return too_wide


def docstring_equations(path: Path) -> list[str]:
    """The display equations of the docstrings a chapter shows (``book.show_source`` shows
    a docstring above its code, a paragraph that is one ``$...$`` formula as a display
    equation)."""
    import inspect
    import textwrap

    import shown_code
    from dlabc import book

    found = []
    for obj in shown_code.shown_objects(path):
        code = textwrap.dedent(inspect.getsource(obj))
        _, doc = book.split_docstring(code)
        if doc:
            markdown = book._docstring_markdown(doc).replace("\n> ", "\n")
            found += re.findall(r"\$\$\n(.*?)\n>? ?\$\$", markdown, flags=re.S)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "pages", nargs="*", help="e.g. rnn/lstm_gru (default: every page)"
    )
    parser.add_argument(
        "--equations", action="store_true", help="typeset equations alone"
    )
    parser.add_argument("--column", type=float, default=None, help="column width, px")
    parser.add_argument(
        "--shots", type=Path, default=None, help="save screenshots here"
    )
    args = parser.parse_args(argv)
    pages = [
        p
        for p in chapters.pages()
        if not args.pages or chapters.module_path(p) in args.pages
    ]
    if not chromium():
        raise SystemExit("Chromium is needed (apt-get install chromium)")
    bad = 0
    if args.equations:
        for path in pages:
            for tex, over in equations_alone(path, args.column or COLUMN):
                bad += 1
                print(f"{chapters.module_path(path)}: {over} px too wide: {tex}")
        return 1 if bad else 0
    from playwright.sync_api import sync_playwright

    if not (SITE / "index.html").is_file():
        raise SystemExit(f"no built site at {SITE}: run `make book` first")
    with serve(SITE) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        for path in pages:
            name = chapters.module_path(path)
            for width in WIDTHS:
                shot = (
                    args.shots / f"{name.replace('/', '__')}-{width}.png"
                    if args.shots
                    else None
                )
                report = measure(browser, f"{url}/book/{name}.html", width, shot)
                found = problems(report)
                bad += len(found)
                print(
                    f"{name} @ {width}px (column {report['column']:.0f}): {len(found)} problems"
                )
                for problem in found:
                    print(f"    {problem}")
        browser.close()
    return 1 if bad else 0


#: What ``--equations`` typesets into: the content column at 1280 px (750 px) less the
#: room a numbered equation's "(n)" takes on the page.
COLUMN = 700.0

if __name__ == "__main__":
    sys.exit(main())
