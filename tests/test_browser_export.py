"""In headless Chromium: the Chat tab follows a run that finishes while it is open, Export to GGUF from the Runs tab
(progress, downloads, the ollama command), then a streamed chat through the llama.cpp backend."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.fault_helpers import VIEWPORT, open_app, shots_dir, start_app, start_training, use_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def page_and_app(browser, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("app-export")
    proc, url = start_app(tmp, tiny_model_dir)
    page = browser.new_page(viewport=VIEWPORT)
    yield page, url, tmp, proc
    proc.terminate()
    proc.wait(20)


def chat_run_value(page) -> str:
    return page.evaluate("document.querySelector('#chat-run input').value")


def test_chat_follows_run_then_export_gguf_and_chat_through_llama_cpp(page_and_app):
    page, url, tmp, app_proc = page_and_app
    open_app(page, url)
    use_tiny_model(page, tmp / "models")
    page.get_by_role("tab", name="Train").click()
    start_training(page, 40)

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
    tokens.fill("256")  # long enough to stream in several updates; 1,024 cost a minute across the three replies
    tokens.press("Tab")
    # Every length the reply shows on the page, seen by the page itself: a tiny model's 256 tokens come in well under
    # a second, faster than polling from here could sample them.
    page.evaluate("""() => { window.qsLengths = new Set();
        new MutationObserver(() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');
            if (b.length) window.qsLengths.add(b[b.length - 1].innerText.length); })
          .observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true}); }""")
    page.get_by_role("textbox", name="Message").fill("Tell me a joke")
    page.get_by_role("button", name="Send").click()
    try:
        page.wait_for_function("[...window.qsLengths].filter(n => n > 0).length >= 2", timeout=60_000)
    except Exception:
        raise AssertionError(f"reply was not streamed: {page.evaluate('[...window.qsLengths]')}") from None

    # A crash of the llama.cpp child, as an illegal instruction on an unsuited CPU would make it: the reply in
    # progress says so and is answered by transformers; the app stays up; the next llama.cpp reply comes from a
    # new child process.
    def worker_pids() -> list[int]:
        return [c.pid for c in psutil.Process(app_proc.pid).children(recursive=True)
                if "qlora_ui.native.worker" in " ".join(c.cmdline())]

    def bubbles() -> tuple[int, str]:
        """(how many replies, the last one's text), read at once: the chat re-renders while it streams."""
        return tuple(page.evaluate("(() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');"
                                   " return [b.length, b.length ? b[b.length - 1].innerText : '']; })()"))

    def settled(timeout: float = 120) -> tuple[int, str]:
        last, since, end = None, time.time(), time.time() + timeout
        while time.time() - since < 2 and time.time() < end:
            now = bubbles()
            if now != last:
                last, since = now, time.time()
            time.sleep(0.2)
        return last

    settled()
    crashed = worker_pids()
    assert len(crashed) == 1, crashed  # llama.cpp runs in one child of the app, not in the app
    before = bubbles()[0]
    # The tiny model's reply takes about a second: freeze the child first so the request is surely in flight when
    # the illegal instruction ends it (the signal waits until the child runs again).
    os.kill(crashed[0], signal.SIGSTOP)
    page.get_by_role("textbox", name="Message").fill("Count from 1 to 500, one number per line.")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function(f"document.querySelectorAll('#chatbot [data-testid=bot]').length > {before}",
                           timeout=30_000)
    time.sleep(0.5)
    os.kill(crashed[0], signal.SIGILL)
    os.kill(crashed[0], signal.SIGCONT)
    page.wait_for_selector("[data-testid=toast-body]:has-text('the llama.cpp backend stopped (signal 4, "
                           "illegal instruction); answering with transformers instead')", timeout=60_000)
    settled()
    assert app_proc.poll() is None  # the app lives on
    page.evaluate("document.querySelectorAll('.toast-close').forEach(b => b.click())")
    n = bubbles()[0]
    page.get_by_role("textbox", name="Message").fill("Say hi")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function(f"document.querySelectorAll('#chatbot [data-testid=bot]').length > {n}",
                           timeout=60_000)
    settled()
    again = worker_pids()  # answered by a new llama.cpp child (the tiny model's words may be blank)
    assert len(again) == 1 and again != crashed
