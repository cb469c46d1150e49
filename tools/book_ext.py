"""The book's own Sphinx extension (loaded through ``_config.yml``'s ``local_extensions``).

1. An execution cache that knows the code. Jupyter Book's cache hashes only a chapter's
   code cells, so editing ``code/dlabc`` would leave stale outputs on the pages. Here every
   chapter declares the package files it imports as Sphinx dependencies (so Sphinx re-reads
   the chapter when one of them changes), and when their content changed since the last
   build, the chapter's cached execution is dropped, so myst-nb runs it again.
2. An offline site. MathJax is served from the build itself, not from a CDN: ``make book``
   installs the npm package ``mathjax@3`` under ``.venv/mathjax``, copied to
   ``_static/mathjax``. Thebe (live code cells, which Jupyter Book always loads and which would
   fetch its code from a CDN) is taken off the pages: chapters run in Colab or locally instead.
   Its configuration script was also added twice per page, a JavaScript error.
3. The theme's colour mode starts at "auto" (follows the reader's system), which also stops the
   theme from logging an error about an empty mode on a reader's first visit.
4. Chapters execute in parallel. myst-nb runs the chapters one after another while it reads
   them. Before Sphinx reads anything, this extension finds the chapters that have no cached
   execution, runs them ``$DLABC_JOBS`` at a time (default: one per CPU core; each chapter
   computes on one thread) exactly as myst-nb would (same notebook reader, same executor),
   and puts them in myst-nb's cache, where myst-nb then finds them. A chapter that fails
   here is left to myst-nb, which runs it again and reports its error the usual way.
5. The page's download button offers the same clean notebook as the Colab button (the
   committed ``book/PART/NAME.ipynb``: no MyST syntax, no duplicated outputs), not the
   theme's own conversion of the Markdown source.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ConfigError
from sphinx.util import logging

import chapters

logger = logging.getLogger(__name__)

MATHJAX_STATIC = Path(
    os.environ.get(
        "DLABC_MATHJAX_STATIC", chapters.ROOT / ".venv" / "mathjax" / "static"
    )
)


def _use_local_mathjax(app: Sphinx, config: Config) -> None:
    if not (MATHJAX_STATIC / "mathjax" / "tex-chtml.js").is_file():
        raise ConfigError(
            f"MathJax is missing from {MATHJAX_STATIC}/mathjax: `make book` installs it "
            "(npm install mathjax@3); set DLABC_MATHJAX_STATIC to use another copy."
        )
    config.html_static_path = [*config.html_static_path, str(MATHJAX_STATIC)]
    config.mathjax_path = "mathjax/tex-chtml.js"
    config.html_context = {**config.html_context, "default_mode": "auto"}


def _drop_thebe(app: Sphinx, env, docnames) -> None:
    """Remove sphinx-thebe's scripts (connected after sphinx-thebe's own handler adds them)."""

    def is_thebe(filename, attributes) -> bool:
        return "thebe" in str(filename or "") or "THEBE_JS_URL" in str(
            attributes.get("body")
        )

    # the registry holds (filename, attributes) pairs, the builder _JavaScript objects
    registry = app.registry.js_files
    registry[:] = [(f, a) for f, a in registry if not is_thebe(f, a)]
    scripts = getattr(app.builder, "script_files", [])
    scripts[:] = [js for js in scripts if not is_thebe(js.filename, js.attributes)]


def _state_file(app: Sphinx) -> Path:
    return (
        Path(
            app.config.nb_execution_cache_path
            or Path(app.outdir).parent / ".jupyter_cache"
        )
        / "dlabc-code.json"
    )


def _chapter_path(app: Sphinx, docname: str) -> Path | None:
    path = Path(app.env.doc2path(docname)).resolve()
    if path.suffix != ".md" or not path.is_relative_to(chapters.ROOT / "book"):
        return None
    return path


def _note_code_dependencies(app: Sphinx, docname: str, source: list[str]) -> None:
    """Sphinx re-reads a chapter when a file of code/dlabc that it imports changes."""
    path = _chapter_path(app, docname)
    if path is not None:
        for file in chapters.dependencies(path):
            app.env.note_dependency(str(file))


def _drop_stale_execution(app: Sphinx, docname: str, path: Path) -> None:
    state_file = _state_file(app)
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    fingerprint = chapters.code_hash(path)
    if state.get(docname) == fingerprint:
        return
    if state_file.parent.is_dir():  # no cache folder yet: nothing cached to drop
        from jupyter_cache import get_cache

        cache = get_cache(state_file.parent)
        stale = [
            r.pk for r in cache.list_cache_records() if Path(r.uri).resolve() == path
        ]
        for pk in stale:
            cache.remove_cache(pk)
        if stale:
            logger.info(
                f"[dlabc] {docname}: the code it imports changed, it runs again"
            )
    state[docname] = fingerprint
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=1, sort_keys=True))


def _execute(item: tuple[str, Path, object], timeout: int | None):
    """Run one chapter's notebook the way myst-nb's cache mode does (in its folder)."""
    from jupyter_cache.executors.utils import single_nb_execution

    docname, path, nb = item
    result = single_nb_execution(
        nb,
        cwd=str(path.parent),
        allow_errors=False,
        timeout=timeout,
        meta_override=True,
    )
    return docname, path, nb, result


def _execute_in_parallel(app: Sphinx, env, docnames: list[str]) -> None:
    """Drop stale executions, then run the uncached chapters several at a time."""
    nb_config = env.mystnb_config
    chapter_docs = [(d, p) for d in docnames if (p := _chapter_path(app, d))]
    for docname, path in chapter_docs:
        _drop_stale_execution(app, docname, path)
    if nb_config.execution_mode != "cache":
        return
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from myst_nb.core.read import create_nb_reader

    cache = get_cache(nb_config.execution_cache_path or ".jupyter_cache")
    todo = []
    for docname, path in sorted(chapter_docs):
        text = path.read_text()
        reader = create_nb_reader(str(path), env.myst_config, nb_config, text)
        if reader is None:
            continue
        nb = reader.read(text)
        if not any(c.cell_type == "code" for c in nb.cells):
            continue
        try:
            cache.match_cache_notebook(nb)
        except KeyError:
            todo.append((docname, path, nb))
    jobs = int(os.environ.get("DLABC_JOBS") or os.cpu_count() or 1)
    if len(todo) < 2 or jobs < 2:
        return  # nothing to gain: myst-nb runs them as it reads them
    logger.info(f"[dlabc] executing {len(todo)} chapters, {jobs} at a time")
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [
            pool.submit(_execute, item, nb_config.execution_timeout) for item in todo
        ]
        for future in concurrent.futures.as_completed(futures):
            docname, path, nb, result = future.result()
            if result.err is not None:
                logger.info(f"[dlabc] {docname} failed; myst-nb runs it again")
                continue
            cache.cache_notebook_bundle(
                CacheBundleIn(nb, str(path), data={"execution_seconds": result.time}),
                check_validity=False,
                overwrite=True,
            )
            logger.info(f"[dlabc] {docname}: executed in {result.time:.1f} s")


def _download_the_colab_notebook(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    for docname in app.env.found_docs:
        path = _chapter_path(app, docname)
        notebook = path.with_suffix(".ipynb") if path else None
        target = Path(app.outdir) / "_sources" / f"{docname}.ipynb"
        if notebook and notebook.is_file() and target.is_file():
            target.write_bytes(notebook.read_bytes())


def setup(app: Sphinx) -> dict:
    app.connect("build-finished", _download_the_colab_notebook)
    app.connect("config-inited", _use_local_mathjax)
    app.connect("source-read", _note_code_dependencies)
    app.connect("env-before-read-docs", _execute_in_parallel, priority=950)
    app.connect("env-before-read-docs", _drop_thebe, priority=900)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
