"""What one update of the Train tab's curves costs Chromium's main thread, by the way it is drawn.

    python bench/chart_update.py            # ~30 s; run it alone on the machine
    python bench/chart_update.py --rows 1000

The figure is plots.training_figure of --rows synthetic log rows; each way updates it to 5 more rows, 10 times,
and the page's main-thread task time (CDP Performance.getMetrics TaskDuration) is divided by 10:
- what Gradio's gr.Plot does with a new value: Plotly.react of the whole figure, then Plots.resize;
- Plotly.extendTraces with the new points (what the Train tab's page script does, JS in qlora_ui/ui/app.py);
each with the figure as plots.py draws it (no template) and with the plotly_white template it had until stop 35.
Printed as a ratio against Gradio's way with plotly_white, measured in the same page.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

from common import launch_chromium

from qlora_ui.plots import curve_points, training_figure


def rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [dict(step=i, loss=3 * math.exp(-i / 50) + rng.random() / 10, lr=2e-4 * (1 - i / (n + 5)),
                 grad_norm=1 + rng.random(), tokens_per_s=200 + 20 * rng.random()) for i in range(1, n + 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100)
    args = p.parse_args(argv)
    import plotly
    from playwright.sync_api import sync_playwright

    all_rows = rows(args.rows + 5)
    ours = training_figure(all_rows[:args.rows], title="run").to_json()
    white = training_figure(all_rows[:args.rows], title="run").update_layout(template="plotly_white").to_json()
    ours_new = training_figure(all_rows, title="run").to_json()
    white_new = training_figure(all_rows, title="run").update_layout(template="plotly_white").to_json()
    points = json.dumps(curve_points(all_rows, args.rows))
    gradio = ("async f => { const e = JSON.parse(f), g = document.getElementById('g'); e.layout.autosize = true;"
              " await Plotly.react(g, e.data, e.layout, {responsive: true}); await Plotly.Plots.resize(g); }")
    extend = ("async f => { const p = JSON.parse(f); await Plotly.extendTraces(document.getElementById('g'),"
              " {x: p.map(t => t[0]), y: p.map(t => t[1])}, p.map((t, i) => i)); }")
    ways = {  # (the figure drawn first, the update, its argument)
        "Gradio's gr.Plot, plotly_white (stop 34)": (white, gradio, white_new),
        "Gradio's gr.Plot, no template (plots.py now)": (ours, gradio, ours_new),
        "Plotly.extendTraces, plotly_white": (white, extend, points),
        "Plotly.extendTraces, no template (the Train tab now)": (ours, extend, points),
    }
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(Path(plotly.__file__).parent / "package_data" / "plotly.min.js", tmp)
        (Path(tmp) / "p.html").write_text("<html><head><script src='plotly.min.js'></script></head>"
                                          "<body><div id=g style='width:1200px'></div></body></html>")
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"file://{tmp}/p.html")
            cdp = page.context.new_cdp_session(page)
            cdp.send("Performance.enable")

            def task_s() -> float:
                return next(m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]
                            if m["name"] == "TaskDuration")

            cost = {}
            for name, (drawn, js, arg) in ways.items():
                costs = []
                for _ in range(10):
                    page.evaluate("f => { const e = JSON.parse(f);"
                                  " return Plotly.newPlot(document.getElementById('g'), e.data, e.layout); }", drawn)
                    time.sleep(0.2)
                    t0 = task_s()
                    page.evaluate(js, arg)
                    page.evaluate("() => new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)))")
                    costs.append(task_s() - t0)
                cost[name] = sorted(costs)[len(costs) // 2]
            browser.close()
    base = cost["Gradio's gr.Plot, plotly_white (stop 34)"]
    print(f"| one update of the curves ({args.rows} -> {args.rows + 5} rows) | main-thread s (median of 10) |"
          " vs Gradio's way |")
    print("|---|---|---|")
    for name, s in cost.items():
        print(f"| {name} | {s:.3f} | {s / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
