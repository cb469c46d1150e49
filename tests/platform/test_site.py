"""The built site, as a reader sees it: every chapter page opened in headless Chromium.

Needs the site (`make book`) and Debian's Chromium (`apt-get install chromium`; `.ci/run`
installs it). Where either is missing the tests are skipped with a loud reason locally, and
fail under CI (CI=true), so that a green CI always means the pages were really looked at.
Screenshots of each page's top land in ``_build/screenshots/`` for a person to look at.

Opening a page costs a second or two of both cores, so the tests that open every page are
marked ``pages``: ``make book`` runs them right after building (the strict build fails on a
page that fails them), and a page whose HTML and the site's scripts and styles are unchanged
since it last passed is not opened again (``_build/pages-checked.json``; a fresh build, as
in CI, checks them all). ``make test`` runs the rest: links, downloads, sidebar, search.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

import chapters
import layout

SITE = layout.SITE
SHOTS = chapters.ROOT / "_build" / "screenshots"
CHECKED = chapters.ROOT / "_build" / "pages-checked.json"
IN_CI = os.environ.get("CI") == "true"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _missing(reason: str):
    message = f"BROWSER TEST NOT RUN: {reason}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def site_url():
    if not (SITE / "index.html").is_file():
        _missing(f"no built site at {SITE}; run `make book` first")
    with layout.serve(SITE) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    chromium = layout.chromium()
    if not chromium:
        _missing(
            "Chromium not found; install it with `apt-get install chromium` (or set CHROMIUM=/path)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def _fingerprint(name: str) -> str:
    """The page's HTML and everything under _static/ that every page loads."""
    digest = hashlib.sha256((SITE / "book" / f"{name}.html").read_bytes())
    for asset in sorted((SITE / "_static").rglob("*")):
        if asset.suffix in (".js", ".css") and asset.is_file():
            digest.update(asset.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def passed():
    """Pages that passed, by fingerprint; a page whose fingerprint is there is skipped."""
    record = json.loads(CHECKED.read_text()) if CHECKED.is_file() else {}

    def check(name: str):
        if not (SITE / "book" / f"{name}.html").is_file():
            return lambda: None
        fingerprint = _fingerprint(name)
        if record.get(name) == fingerprint:
            # one reason for all, so that pytest sums them up in one line
            pytest.skip(f"unchanged since it passed (remove {CHECKED} to recheck)")

        def done():
            record[name] = fingerprint
            CHECKED.write_text(json.dumps(record, indent=1, sort_keys=True))

        return done

    return check


@pytest.fixture(scope="module")
def tab(browser):
    """One tab that visits every page in turn: the scripts, styles and fonts that all pages
    share load once (the test server lets them be cached), which halves the test's time."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def _page_report(page, url: str, screenshot: Path) -> dict:
    page.set_viewport_size({"width": 1280, "height": 900})
    errors, external = [], []

    def on_error(exc):
        errors.append(f"page error: {exc}")

    def on_console(msg):
        if msg.type == "error":
            errors.append(f"console {msg.type}: {msg.text}")

    def on_response(r):
        if r.status >= 400:
            errors.append(f"HTTP {r.status}: {r.url}")

    def on_request(req):
        if urlparse(req.url).hostname not in ("127.0.0.1", None):
            external.append(req.url)

    listeners = {
        "pageerror": on_error,
        "console": on_console,
        "response": on_response,
        "request": on_request,
    }
    for event, listener in listeners.items():
        page.on(event, listener)
    try:
        return _looked_at(page, url, screenshot, errors, external)
    finally:
        for event, listener in listeners.items():
            page.remove_listener(event, listener)


def _looked_at(page, url, screenshot, errors, external) -> dict:
    response = page.goto(url, wait_until="load")
    assert response is not None and response.ok, (
        f"{url} answered {response and response.status}"
    )
    layout.wait_for_math(page)
    report = page.evaluate(
        """() => {
        const article = document.querySelector('article') || document.body;
        const images = [...article.querySelectorAll('img')];
        return {
          text: article.innerText,
          typeset: document.querySelectorAll('mjx-container').length,
          rawMath: [...document.querySelectorAll('.math')].filter(e => /\\\\[\\(\\[]/.test(e.textContent)).length,
          images: images.length,
          brokenImages: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
          colab: [...document.querySelectorAll('a[href*="colab.research.google.com"]')].map(a => a.href),
        };
    }"""
    )
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(
        path=str(screenshot)
    )  # the top of the page; `make layout SHOTS=dir` keeps whole pages
    # what is too wide, at the desktop width and then on a phone (the same page,
    # reflowed: tools/layout.py)
    fit = []
    for width in layout.WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        fit += layout.problems(page.evaluate(layout.MEASURE, width))
    return {**report, "errors": errors, "external": external, "fit": fit}


@pytest.mark.pages
@pytest.mark.parametrize("chapter", chapters.chapters(), ids=chapters.module_path)
def test_chapter_page_in_browser(passed, tab, site_url, chapter):
    name = chapters.module_path(chapter)
    done = passed(name)
    report = _page_report(
        tab,
        f"{site_url}/book/{name}.html",
        SHOTS / f"{name.replace('/', '__')}.png",
    )

    assert report["typeset"] > 0, "no math was typeset by MathJax"
    assert report["rawMath"] == 0, (
        f"{report['rawMath']} math elements still show raw TeX"
    )
    assert "$$" not in report["text"], "raw $$ math in the page text"
    for myst in ("{glue", "{cite", "{eq}", ":::", "```{"):
        assert myst not in report["text"], f"raw MyST syntax {myst!r} on the page"
    assert report["images"] > 0, "the chapter shows no figure"
    assert not report["brokenImages"], (
        f"figures that did not load: {report['brokenImages']}"
    )
    assert not report["errors"], "JavaScript errors:\n" + "\n".join(report["errors"])
    assert not report["external"], (
        f"the page fetched from outside the site: {report['external']}"
    )

    assert not report["fit"], "too wide for the page:\n" + "\n".join(report["fit"])

    assert report["colab"], "no Colab link on the page"
    _, _, after = report["colab"][0].partition("/blob/")
    branch, _, path = after.partition("/")
    assert branch == chapters.repository()[1]
    notebook = chapters.ROOT / path
    assert notebook == chapter.with_suffix(".ipynb"), f"Colab link points at {path}"
    assert notebook.is_file(), f"Colab link points at a missing notebook {path}"
    assert json.loads(notebook.read_text())["cells"], "the Colab notebook is empty"
    done()


INTRODUCTIONS = [p for p in chapters.pages() if p not in chapters.chapters()]


@pytest.mark.pages
@pytest.mark.parametrize("page", INTRODUCTIONS, ids=chapters.module_path)
def test_introduction_pages_in_browser(passed, tab, site_url, page):
    name = chapters.module_path(page)
    done = passed(name)
    shot = SHOTS / f"{name.replace('/', '__')}.png"
    report = _page_report(tab, f"{site_url}/book/{name}.html", shot)
    assert not report["errors"], "JavaScript errors:\n" + "\n".join(report["errors"])
    assert not report["fit"], "too wide for the page:\n" + "\n".join(report["fit"])
    done()


def test_the_sidebar_lists_every_chapter_once(browser, site_url):
    """Each part's chapters are visible in the sidebar, and no part's name repeats."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{site_url}/book/intro.html", wait_until="load")
    links = page.evaluate(
        """() => [...document.querySelectorAll('.bd-sidebar-primary nav a')]
            .filter(a => a.offsetParent !== null).map(a => a.getAttribute('href'))"""
    )
    captions = page.evaluate(
        """() => [...document.querySelectorAll('.bd-sidebar-primary p.caption')]
            .map(c => c.innerText.trim())"""
    )
    texts = page.evaluate(
        """() => [...document.querySelectorAll('.bd-sidebar-primary nav a')]
            .filter(a => a.offsetParent !== null).map(a => a.innerText.trim())"""
    )
    page.close()
    for chapter in chapters.pages()[1:]:
        target = f"{chapters.module_path(chapter).split('/')[-1]}.html"
        assert any(link.endswith(target) for link in links), (
            f"{chapters.module_path(chapter)} is not visible in the sidebar"
        )
    assert captions and not set(captions) & set(texts), (
        f"part names repeated as links: {set(captions) & set(texts)}"
    )


@pytest.mark.pages
def test_home_page_in_browser(tab, site_url):
    tab.goto(f"{site_url}/index.html")
    tab.wait_for_url("**/book/intro.html", timeout=20000)  # the root redirects there
    report = _page_report(tab, f"{site_url}/book/intro.html", SHOTS / "index.png")
    assert "Deep Learning ABC" in report["text"]
    assert not report["errors"], "JavaScript errors:\n" + "\n".join(report["errors"])
    assert not report["external"], (
        f"the page fetched from outside the site: {report['external']}"
    )


@pytest.mark.parametrize("chapter", chapters.chapters(), ids=chapters.module_path)
def test_the_download_button_gives_the_colab_notebook(chapter):
    """The page's .ipynb download is the clean notebook, not a raw MyST conversion."""
    relative = chapter.relative_to(chapters.ROOT).with_suffix(".ipynb")
    offered = SITE / "_sources" / relative
    if not offered.is_file():
        _missing(f"no {offered}; run `make book` first")
    assert offered.read_bytes() == chapter.with_suffix(".ipynb").read_bytes()


def test_every_link_of_the_site_leads_somewhere():
    """Offline link check of the built site: every internal link and anchor, every
    image, script and stylesheet the pages load, exists."""
    from html.parser import HTMLParser
    from urllib.parse import unquote, urldefrag, urljoin, urlsplit

    if not (SITE / "index.html").is_file():
        _missing(f"no built site at {SITE}; run `make book` first")

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids, self.links = set(), []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            for key in ("id", "name"):
                if attrs.get(key):
                    self.ids.add(attrs[key])
            for key in ("href", "src"):
                if attrs.get(key) and not (tag == "a" and key == "src"):
                    self.links.append(attrs[key])

    pages = {}
    for path in SITE.rglob("*.html"):
        if "_static" in path.parts:  # the theme's Jinja templates, not pages
            continue
        parser = Page()
        parser.feed(path.read_text(errors="replace"))
        pages[path.resolve()] = parser
    broken = []
    for path, parser in pages.items():
        base = path.relative_to(SITE.resolve()).as_posix()
        for link in parser.links:
            if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("//"):
                continue  # http(s), mailto, data, javascript: not part of the site
            target, anchor = urldefrag(urljoin(base, link))
            target = urlsplit(target).path
            file = (SITE / unquote(target)).resolve() if target else path
            if file.is_dir():
                file = file / "index.html"
            if not file.exists():
                broken.append(f"{base}: {link} (no such file)")
            elif anchor and file.suffix == ".html":
                ids = pages[file].ids if file in pages else set()
                if unquote(anchor) not in ids:
                    broken.append(f"{base}: {link} (no anchor #{anchor})")
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:40])


def test_search_gives_clean_snippets_and_one_search_field(browser, site_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{site_url}/search.html?q=softmax", wait_until="load")
    page.wait_for_function(
        "() => document.querySelectorAll('#search-results li p.context').length > 2",
        timeout=30000,
    )
    snippets = page.evaluate(
        "() => [...document.querySelectorAll('#search-results li p.context')]"
        ".map(p => p.innerText)"
    )
    fields = page.evaluate(
        "() => [...document.querySelectorAll('.search-button-field')]"
        ".filter(e => e.offsetParent !== null).length"
    )
    page.close()
    for snippet in snippets:
        for noise in (".pdf", ".ipynb", ".md"):
            assert noise not in snippet, f"{noise!r} in a search snippet: {snippet}"
    assert fields == 1, f"{fields} search fields on the page"
