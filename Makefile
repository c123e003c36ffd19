# Quick start: `make demo` then `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test down clean

$(STAMP): setup.cfg pyproject.toml setup.py native_loader/*.cpp native_loader/*.h
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch first: a bare `torch` requirement would pull CUDA packages
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
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

down:
	$(BIN)/sllm down

clean:
	-$(BIN)/sllm down
	rm -rf $(VENV) build *.egg-info
