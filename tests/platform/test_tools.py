"""The book's tools: MyST -> Jupyter conversion, chapter dependencies, and the code-aware execution cache."""

from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from pybtex.database import parse_string

import book_ext
import chapters
import notebooks

BIB = parse_string(
    """
@article{solo2020, title={One}, author={Solo, Ann}, year={2020}}
@article{duo2021, title={Two}, author={Duo, Bea and Pair, Cy}, year={2021}}
@article{many2019, title={Many}, author={Alpha, A. and Beta, B. and Gamma, G.}, year={2019}, url={https://x.org/1}}
""",
    "bibtex",
).entries


def convert(text: str, chapter: Path | None = None) -> str:
    chapter = (
        chapter or chapters.ROOT / "book" / "transformers" / "attention_from_scratch.md"
    )
    c = notebooks.Converter(chapter, BIB)
    c.collect_labels([text])
    return c.markdown(text)


def test_equations_are_numbered_and_referenced():
    out = convert(
        "$$\na = b\n$$ (eq-a)\n\ntext\n\n$$\nc\n$$ (eq-c)\n\nsee {eq}`eq-c` and {eq}`eq-a`."
    )
    assert (
        out
        == "$$\na = b\n\\tag{1}\n$$\n\ntext\n\n$$\nc\n\\tag{2}\n$$\n\nsee (2) and (1)."
    )


def test_citations_and_bibliography():
    out = convert(
        "A {cite:p}`solo2020,duo2021` and {cite:t}`many2019`.\n\n```{bibliography}\n:filter: docname in docnames\n```"
    )
    assert "A (Solo, 2020; Duo and Pair, 2021) and Alpha et al. (2019)." in out
    assert "- Ann Solo (2020). *One*." in out and "https://x.org/1" in out
    assert ":filter:" not in out


def test_glue_exercises_admonitions_and_links():
    text = (
        "value {glue:text}`acc:.2f`%\n\n"
        ":::{exercise} Try it\n:label: ex-1\n:nonumber:\n\nDo $x$.\n:::\n\n"
        ":::{solution} ex-1\n:class: dropdown\n\nDone.\n:::\n\n"
        "```{note}\nCareful.\n```\n\n"
        "[next](attention_with_pytorch.md) and [web](https://pytorch.org)"
    )
    out = convert(text)
    assert "value `acc`%" in out
    assert "**Exercise (Try it).** Do $x$." in out
    assert (
        "<details>\n<summary><b>Solution (Try it)</b></summary>\n\nDone.\n\n</details>"
        in out
    )
    assert "> **Note.** Careful." in out
    assert (
        "](https://colab.research.google.com/github/" in out
        and "attention_with_pytorch.ipynb)" in out
    )
    assert "[web](https://pytorch.org)" in out


@pytest.mark.parametrize(
    "text, match",
    [
        ("{doc}`intro`", "does not handle"),
        ("```{figure} x.png\n```", "figure x.png does not exist"),
        ("```{margin}\nx\n```", "does not know the directive"),
        ("{cite:p}`nobody1999`", "not in book/references.bib"),
        ("{eq}`eq-nowhere`", "unknown equation"),
        (":::{exercise}\n:label: e\n\nNo title.\n:::", "needs a title"),
        (":::{solution} ex-unknown\nx\n:::", "unknown exercise"),
    ],
)
def test_unknown_myst_is_an_error_not_raw_text(text, match):
    with pytest.raises(ValueError, match=match):
        convert(text)


def test_dependencies_follow_imports_through_the_package():
    chapter = chapters.ROOT / "book" / "transformers" / "attention_with_pytorch.md"
    names = {
        p.relative_to(chapters.PACKAGE).as_posix()
        for p in chapters.dependencies(chapter)
    }
    assert (
        {
            "__init__.py",
            "book.py",
            "plot.py",
            "checks.py",
            "transformers/__init__.py",
            "transformers/attention_with_pytorch.py",
            "transformers/attention_from_scratch.py",  # imported by the module, and by the chapter
        }
        <= names
    )


def test_cache_drops_a_chapter_exactly_when_its_code_changes(tmp_path, monkeypatch):
    from jupyter_cache import get_cache

    chapter = chapters.ROOT / "book" / "transformers" / "attention_from_scratch.md"
    cache_dir = tmp_path / ".jupyter_cache"
    cache = get_cache(cache_dir)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }

    def cache_it():
        from jupyter_cache.base import CacheBundleIn

        cache.cache_notebook_bundle(
            CacheBundleIn(nb, str(chapter)), check_validity=False, overwrite=True
        )

    noted = []
    app = SimpleNamespace(
        config=SimpleNamespace(nb_execution_cache_path=str(cache_dir)),
        outdir=str(tmp_path / "html"),
        env=SimpleNamespace(
            doc2path=lambda docname: str(chapter), note_dependency=noted.append
        ),
    )
    fingerprint = ["v1"]
    monkeypatch.setattr(chapters, "code_hash", lambda path: fingerprint[0])

    cache_it()
    book_ext._drop_stale_execution(
        app, "book/transformers/attention_from_scratch", chapter
    )
    assert len(cache.list_cache_records()) == 0, (
        "first build with this fingerprint: the old execution goes"
    )
    book_ext._note_code_dependencies(
        app, "book/transformers/attention_from_scratch", [""]
    )
    assert str(chapters.PACKAGE / "transformers" / "attention_from_scratch.py") in noted

    cache_it()
    book_ext._drop_stale_execution(
        app, "book/transformers/attention_from_scratch", chapter
    )
    assert len(cache.list_cache_records()) == 1, "same code: the cached execution stays"

    fingerprint[0] = "v2"
    book_ext._drop_stale_execution(
        app, "book/transformers/attention_from_scratch", chapter
    )
    assert len(cache.list_cache_records()) == 0, (
        "the code changed: the chapter must run again"
    )


def test_code_hash_changes_with_the_code(tmp_path, monkeypatch):
    module = tmp_path / "module.py"
    module.write_text("x = 1\n")
    monkeypatch.setattr(chapters, "dependencies", lambda path: [module])
    before = chapters.code_hash(Path("any.md"))
    assert chapters.code_hash(Path("any.md")) == before
    module.write_text("x = 2\n")
    assert chapters.code_hash(Path("any.md")) != before


def test_claims_judge_fail_thin_ok_and_exact():
    import claims

    assert claims.judge([0.9, 0.8], [0.3, 0.2], ">", 0.6) == "ok"
    assert claims.judge([0.7, 0.5], [0.1, -0.1], ">", 0.6) == "FAIL"
    # the worst margin (0.05) is smaller than its distance from the median run's (0.1)
    assert claims.judge([0.75, 0.65, 0.75], [0.15, 0.05, 0.15], ">", 0.6) == "THIN"
    # one run far on the safe side does not make a claim thin
    assert claims.judge([0.3, 0.3, 0.9], [0.2, 0.2, 0.8], ">", 0.1) == "ok"
    # under 5 % of the bound's size: thin even with no spread
    assert claims.judge([10.2, 10.2], [0.2, 0.2], ">", 10.0) == "THIN"
    # positive values far above a positive bound: judged as ratios, so a factor of two
    # between runs does not make a thousand-fold margin thin
    assert claims.judge([8.5, 8.5, 4.0], [8.5, 8.5, 4.0], ">", 0.001) == "ok"
    # and tiny errors far below their bound are not thin because they vary by factors
    assert claims.judge([1e-8, 1e-8, 1.4e-7], [1e-6, 1e-6, 8.6e-7], "<", 1e-6) == "ok"
    # signed values are judged as differences
    assert claims.judge([-0.2, -0.3, 0.1], [0.3, 0.4, 0.0001], "<", 0.1) == "THIN"
    assert claims.judge([3, 3], [0.0, 0.0], "==", 3) == "exact"
    assert claims.judge([2, 3], [None, 0.0], "==", 3) == "FAIL"


def test_claims_report_matches_claims_across_configurations():
    import claims

    def record(v):
        return {"statement": "s", "value": v, "op": "<", "bound": 1.0,
                "margin": 1.0 - v, "holds": v < 1.0}  # fmt: skip

    results = {
        "part/ch": {
            "native": ([record(0.2), record(0.3)], None, 1.0),
            "avx2": ([record(0.25), record(1.5)], None, 1.0),
        }
    }
    rows, bad = claims.report(results, ["native", "avx2"])
    assert [r["verdict"] for r in rows] == ["ok", "FAIL"]
    assert rows[0]["values"] == {"native": 0.2, "avx2": 0.25} and bad == 1


def test_rotating_sample_covers_every_chapter_in_a_few_days():
    seen, every = set(), chapters.chapters()
    for day in range(len(every) // 4 + 1):
        sample = chapters.rotating_sample(4, day, every)
        assert len(sample) == 4
        seen.update(sample)
    assert seen == set(every)
