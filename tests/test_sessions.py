"""Two browser sessions on one app (two Chromium contexts = two users): A starts training; B sees it running,
cannot start a second job nor delete the run in use; both chat at once and each keeps its own conversation."""

from __future__ import annotations

import ast

import pytest

from tests.fault_helpers import (
    ROOT,
    VIEWPORT,
    open_app,
    plot_points,
    run_dirs,
    start_app,
    start_training,
    use_tiny_model,
    wait_for,
)

IMMUTABLE_FACTORIES = {"getLogger", "compile", "frozenset", "tuple", "Path", "TypeVar", "namedtuple", "NamedTuple",
                       "str", "int", "float", "bool", "MappingProxyType"}


def test_no_mutable_module_globals_in_the_app():
    """Per-user state lives in gr.State and app-wide state in the Studio object, never in module globals:
    Gradio serves every browser session from one process. Module level holds only UPPER_CASE constants."""
    found = []
    for f in sorted((ROOT / "qlora_ui").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Global):
                found.append(f"{f.name}: global {', '.join(node.names)}")
        for node in ast.parse(f.read_text()).body:
            value = getattr(node, "value", None)
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            # Any call counts as possibly mutable (WeakValueDictionary(), a cache object, a Lock...) unless it is
            # known to build an immutable value: an allow-list, not a list of the mutable types we thought of.
            called = getattr(value.func, "id", getattr(value.func, "attr", "")) if isinstance(value, ast.Call) else ""
            mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and called not in IMMUTABLE_FACTORIES)
            found += [f"{f.name}: {t.id}" for t in targets
                      if mutable and isinstance(t, ast.Name) and not t.id.isupper()]
    assert not found, found


@pytest.fixture(scope="module")
def two_users(browser, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("sessions")
    proc, url = start_app(tmp, tiny_model_dir)
    a = browser.new_context(viewport=VIEWPORT).new_page()
    b = browser.new_context(viewport=VIEWPORT).new_page()
    yield url, tmp, a, b
    proc.terminate()
    proc.wait(30)


def dismiss_toasts(page) -> None:
    """Error toasts stay until closed (duration=None) and cover buttons: close them once read."""
    page.evaluate("document.querySelectorAll('.toast-close').forEach(b => b.click())")
    page.wait_for_function("document.querySelectorAll('.toast-close').length === 0", timeout=10_000)


def chat(page, run_name: str, text: str) -> None:
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="↻ Refresh runs").click()
    page.get_by_label("Run", exact=True).first.click()
    page.get_by_role("option", name=run_name).click()
    page.wait_for_function("document.querySelector('#chat-run input').value.length > 0")
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("button", name="Send").click()


@pytest.mark.slow
def test_two_sessions_share_one_job_and_keep_their_own_chats(two_users):
    url, tmp, a, b = two_users
    for page in (a, b):
        open_app(page, url)

    # A starts a long run on the tiny model.
    use_tiny_model(a, tmp / "models")
    a.get_by_role("tab", name="Train").click()
    start_training(a, 1000)
    run = wait_for(lambda: run_dirs(tmp / "runs"), 30, "the run folder")[0]

    # B, another browser, sees the same job running without doing anything.
    b.get_by_role("tab", name="Train").click()
    b.wait_for_selector(f"#train-progress [data-state=running]:has-text('{run.name}')", timeout=30_000)
    # ...and A's loss curve, drawn from the run folder.
    wait_for(lambda: plot_points(b) >= 2, 60, "B to see A's loss curve")
    # B cannot start a second job...
    b.get_by_role("button", name="Start training").click()
    b.wait_for_selector("text=already in progress", timeout=30_000)
    dismiss_toasts(b)
    # ...nor delete the run in use.
    b.get_by_role("tab", name="Runs").click()
    b.get_by_role("button", name="↻ Refresh").click()
    b.wait_for_function(f"document.querySelector('#runs-table').innerText.includes('{run.name}')", timeout=30_000)
    b.get_by_label("Run", exact=True).last.click()
    b.get_by_role("option", name=run.name).click()
    b.get_by_role("button", name="Delete run").click()
    b.wait_for_selector("text=training right now", timeout=30_000)
    dismiss_toasts(b)
    assert run.is_dir() and len(run_dirs(tmp / "runs")) == 1

    # Both chat with the run's newest checkpoint while it trains; each conversation stays in its own session.
    wait_for(lambda: any((c / "adapter_config.json").is_file() for c in (run / "checkpoints").glob("checkpoint-*")),
             120, "a checkpoint to chat with")
    chat(a, run.name, "Ahoy from session A")
    chat(b, run.name, "Ahoy from session B")
    for page in (a, b):
        page.wait_for_selector("#chatbot [data-testid=bot]", timeout=120_000)
        wait_for(lambda page=page: page.locator("#chatbot [data-testid=bot]").last.inner_text().strip(), 120,
                 "a reply")
    text_a, text_b = a.locator("#chatbot").inner_text(), b.locator("#chatbot").inner_text()
    assert "session A" in text_a and "session B" not in text_a
    assert "session B" in text_b and "session A" not in text_b
    assert b.locator("#chatbot [data-testid=user]").count() == 1

    # A stops the run; B's view follows.
    a.get_by_role("tab", name="Train").click()
    a.get_by_role("button", name="Stop").click()
    b.get_by_role("tab", name="Train").click()
    for page in (a, b):
        page.wait_for_selector("#train-progress [data-state=stopped]", timeout=90_000)
    wait_for(lambda: (run / "adapter" / "adapter_config.json").is_file(), 10, "the adapter saved on Stop")
