# Quick start: `make demo` then `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LOCK   := requirements/lock.txt
LOCKED := $(VENV)/.locked
STAMP  := $(VENV)/.installed

# `make lock` and `make test-latest` run in venvs of their own, never in .venv
PIP_TOOLS     := pip-tools==7.6.2
LOCK_VENV     := .venv-lock
LATEST_VENV   := .venv-latest
# torch's newest release on PyPI is a CUDA build of several GB: test-latest keeps the CPU build
# of the lock unless told otherwise (make test-latest LATEST_TORCH='torch')
LATEST_TORCH  ?= torch==2.13.0

.PHONY: install demo test test-latest lock down clean

# every dependency at the version (and hash) of the lock, in a venv made anew when it changes
$(LOCKED): $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	touch $(LOCKED)

# sllm itself, editable, built (the native engine) with the lock's setuptools and pybind11
$(STAMP): $(LOCKED) setup.cfg pyproject.toml setup.py native_loader/*.cpp native_loader/*.h
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sllm up --detach
	$(BIN)/sllm model list | grep -q '^smollm2-135m-instruct ' || $(BIN)/sllm model import smollm2
	$(BIN)/sllm fn get smollm2-chat >/dev/null 2>&1 \
		&& $(BIN)/sllm fn update -f functions/smollm2-chat.yaml \
		|| $(BIN)/sllm fn create -f functions/smollm2-chat.yaml
	$(BIN)/sllm fn invoke smollm2-chat --prompt "What is the capital of France?"
	@echo
	@echo "Go on:   $(BIN)/sllm fn invoke smollm2-chat --prompt 'Tell me about Paris'"
	@echo "         curl -N http://127.0.0.1:8080/v1/functions/smollm2-chat/invoke -d '{\"prompt\": \"Hi!\", \"stream\": true}'"
	@echo "         $(BIN)/sllm status"
	@echo "Stop:    $(BIN)/sllm down"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Refresh the lock: the newest releases that setup.cfg's ranges and requirements/constraints.in
# allow, every transitive dependency and build requirement pinned with its hashes.
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) \
		&& $(LOCK_VENV)/bin/pip install --quiet $(PIP_TOOLS); }
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --generate-hashes --extra test \
		--all-build-deps --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		-c requirements/constraints.in -o $(LOCK) setup.cfg

# The suite against the newest release of every dependency (not CI's: it shows a coming
# break before a user meets it). The lock's own test is left out: these are not its versions.
# (The editable install rebuilds the native engine in place, for the same Python as .venv's.)
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	echo '$(LATEST_TORCH)' > $(LATEST_VENV)/torch.txt
	$(LATEST_VENV)/bin/pip install --quiet -c $(LATEST_VENV)/torch.txt torch
	$(LATEST_VENV)/bin/pip install --quiet --upgrade --upgrade-strategy eager \
		-c $(LATEST_VENV)/torch.txt -e '.[test]'
	$(LATEST_VENV)/bin/python -m tests.helpers.lock $(LOCK)
	$(LATEST_VENV)/bin/python -m pytest -q --deselect tests/unit/test_lockfile.py

down:
	$(BIN)/sllm down

clean:
	-$(BIN)/sllm down
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) build *.egg-info
