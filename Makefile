# `make demo` and `make test` work on a fresh clone: each creates .venv on first use.
# torch goes in first, pinned to the CPU build this project is developed on; a GPU user can
# create .venv with their own CUDA torch first and the pin below is then skipped.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=          # e.g. https://download.pytorch.org/whl/cpu where pip's default torch is the CUDA build
TORCH_PIP := $(if $(strip $(TORCH_INDEX)),--index-url $(strip $(TORCH_INDEX)))

.PHONY: demo test info clean

# what the demo needs (the core, plus the server it tells you to start) and what the tests need (the
# peers they compare with, llama.cpp's bindings, which compile once) are installed apart, so that
# `make demo` on a fresh clone starts in a minute or two.
$(VENV)/.demo-deps: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_PIP) "$(TORCH)"
	$(BIN)/pip install -e ".[serve]"
	touch $@

$(VENV)/.test-deps: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_PIP) "$(TORCH)"
	$(BIN)/pip install -e ".[test]"
	touch $@

# the main job: R1-Zero in miniature (pretrain, evaluate, GRPO, evaluate) into runs/demo, ~4 min on a CPU
demo: $(VENV)/.demo-deps
	$(BIN)/nanoseek demo

info: $(VENV)/.demo-deps
	for p in tiny small deepseek-v2-lite deepseek-v3; do $(BIN)/nanoseek info --preset $$p; done

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV)
