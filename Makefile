# Two set-up commands on a fresh machine: `make demo` and `make test`.
# torch is pinned to 2.13.0 *first*: on this kind of machine that is the CPU build on disk; a loose spec
# would pull a multi-GB CUDA build. Everything else comes from pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# the extras the real-part tests run for real: lm-evaluation-harness (+ accelerate, which its HF backend imports),
# Ray, fastText (domainlm mine)
TEST_EXTRAS := dev,harness,ray,mine

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/domainlm run

# The real parts (headless Chromium, lm-evaluation-harness, …) are installed, then run: with
# DOMAINLM_NO_SKIPS=1 a skipped test fails the suite, except one marked `gpu` on a machine without CUDA.
$(TEST_STAMP): $(STAMP) scripts/system-packages.sh
	scripts/system-packages.sh
	$(BIN)/pip install -q -e ".[$(TEST_EXTRAS)]"
	touch $(TEST_STAMP)

# Two workers, one test file each at a time (module fixtures are built once); the slowest tests are listed.
test: $(TEST_STAMP)
	DOMAINLM_NO_SKIPS=1 $(BIN)/python -m pytest -rs -n 2 --dist loadfile --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
