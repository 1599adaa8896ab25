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
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_browser import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    data = Path(a.file).resolve()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "QLORA_DATA_CACHE": str(Path(tmp) / "cache")}
        log = open(Path(tmp) / "app.log", "w")
        app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(Path(tmp) / "runs"),
                                "--data-root", str(data.parent)], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
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
        finally:
            app.terminate()
            app.wait(30)
    print(f"{data.name} ({data.stat().st_size / 1e6:.0f} MB), picked from --data-root in headless Chromium")
    print(f"first preview (sample) shown after  {first:7.1f} s   goal <= 10 s: {'met' if first <= 10 else 'MISSED'}")
    print(f"full counts shown after             {full:7.1f} s")
    print("\nfirst answer:\n" + first_text.strip()[:600] + "\n\nfull answer:\n" + full_text.strip()[:600])


if __name__ == "__main__":
    main()
