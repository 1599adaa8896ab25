"""Shared fixtures: tiny random Llama models built from a config (seconds per test), offline; headless Chromium.
The helpers they use, and every test module uses, are in tests/fault_helpers.py."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Prepared datasets (qlora_ui/data/stages.py) go to a cache of this test session's own, not the user's.
if "QLORA_DATA_CACHE" not in os.environ:
    os.environ["QLORA_DATA_CACHE"] = tempfile.mkdtemp(prefix="qlora-test-data-cache-")
    atexit.register(shutil.rmtree, os.environ["QLORA_DATA_CACHE"], True)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The bundled SmolLM2 converted to bf16 safetensors (cached across runs)."""
    from qlora_ui.modeling import ensure_bundled_model

    return ensure_bundled_model()


@pytest.fixture(scope="session")
def tokenizer(bundled_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    from tests.fault_helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for one browser test module (tests.fault_helpers.chromium)."""
    from tests.fault_helpers import chromium

    with chromium() as b:
        yield b


def pytest_report_header(config):
    """Say whether this CPU can show the 4-bit repack trap (AVX512-BF16): the CPU-trap tests
    (test_eval_forward_leaves_4bit_lora_gradients_intact, test_eval_mid_training_keeps_*, the generate-trap
    tests) guard against it, but only exercise it where bitsandbytes uses the repacking kernel."""
    try:
        import logging

        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        from bitsandbytes.functional import has_avx512bf16

        ok = bool(has_avx512bf16())
    except Exception as e:  # noqa: BLE001 - a header must never break the run
        return f"CPU AVX512-BF16: unknown ({e})"
    if ok:
        return "CPU AVX512-BF16: yes — the 4-bit repack trap can occur here, so the CPU-trap tests exercise it"
    return ("CPU AVX512-BF16: NO — bitsandbytes never repacks here; the CPU-trap tests pass without exercising "
            "the trap they guard against")
