"""Refresh docs/screenshots/*.png from a real session: the bundled model, the cpu-quickstart preset, headless Chromium.

Starts the app, trains the quick start to the end (or --steps), asks the same question of the base and the adapter
in "Compare with base", and prints how long each phase took and how fresh the live plot was.

    .venv/bin/python docs/make_screenshots.py [--steps 60] [--question "..."]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fault_helpers import chromium, plot_points, start_app  # noqa: E402


def runs_tab_shot(page, run_name: str, out: Path) -> None:
    page.get_by_label("Runs to compare").click()
    page.get_by_role("option", name=run_name).last.click()
    page.keyboard.press("Escape")
    page.get_by_label("Run", exact=True).last.click()
    page.get_by_role("option", name=run_name).last.click()
    page.wait_for_selector("text=python -m qlora_ui train", timeout=30_000)
    time.sleep(2)
    page.screenshot(path=str(out / "runs.png"), full_page=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--question", default="What is your favorite food?")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qlora-shots-"))
    proc, url = start_app(tmp, None)
    try:
        with chromium() as b:
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#data-summary:has-text('Format: messages')", timeout=180_000)
            page.wait_for_selector("#data-example .qs-trained", timeout=60_000)
            time.sleep(2)
            page.screenshot(path=str(out / "model-data.png"), full_page=True)

            page.get_by_role("tab", name="Train").click()
            steps = page.get_by_label("Max steps")
            steps.fill(str(args.steps))
            steps.press("Tab")
            time.sleep(2)
            t0 = time.time()
            page.get_by_role("button", name="Start training").click()
            page.wait_for_selector("#train-progress [data-state=running]", timeout=60_000)
            ages, first_point = [], None
            shot = False
            while time.time() - t0 < 3600:
                state = page.locator("#train-progress .qs-progress").get_attribute("data-state")
                age = page.locator("#train-progress .qs-progress").get_attribute("data-age")
                if state == "running" and age and float(age) > 0:
                    ages.append(float(age))
                n = plot_points(page)
                if n and first_point is None:
                    first_point = time.time() - t0
                if n >= args.steps // 2 and not shot:
                    page.screenshot(path=str(out / "train.png"), full_page=True)
                    shot = True
                if state in ("finished", "stopped", "failed"):
                    break
                time.sleep(1)
            total = time.time() - t0
            print(f"training: first point after {first_point:.0f} s, done after {total:.0f} s ({state})")
            if ages:
                print(f"plot freshness at render: median {statistics.median(ages):.2f} s, max {max(ages):.2f} s "
                      "(+ up to one 3 s timer tick)")
            run = next(p for p in (tmp / "runs").iterdir() if p.is_dir())

            page.get_by_role("tab", name="Chat").click()
            page.get_by_role("button", name="↻ Refresh runs").click()
            page.get_by_label("Run", exact=True).click()
            page.get_by_role("option", name=run.name).click()
            page.wait_for_function("document.querySelector('#chat-run input').value.length > 0")
            page.get_by_role("textbox", name="Message").fill(args.question)
            page.get_by_role("button", name="Send").click()
            page.wait_for_selector("#chatbot [data-testid=bot]", timeout=180_000)
            time.sleep(8)
            page.get_by_role("textbox", name="Message").fill(args.question)
            page.get_by_role("button", name="Compare with base").click()
            page.wait_for_function("document.querySelector('#cmp-adapter textarea').value.length > 0",
                                   timeout=300_000)
            time.sleep(6)
            base = page.locator("#cmp-base textarea").input_value()
            tuned = page.locator("#cmp-adapter textarea").input_value()
            print(f"base:    {base!r}\nadapter: {tuned!r}")
            page.screenshot(path=str(out / "chat.png"), full_page=True)

            page.get_by_role("tab", name="Runs").click()
            page.get_by_role("button", name="↻ Refresh").click()
            time.sleep(2)
            runs_tab_shot(page, run.name, out)
    finally:
        proc.terminate()
        proc.wait(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
