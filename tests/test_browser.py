"""The app in headless Chromium: upload → train → live curve → reload → stop → chat (streamed) → compare → runs.

Starts `python app.py` on a free port with a tiny random Llama as the model, as a user would.
Screenshots go to $QLORA_SCREENSHOTS (docs/screenshots when refreshing the README's pictures) or tmp.
"""

from __future__ import annotations

import json
import time

import pytest

from qlora_ui.runs import RunDir
from tests.fault_helpers import (
    DATA,
    VIEWPORT,
    open_app,
    plot_points,
    shots_dir,
    start_app,
    start_training,
    use_tiny_model,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("app")
    proc, url = start_app(tmp, tiny_model_dir)
    yield url, tmp
    proc.terminate()
    proc.wait(20)


def train_tab_on_tiny_model(browser, app):
    """A fresh page on the app, the tiny model chosen, the Train tab open."""
    url, tmp = app
    page = open_app(browser.new_page(viewport=VIEWPORT), url)
    use_tiny_model(page, tmp / "models")
    page.get_by_role("tab", name="Train").click()
    return page, tmp


def test_upload_train_reload_stop_chat_compare(browser, app):
    url, tmp = app
    shots = shots_dir(tmp)
    # The form opens on the quick-start preset with its bundled dataset already understood.
    page = open_app(browser.new_page(viewport=VIEWPORT), url)

    # Model & Data: upload our own file and see it understood.
    use_tiny_model(page, tmp / "models")
    page.locator("#dataset-file button[aria-label='Clear']").click()
    page.set_input_files("#dataset-file input[type=file]", str(DATA / "alpaca.json"))
    page.wait_for_selector("#data-summary:has-text('Format: alpaca')", timeout=60_000)
    page.wait_for_selector("#data-example .qs-trained", timeout=30_000)
    assert page.locator("#data-example .qs-masked").count() > 0  # prompt tokens shown as masked
    assert page.locator("#length-hist .main-svg").count() > 0  # the token-length histogram rendered
    page.screenshot(path=str(shots / "model-data.png"), full_page=True)

    # Train: a short run; the loss chart gains points while it runs.
    page.get_by_role("tab", name="Train").click()
    start_training(page, 3000)  # long enough to still be running at the second Start and the reload (Stop ends it)
    # Meanwhile, what a watching page costs the run (bench/app_overhead.py): the progress line moves through the
    # small JSON route every 3 s, and once a chart is drawn its traces grow from the same route's points
    # (plots.curve_points) without a Gradio event (each costs the page 0.1-0.2 s of CPU). The old 3 s gr.Timer sent
    # one per tick; the refresh button every 12 s after it.
    seen = {"progress": 0, "events": 0}

    def count(request):
        if "qs/train-progress" in request.url:
            seen["progress"] += 1
        elif "/queue/join" in request.url:
            seen["events"] += 1

    steps = set()
    deadline = time.time() + 120
    while plot_points(page) < 3 and time.time() < deadline:
        time.sleep(0.5)
    first = plot_points(page)
    assert first >= 3
    page.on("request", count)
    watched_from = time.time()
    deadline = time.time() + 60
    while (plot_points(page) <= first or time.time() - watched_from < 15) and time.time() < deadline:
        steps.add(page.locator("#train-progress .qs-progress").get_attribute("data-step"))
        time.sleep(0.5)
    assert plot_points(page) > first, "the live chart stopped gaining points"
    page.remove_listener("request", count)
    watched = time.time() - watched_from
    assert seen["progress"] >= watched / 3 - 2 and len(steps) >= 3, (seen, steps, watched)
    assert seen["events"] == 0, (seen, watched)
    # The extended chart is the run's own: its newest train-loss point is the newest logged loss.
    drawn = page.evaluate("() => { const d = document.querySelector('#train-plot .js-plotly-plot');"
                          " return [d.layout.meta.rows, d.data[0].x.at(-1), d.data[0].y.at(-1)]; }")
    rows = RunDir(next(p for p in (tmp / "runs").iterdir() if p.is_dir())).read_metrics()
    losses = {r["step"]: r["loss"] for r in rows[:drawn[0]] if "loss" in r}
    assert drawn[1] == max(losses) and drawn[2] == pytest.approx(losses[max(losses)]), (drawn, losses)
    page.screenshot(path=str(shots / "train.png"), full_page=True)

    # A second Start while running is refused with a message, not a second job.
    page.get_by_role("button", name="Start training").click()
    page.wait_for_selector("text=already in progress", timeout=20_000)

    # Reload mid-run: the page reattaches to the job and shows the whole curve again.
    before = plot_points(page)
    page.reload()
    page.get_by_role("tab", name="Train").click()
    deadline = time.time() + 30
    while plot_points(page) < before and time.time() < deadline:
        time.sleep(0.5)
    assert plot_points(page) >= before

    page.get_by_role("button", name="Stop").click()
    page.wait_for_selector("#train-progress [data-state=stopped]", timeout=90_000)
    # An idle page asks for few animation frames (page_script.py): Gradio's status-tracker loop ran at 60 a second.
    # First the page settles: the stopped state's refresh redraws the curves (plotly animates with frames).
    time.sleep(3)
    frames = page.evaluate("window.__qsFrames")
    time.sleep(2)
    assert page.evaluate("window.__qsFrames") - frames < 20
    runs = [p for p in (tmp / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "adapter" / "adapter_model.safetensors").is_file()

    # Chat with the adapter: text arrives streamed (grows over several updates).
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="↻ Refresh runs").click()
    page.get_by_label("Run", exact=True).click()
    page.get_by_role("option", name=runs[0].name).click()
    page.wait_for_function("document.querySelector('#chat-run input').value.length > 0")
    page.get_by_text("Generation settings").click()
    tokens = page.locator("#max-new-tokens input[type=number]")
    tokens.fill("400")  # long enough to see several streamed updates from a tiny fast model
    tokens.press("Tab")
    page.get_by_role("textbox", name="Message").fill("Tell me a joke")
    page.get_by_role("button", name="Send").click()
    lengths = set()
    deadline = time.time() + 90
    bot = page.locator("#chatbot [data-testid=bot]")
    while time.time() < deadline and len(lengths - {0}) < 2:
        if bot.count():
            lengths.add(len(bot.last.inner_text()))
        time.sleep(0.02)
    assert len(lengths - {0}) >= 2, f"reply was not streamed: {lengths}"
    assert bot.count() == 1

    # Let the long reply finish (the chat model answers one request at a time), then compare on short replies.
    last, stable_since = None, time.time()
    while time.time() - stable_since < 2 and time.time() < deadline + 60:
        now = bot.last.inner_text()
        if now != last:
            last, stable_since = now, time.time()
        time.sleep(0.2)
    tokens.fill("32")
    tokens.press("Tab")

    # Compare with base: both answers for the same prompt and seed.
    page.get_by_role("textbox", name="Message").fill("Tell me a joke")
    page.get_by_role("button", name="Compare with base").click()
    page.wait_for_function("document.querySelector('#cmp-adapter textarea').value.length > 0", timeout=90_000)
    # Both answers stream: read them once they have stopped growing, not at their first token (two first tokens
    # of a tiny model are often the same whitespace).
    pair, stable_since, deadline = None, time.time(), time.time() + 90
    while time.time() - stable_since < 3 and time.time() < deadline:
        now = (page.locator("#cmp-base textarea").input_value(), page.locator("#cmp-adapter textarea").input_value())
        if now != pair:
            pair, stable_since = now, time.time()
        time.sleep(0.2)
    base_reply, tuned_reply = pair
    # Same prompt, same seed, greedy: only the adapter differs, and the trained adapter changes the answer.
    # (A tiny random model may answer in whitespace: non-empty, not necessarily printable.)
    assert base_reply and tuned_reply and base_reply != tuned_reply, (base_reply, tuned_reply)
    page.screenshot(path=str(shots / "chat.png"), full_page=True)

    # Runs: the run is listed with its status, and the CLI command that reproduces it.
    page.get_by_role("tab", name="Runs").click()
    page.get_by_role("button", name="↻ Refresh").click()
    page.wait_for_function(f"document.querySelector('#runs-table').innerText.includes('{runs[0].name}')",
                           timeout=30_000)
    page.get_by_label("Run", exact=True).last.click()
    page.get_by_role("option", name=runs[0].name).click()
    page.wait_for_selector("text=python -m qlora_ui train", timeout=30_000)
    page.screenshot(path=str(shots / "runs.png"), full_page=True)
    page.close()



def test_lora_options_from_the_train_tab(browser, app):
    """LoRA init, DoRA and rsLoRA are form fields: a refused combination says why; the chosen ones reach the run."""
    page, tmp = train_tab_on_tiny_model(browser, app)
    # Written "LoRA" like the other LoRA labels.
    text = page.evaluate("document.body.innerText")
    assert "LoRA dropout" in text and "Lora dropout" not in text
    page.get_by_label("LoRA init").click()
    page.get_by_role("option", name="loftq").click()
    page.get_by_label("DoRA", exact=True).check()
    page.get_by_label("Max steps").fill("2")
    page.get_by_label("Max steps").press("Tab")
    before = {p.name for p in (tmp / "runs").iterdir()} if (tmp / "runs").exists() else set()
    page.get_by_role("button", name="Start training").click()
    page.wait_for_selector("text=do not combine", timeout=30_000)
    page.get_by_label("DoRA", exact=True).uncheck()
    page.get_by_label("rsLoRA").check()
    page.get_by_role("button", name="Start training").click()
    page.wait_for_selector("#train-progress [data-state=finished]", timeout=180_000)
    run = next(p for p in (tmp / "runs").iterdir() if p.name not in before)
    cfg = (run / "config.yaml").read_text()
    assert "lora_init: loftq" in cfg and "use_rslora: true" in cfg and "use_dora: false" in cfg
    assert "LoftQ:" in (run / "train.log").read_text()
    page.close()


def test_two_processes_from_the_train_tab(browser, app):
    """Processes is a form field: the global batch is spelled out, the run is launched through accelerate,
    followed live like any run, and Stop reaches both processes."""
    page, tmp = train_tab_on_tiny_model(browser, app)
    for label in ("Batch size", "Processes"):  # sliders: their number box
        box = page.get_by_label(f"number input for {label}")
        box.fill("2")
        box.press("Tab")
    page.wait_for_selector("#global-batch:has-text('Global batch: 4')", timeout=20_000)
    assert "× 2 processes" in page.inner_text("#global-batch")
    page.get_by_label("Max steps").fill("2000")
    page.get_by_label("Max steps").press("Tab")
    before = {p.name for p in (tmp / "runs").iterdir()} if (tmp / "runs").exists() else set()
    page.get_by_role("button", name="Start training").click()
    page.wait_for_function("() => +document.querySelector('#train-progress [data-step]')?.dataset.step >= 3",
                           timeout=180_000)
    page.wait_for_function("() => document.querySelectorAll('#train-plot .scatterlayer .trace').length > 0",
                           timeout=60_000)
    run = next(p for p in (tmp / "runs").iterdir() if p.name not in before)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["world_size"] == 2
    page.get_by_role("button", name="Stop").click()
    page.wait_for_selector("#train-progress [data-state=stopped]", timeout=120_000)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    page.close()
