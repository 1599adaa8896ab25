"""The Runs tab in Chromium, as a newcomer meets it: a hint while there are no runs, several runs drawn together,
a delete that names what goes and asks once more, and the key columns on a phone (issue 24, newcomer items 2
and 10)."""

from __future__ import annotations

import json
import os
import time

import pytest

from qlora_ui.runs import RunDir
from tests.fault_helpers import VIEWPORT, make_cfg, open_app, start_app, wait_for

pytestmark = pytest.mark.slow


PHONE = {"width": 390, "height": 844}


def fake_run(runs, name: str, losses: list[float], mtime: float) -> RunDir:
    """A finished-looking run folder: its config and loss rows, nothing trained."""
    run = RunDir(runs / name)
    run.path.mkdir(parents=True)
    run.write_config(make_cfg("models/tiny", "data.jsonl", max_steps=len(losses)))
    run.write_status("finished", "done", max_steps=len(losses))
    run.metrics_path.write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)))
    os.utime(run.path, (mtime, mtime))
    return run


def test_empty_hint_several_runs_compared_and_delete_asks_first(browser, tmp_path):
    proc, url = start_app(tmp_path, None)
    try:
        page = open_app(browser.new_page(viewport=VIEWPORT), url)
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_selector("#runs-empty:has-text('No runs yet')", timeout=30_000)

        now = time.time()
        runs = [fake_run(tmp_path / "runs", f"2026010{i}-000000-try{i}", [2.0 - 0.1 * k for k in range(i + 2)],
                         now - 100 * (5 - i)) for i in range(5)]
        page.reload()
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_function("document.querySelector('#runs-table').innerText.includes('try4')", timeout=30_000)
        assert page.locator("#runs-empty").is_hidden()
        # The four newest runs are drawn together, not the newest alone.
        chosen = page.locator("#runs-selected .token")
        wait_for(lambda: chosen.count() == 4, 30, "four runs preselected for the overlay")
        assert "try0" not in page.locator("#runs-selected").inner_text()
        wait_for(lambda: page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 4, 30, "four curves")

        # The newest run is the one picked; its details show. Delete asks first, naming the run.
        newest = runs[-1]
        page.wait_for_selector("#run-details:has-text('Folder:')", timeout=30_000)
        page.locator("#delete-btn").click()
        page.wait_for_selector(f"#delete-confirm:has-text('{newest.name}')", timeout=30_000)
        page.locator("#delete-no").click()
        page.wait_for_selector("#delete-confirm", state="hidden", timeout=30_000)
        assert newest.path.is_dir()

        page.locator("#delete-btn").click()
        page.locator("#delete-yes").click()
        wait_for(lambda: not newest.path.exists(), 30, "the run folder to be deleted")
        # Its details and command leave the screen with it; the others stay.
        page.wait_for_function(f"!document.querySelector('#runs-table').innerText.includes('{newest.name}')",
                               timeout=30_000)
        wait_for(lambda: page.locator("#runs-one input").input_value() == "", 30, "the Run list to empty")
        # The emptied list's change event clears the details a moment later (the status tracker shows meanwhile).
        wait_for(lambda: "Folder:" not in page.locator("#run-details").inner_text(), 30, "the details to clear")
        assert all(r.path.is_dir() for r in runs[:-1])
    finally:
        proc.terminate()
        proc.wait(30)


def test_phone_runs_table_shows_name_state_step_and_loss(browser, tmp_path):
    """390x844: the Runs table showed only its name column, the rest scrolled out of sight. The columns a reader
    needs (name, status, step, final_loss) must be on screen without scrolling the table sideways."""
    now = time.time()
    fake_run(tmp_path / "runs", "20260101-000000-capitals-quickstart", [2.0, 1.5, 1.2], now)
    proc, url = start_app(tmp_path, None)
    try:
        page = open_app(browser.new_page(viewport=PHONE), url)
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_function("document.querySelector('#runs-table').innerText.includes('capitals')",
                               timeout=30_000)
        time.sleep(1)  # let the table settle its column widths
        # Each key column's header and first cell: drawn, inside the screen, and not clipped by the table's own
        # scrolling box (a cell can sit inside the screen's box yet outside the table's visible part).
        boxes = page.evaluate("""(keys) => {
            const W = document.documentElement.clientWidth, out = {};
            const heads = [...document.querySelectorAll('#runs-table thead th')];
            const texts = heads.map(th => th.innerText.trim());
            // Gradio 6 draws the rows as a virtual list of divs (the table's tbody only sizes the columns).
            const row = document.querySelector('#runs-table .virtual-row');
            for (const k of keys) {
                const i = texts.indexOf(k);
                if (i < 0) { out[k] = 'no header'; continue; }
                // The header's own text too: a header cut by its narrow column ("final_") is no header.
                const cells = [heads[i], heads[i].querySelector('span') || heads[i],
                               row.querySelector(`[data-col="${i}"]`)];
                out[k] = cells.map(el => {
                    const r = el.getBoundingClientRect();
                    let ok = r.width > 0 && r.left >= 0 && r.right <= W + 1;
                    for (let p = el.parentElement; p && ok; p = p.parentElement) {
                        if (/(auto|scroll|hidden)/.test(getComputedStyle(p).overflowX)) {
                            const b = p.getBoundingClientRect();
                            ok = r.left >= b.left - 1 && r.right <= b.right + 1;
                        }
                    }
                    return ok ? 'visible' : `off screen (${Math.round(r.left)}..${Math.round(r.right)} of ${W})`;
                });
            }
            return out; }""", ["name", "status", "step", "final_loss"])
        assert all(v == ["visible"] * 3 for v in boxes.values()), boxes
        cells = page.locator("#runs-table .virtual-row").first.inner_text()
        assert "finished" in cells and "capitals" in cells and "1.2" in cells, cells
        # Nothing sticks out of the screen on this tab either.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    finally:
        proc.terminate()
        proc.wait(30)
