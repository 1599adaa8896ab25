"""`python app.py` launch behaviour that only a real process shows."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from tests.fault_helpers import ROOT, free_port


@pytest.mark.slow
def test_share_without_a_reachable_tunnel_says_so_and_keeps_serving(tmp_path):
    port = free_port()
    log = tmp_path / "app.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "app.py", "--share", "--auth", "alice:secret", "--port", str(port),
                                 "--runs-dir", str(tmp_path / "runs")], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        text = ""
        while time.time() < deadline:
            text = log.read_text()
            if "Could not create the public share link" in text or "Public link (login required)" in text:
                break
            assert proc.poll() is None, text
            time.sleep(1)
        # Offline here: the tunnel fails, the app says so plainly and still serves locally (behind the login).
        assert "Could not create the public share link" in text or "Public link (login required)" in text, text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200  # the login page
        # ...and the login holds: an API route answers 401 without it.
        import httpx

        r = httpx.post(f"http://127.0.0.1:{port}/gradio_api/call/list_runs", json={"data": []}, timeout=10)
        assert r.status_code == 401, r.text
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
