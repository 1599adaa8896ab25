"""In headless Chromium: the Chat tab follows a run that finishes while it is open, Export to GGUF from the Runs tab
(progress, downloads, the ollama command), then a streamed chat through the llama.cpp backend."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_browser import CHROMIUM, CHROMIUM_ARGS, shots_dir, start_app, use_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def page_and_app(tmp_path_factory, tiny_model_dir):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `apt-get install -y chromium` (make test does this as root).")
    tmp = tmp_path_factory.mktemp("app-export")
    proc, url = start_app(tmp, tiny_model_dir)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        yield page, url, tmp
        b.close()
    proc.terminate()
    proc.wait(20)


def chat_run_value(page) -> str:
    return page.evaluate("document.querySelector('#chat-run input').value")


def test_chat_follows_run_then_export_gguf_and_chat_through_llama_cpp(page_and_app):
    page, url, tmp = page_and_app
    page.goto(url)
    page.wait_for_selector("#data-summary:has-text('Format: messages')", timeout=90_000)
    use_tiny_model(page, tmp / "models")
    page.get_by_role("tab", name="Train").click()
    steps = page.get_by_label("Max steps")
    steps.fill("40")
    steps.press("Tab")
    page.get_by_role("button", name="Start training").click()
    page.wait_for_selector("#train-progress [data-state=running]", timeout=60_000)

    # Open the Chat tab while the run trains: no adapter yet, so the base model; when the run finishes, the tab
    # switches to it by itself (no Refresh pressed).
    page.get_by_role("tab", name="Chat").click()
    assert chat_run_value(page) == "Base model only"
    runs_dir = tmp / "runs"
    deadline = time.time() + 180
    while time.time() < deadline and not any((p / "adapter" / "adapter_config.json").is_file()
                                             for p in runs_dir.iterdir()):
        time.sleep(0.5)
    run = next(runs_dir.iterdir()).name
    page.wait_for_function(f"document.querySelector('#chat-run input').value === '{run}'", timeout=15_000)

    # Runs tab: export the run to GGUF Q8_0 in the background, watch it finish, get the files and the command.
    page.get_by_role("tab", name="Runs").click()
    page.get_by_role("button", name="↻ Refresh").click()
    page.get_by_label("Run", exact=True).last.click()
    page.get_by_role("option", name=run).click()
    page.locator("#export-btn").click()
    page.wait_for_selector("#export-progress [data-state=running]", timeout=30_000)
    page.wait_for_selector("#export-progress [data-state=finished]", timeout=240_000)
    files = page.locator("#export-files").inner_text().replace("\n", "")  # the name and extension wrap apart
    assert f"{run}-q8_0.gguf" in files and f"{run}-q8_0.Modelfile" in files
    page.wait_for_selector("#export-cmd:has-text('ollama create')", timeout=10_000)
    assert (runs_dir / run / "export" / f"{run}-q8_0.gguf").is_file()
    page.locator("#export-cmd").scroll_into_view_if_needed()
    page.screenshot(path=str(shots_dir(tmp) / "export.png"), full_page=True)

    # Chat through llama.cpp from the exported GGUF: the reply streams (grows over several updates).
    page.get_by_role("tab", name="Chat").click()
    page.get_by_label("llama.cpp (exported GGUF)").check()
    page.wait_for_function("document.querySelectorAll('input').length && [...document.querySelectorAll('input')]"
                           ".some(i => i.value.endsWith('.gguf'))", timeout=15_000)
    page.get_by_text("Generation settings").click()
    tokens = page.locator("#max-new-tokens input[type=number]")
    tokens.fill("1024")
    tokens.press("Tab")
    page.get_by_role("textbox", name="Message").fill("Tell me a joke")
    page.get_by_role("button", name="Send").click()
    bot = page.locator("#chatbot [data-testid=bot]")
    lengths = set()
    deadline = time.time() + 60
    while time.time() < deadline and len(lengths - {0}) < 2:
        if bot.count():
            lengths.add(len(bot.last.inner_text()))
        time.sleep(0.01)
    assert len(lengths - {0}) >= 2, f"reply was not streamed: {lengths}"
