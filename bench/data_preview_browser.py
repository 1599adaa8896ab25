"""How long a big dataset takes to show in the browser: from picking the file to the first preview, and to the
full counts.

    python bench/data_preview_browser.py FILE            # e.g. the 1,000,000-row file bench/data_scale.py made

Starts the app with `--data-root` on the file's folder, opens it in headless Chromium, picks the file from
"Or a file on the server" and times (a) the summary's first answer (from a sample of the first rows) and (b) the
full counts. Run it alone on the machine. The data cache is a fresh temporary folder, so (b) is a cold
preparation of the whole file. The file must not be in the messages format (the preset's own file is).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import ROOT, app_env, launch_chromium, meets, running_app, verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    data = Path(a.file).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        env = app_env(QLORA_DATA_CACHE=str(Path(tmp) / "cache"))
        with running_app(Path(tmp) / "runs", env, "--data-root", str(data.parent), log=Path(tmp) / "app.log",
                         timeout=240, stop_wait=30) as app:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = launch_chromium(p)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(app.url)
                page.wait_for_selector("#data-summary:has-text('Format:')", timeout=120_000)  # the preset's file
                before = page.inner_text("#data-summary")
                page.locator("#dataset-server input").click()
                t0 = time.perf_counter()
                page.get_by_role("option", name=f"{data.parent.name}/{data.name}").click()
                # The preset's file is in messages format; the picked file's answer names its own format.
                page.wait_for_function(
                    "(before) => { const s = document.querySelector('#data-summary')?.innerText || '';"
                    " return s.includes('Format:') && !s.includes('Format: messages'); }", arg=before,
                    timeout=a.timeout * 1000)
                first = time.perf_counter() - t0
                first_text = page.inner_text("#data-summary")
                page.wait_for_function(
                    "() => { const s = document.querySelector('#data-summary')?.innerText || '';"
                    " return s.includes('Format:') && !s.includes('Format: messages')"
                    " && !s.includes('first rows only'); }", timeout=a.timeout * 1000)
                full = time.perf_counter() - t0
                full_text = page.inner_text("#data-summary")
                shot = ROOT / "bench" / "results" / "data_preview_browser.png"
                page.screenshot(path=str(shot), full_page=False)
                browser.close()
    print(f"{data.name} ({data.stat().st_size / 1e6:.0f} MB), picked from --data-root in headless Chromium")
    met = verdict(meets(first, "<=", 10), "met", "MISSED")
    print(f"first preview (sample) shown after  {first:7.1f} s   goal <= 10 s: {met}")
    print(f"full counts shown after             {full:7.1f} s")
    print("\nfirst answer:\n" + first_text.strip()[:600] + "\n\nfull answer:\n" + full_text.strip()[:600])


if __name__ == "__main__":
    main()
