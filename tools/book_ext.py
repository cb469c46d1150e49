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
"""

from __future__ import annotations

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


def _drop_stale_execution(app: Sphinx, docname: str, source: list[str]) -> None:
    path = Path(app.env.doc2path(docname)).resolve()
    if path.suffix != ".md" or not path.is_relative_to(chapters.ROOT / "book"):
        return
    for file in chapters.dependencies(path):
        app.env.note_dependency(str(file))
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


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _use_local_mathjax)
    app.connect("source-read", _drop_stale_execution)
    app.connect("env-before-read-docs", _drop_thebe, priority=900)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
