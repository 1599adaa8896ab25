"""DPO in Chromium, as a user meets it (issue 27): upload preference pairs, pick Method dpo (the data panel reads the
file again), start, see the reward curves drawn in the Train tab's chart, stop, and chat with the result. The app runs
a tiny random Llama."""

from __future__ import annotations

import time

import pytest

from tests.fault_helpers import ROOT, VIEWPORT, open_app, run_dirs, start_app, use_tiny_model, wait_for
from tests.test_walkthrough import upload

pytestmark = pytest.mark.slow

# The traces and subplot titles plots.training_figure adds for a preference run: what only a DPO/ORPO chart has.
REWARD_TRACES = {"reward chosen", "reward rejected", "reward margin", "reward accuracy"}
REWARD_TITLES = {"Rewards (chosen, rejected, margin)", "Reward accuracy"}
PLOT = "document.querySelector('#train-plot .js-plotly-plot')"


def state_of(page) -> str:
    return page.locator("#train-progress .qs-progress").get_attribute("data-state") or ""


def test_dpo_from_the_form_draws_reward_curves_stops_and_chats(browser, tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    with open(ROOT / "presets" / "data" / "pirate-preferences.jsonl") as f:
        pairs.write_text("".join(next(f) for _ in range(24)))
    proc, url = start_app(tmp_path, tiny_model_dir)
    try:
        page = open_app(browser.new_page(viewport=VIEWPORT), url)
        use_tiny_model(page, tmp_path / "models")
        # Uploaded while Method is still sft: the pairs are shown with a note naming the methods that train them.
        upload(page, pairs)
        page.wait_for_selector("#data-summary:has-text('method dpo or orpo')", timeout=60_000)
        page.get_by_role("tab", name="Train").click()
        page.get_by_label("Method").click()
        page.get_by_role("option", name="dpo", exact=True).click()

        # Method dpo: the panel reads the file again as DPO reads it (it used to keep the SFT reading): the
        # format, and one pair as the model sees it.
        page.get_by_role("tab", name="Model & Data").click()
        page.wait_for_selector("text=Chosen (preferred)", timeout=60_000)
        summary = page.locator("#data-summary").inner_text()
        assert "preference (standard)" in summary and "24 kept" in summary and "method dpo or orpo" not in summary

        page.get_by_role("tab", name="Train").click()
        # Long enough to be stopped midway; 2 pairs a step (the preset's 8 cost ~12 s a step on a loaded 2-core box).
        for box, value in ((page.get_by_label("Max steps"), "500"),
                           (page.get_by_role("spinbutton", name="number input for Batch size"), "2")):
            box.fill(value)
            box.press("Tab")
        page.get_by_role("button", name="Start training").click()
        wait_for(lambda: state_of(page) == "running", 90, "the DPO run to start")
        (run,) = run_dirs(tmp_path / "runs")
        config = (run / "config.yaml").read_text()
        assert "method: dpo" in config and "batch_size: 2" in config

        # The chart's third row: the reward traces hold points, under their subplot titles.
        def drawn() -> dict | None:
            got = page.evaluate(f"""() => {{ const p = {PLOT}; if (!p || !p.data) return null;
                return {{traces: p.data.filter(t => (t.x || []).length).map(t => t.name),
                         titles: [...p.querySelectorAll('.annotation-text')].map(a => a.textContent)}}; }}""")
            return got if got and REWARD_TRACES <= set(got["traces"]) else None

        shown = wait_for(drawn, 90, "the reward curves in the Train tab's chart", every=1)
        assert REWARD_TITLES <= set(shown["titles"]), shown
        assert page.locator("#train-plot .legendtext", has_text="reward margin").count() == 1

        page.get_by_role("button", name="Stop").click()
        wait_for(lambda: state_of(page) == "stopped", 60, "the run to stop")
        assert (run / "adapter" / "adapter_model.safetensors").is_file()

        # Chat with the stopped run's adapter: a reply comes back.
        page.get_by_role("tab", name="Chat").click()
        page.get_by_role("button", name="↻ Refresh runs").click()
        page.get_by_label("Run", exact=True).click()
        page.get_by_role("option", name=run.name).click()
        page.wait_for_function("document.querySelector('#chat-run input').value.length > 0")
        # A random tiny model's greedy choice is "\n" every time (an empty-looking reply): sample instead, briefly.
        page.get_by_text("Generation settings").click()
        for box, value in ((page.get_by_role("spinbutton", name="number input for Temperature"), "1"),
                           (page.locator("#max-new-tokens input[type=number]"), "16")):
            box.fill(value)
            box.press("Tab")
        page.get_by_role("textbox", name="Message").fill("How far is the sun?")
        page.get_by_role("button", name="Send").click()
        bot = page.locator("#chatbot [data-testid=bot]")
        wait_for(lambda: bot.count() and bot.last.inner_text().strip(), 60, "the adapter's reply")
        time.sleep(0.5)
        assert "Traceback" not in page.locator("#chatbot").inner_text()
        assert page.locator("[data-testid=toast-body]").count() == 0
    finally:
        proc.terminate()
        proc.wait(30)

