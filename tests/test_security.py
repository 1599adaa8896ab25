"""Nobody let in: exposure needs a login, the login leaks nothing, uploads are capped, files and run names stay
inside their folders, model code and pickles run only when asked. Checked through the HTTP interface of a
running app (raw requests and gradio_client), not only by calling functions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client.exceptions import AppError

from qlora_ui.studio import Studio
from qlora_ui.ui import handlers as h
from qlora_ui.ui.app import FORM_KEYS
from tests.fault_helpers import ROOT, bad_model_folders, fast_cfg, form, run_dirs, wait_for, write_rows

AUTH = ("alice", "correct horse")
CAP = 4096  # --max-file-size, bytes


def app_exit(*flags: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", "--runs-dir", str(tmp / "runs"), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flags", [["--share"], ["--host", "0.0.0.0"], ["--host", "192.168.1.20"],
                                   ["--host", "0.0.0.0", "--auth-file", "EMPTY"]],
                         ids=["share", "all-interfaces", "lan-address", "empty-auth-file"])
def test_exposure_without_a_login_refuses_to_start(flags, tmp_path):
    empty = tmp_path / "auth.txt"
    empty.write_text("# no users yet\n")
    out = app_exit(*[str(empty) if f == "EMPTY" else f for f in flags], tmp=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error:") and "--auth" in out.stderr and "Traceback" not in out.stderr


class Evil:
    """A pickle that leaves a mark when anything unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture(scope="module")
def secured(tmp_path_factory, tiny_model_dir):
    from tests.test_browser import start_app

    tmp = tmp_path_factory.mktemp("secured")
    models = bad_model_folders(tmp / "models", tiny_model_dir)
    # safetensors next to a booby-trapped pickle: only the safetensors may be read.
    trapped = models["trapped"] = tmp / "models" / "trapped"
    shutil.copytree(tiny_model_dir, trapped)
    import torch

    torch.save(Evil(tmp / "PWNED"), trapped / "pytorch_model.bin")  # torch.load(weights_only=False) would run it
    outside = tmp / "outside-model"
    shutil.copytree(tiny_model_dir, outside)
    fake = tmp / "runs" / "20260101-000000-fake"
    fake.mkdir(parents=True)
    (fake / "config.yaml").write_text("name: fake\n")
    victim = tmp / "victim"
    victim.mkdir()
    (victim / "config.yaml").write_text("name: victim\n")
    (tmp / "secret.txt").write_text("the launch codes\n")
    data = write_rows(tmp / "train.jsonl")
    assert data.stat().st_size < CAP
    proc, url = start_app(tmp, tiny_model_dir, "--auth", f"{AUTH[0]}:{AUTH[1]}", "--max-file-size", f"{CAP}b")
    yield dict(tmp=tmp, url=url, proc=proc, models=models, outside=outside, fake=fake, victim=victim, data=data)
    proc.terminate()
    proc.wait(30)


def logged_in(url: str) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=60)
    r = c.post("/login", data={"username": AUTH[0], "password": AUTH[1]})
    assert r.status_code == 200 and r.json() == {"success": True}
    return c


def client(url: str):
    from gradio_client import Client

    return Client(url, auth=AUTH, verbose=False)


@pytest.mark.slow
def test_binds_to_loopback_by_default(secured):
    import psutil

    listening = [c.laddr for c in psutil.Process(secured["proc"].pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}


@pytest.mark.slow
def test_without_a_login_nothing_is_reachable(secured):
    from gradio_client import Client

    url = secured["url"]
    anon = httpx.Client(base_url=url, timeout=30)
    for method, path in [("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/call/list_runs"),
                         ("POST", "/gradio_api/upload"), ("POST", "/gradio_api/queue/join"),
                         ("GET", f"/gradio_api/file={ROOT / 'presets' / 'data' / 'pirate_chat.jsonl'}")]:
        r = anon.request(method, path, json={"data": []} if method == "POST" else None)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
    with pytest.raises(ValueError, match="credentials were not provided"):
        Client(url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=(AUTH[0], "wrong"), verbose=False)


@pytest.mark.slow
def test_failed_logins_do_not_say_which_part_was_wrong(secured):
    url = secured["url"]
    answers = []
    for user, pw in [("mallory", AUTH[1]), (AUTH[0], "wrong"), ("mallory", "wrong"), (AUTH[0].upper(), AUTH[1])]:
        r = httpx.post(url + "/login", data={"username": user, "password": pw})
        assert not r.cookies
        answers.append((r.status_code, r.text))
    assert len(set(answers)) == 1 and answers[0][0] == 400, answers
    logged_in(url)


@pytest.mark.slow
def test_uploads_over_the_cap_are_refused(secured):
    c = logged_in(secured["url"])
    r = c.post("/gradio_api/upload", files={"files": ("big.jsonl", b"x" * (CAP + 1))})
    assert r.status_code == 413 and "maximum allowed size" in r.text
    r = c.post("/gradio_api/upload", files={"files": ("small.jsonl", b"x" * 100)})
    assert r.status_code == 200 and len(r.json()) == 1
    assert secured["proc"].poll() is None


@pytest.mark.slow
def test_the_file_route_serves_only_allowed_paths(secured):
    c = logged_in(secured["url"])
    tmp = secured["tmp"]
    refused = ["/etc/passwd", str(secured["fake"] / "config.yaml"), str(tmp / "runs"), str(tmp / "secret.txt"),
               str(ROOT / "app.py"), str(ROOT / "presets" / "cpu-quickstart.yaml"),
               str(ROOT / "presets" / "data" / ".." / "cpu-quickstart.yaml"),
               str(ROOT / "presets" / "data" / "%2E%2E" / "%2E%2E" / "app.py"), "../../../../etc/passwd",
               "..%2F..%2F..%2Fetc%2Fpasswd", str(secured["models"]["tiny"] / "config.json")]
    for path in refused:
        r = c.get(f"/gradio_api/file={path}")
        assert r.status_code in (403, 404), (path, r.status_code, r.text[:100])
        assert "launch codes" not in r.text and "root:" not in r.text
    # the one allowed folder: the bundled dataset the quick-start form points at
    r = c.get(f"/gradio_api/file={ROOT / 'presets' / 'data' / 'pirate_chat.jsonl'}")
    assert r.status_code == 200 and '"messages"' in r.text


@pytest.mark.slow
def test_a_server_path_cannot_pose_as_an_upload(secured):
    """A client may only hand the app files it uploaded, never a path on the server."""
    c = logged_in(secured["url"])
    vals = form(fast_cfg(secured["models"]["tiny"], secured["data"]))
    for path in [str(secured["tmp"] / "secret.txt"), "/etc/passwd", str(secured["fake"] / "config.yaml")]:
        vals[FORM_KEYS.index("data_path")] = {"path": path, "meta": {"_type": "gradio.FileData"}}
        event = c.post("/gradio_api/call/inspect_data", json={"data": vals}).json()["event_id"]
        text = c.get(f"/gradio_api/call/inspect_data/{event}").text
        assert "event: error" in text and "not uploaded by a user" in text, text[:300]
        assert "launch codes" not in text and "root:" not in text


@pytest.mark.slow
def test_run_names_cannot_escape_the_runs_dir(secured):
    api = client(secured["url"])
    names = [r[0] for r in api.predict(api_name="/list_runs")[0]["data"]]
    assert names == [secured["fake"].name]
    assert secured["fake"].name in api.predict(secured["fake"].name, api_name="/run_details")[0]
    for name in ["../victim", str(secured["victim"]), "../../etc", "..", "../runs/../victim"]:
        for endpoint in ["/run_details", "/delete_run", "/resume_training"]:
            with pytest.raises(AppError, match="not in the list of choices"):
                api.predict(name, api_name=endpoint)
    assert (secured["victim"] / "config.yaml").is_file() and secured["fake"].is_dir()
    # Behind Gradio's choice check, the handlers confine names themselves (a renamed dropdown cannot help).
    studio = Studio(secured["tmp"] / "runs")
    for name in ["../victim", str(secured["victim"]), f"{secured['fake'].name}/../../victim"]:
        with pytest.raises(gr.Error):
            h.delete_run(studio, name)
        with pytest.raises(gr.Error):
            h.run_details(studio, name)
    assert (secured["victim"] / "config.yaml").is_file()


@pytest.mark.slow
def test_typed_model_paths_stay_inside_the_model_root(secured):
    from gradio_client import handle_file

    api = client(secured["url"])
    root = secured["tmp"] / "models"
    for typed in [str(secured["outside"]), f"{root}/../outside-model", "/etc", "~/", "../../.."]:
        vals = form(fast_cfg(root / "tiny", secured["data"]), base_model=typed,
                    data_path=handle_file(str(secured["data"])))
        with pytest.raises(AppError, match="outside the folders this app may read"):
            api.predict(*vals, api_name="/start_training")
        summary = api.predict(*vals, api_name="/inspect_data")[0]
        assert "outside the folders" in summary, summary
    vals = form(fast_cfg(root / "tiny", secured["data"]), name="../../evil",
                data_path=handle_file(str(secured["data"])))
    with pytest.raises(AppError, match="name '../../evil'"):
        api.predict(*vals, api_name="/start_training")
    assert run_dirs(secured["tmp"] / "runs") == [secured["fake"]]


def queue_call(c: httpx.Client, api_name: str, data: list) -> list[dict]:
    """Call an event through the queue as the browser does, collecting every message (including warnings)."""
    deps = c.get("/config").json()["dependencies"]
    fn = next(i for i, d in enumerate(deps) if d.get("api_name") == api_name)
    session = uuid.uuid4().hex[:12]
    r = c.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session,
                                               "event_data": None, "trigger_id": deps[fn].get("id")})
    assert r.status_code == 200, r.text
    msgs = []
    with c.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                msgs.append(json.loads(line[5:]))
                if msgs[-1].get("msg") == "process_completed":
                    break
    return msgs


@pytest.mark.slow
def test_remote_code_and_pickles_only_on_request(secured):
    c = logged_in(secured["url"])
    models = secured["models"]
    # Off by default in the form the app serves.
    preset = queue_call(c, "load_preset", ["cpu-quickstart"])[-1]["output"]["data"]
    assert preset[FORM_KEYS.index("trust_remote_code")] is False and preset[FORM_KEYS.index("allow_pickle")] is False

    uploaded = c.post("/gradio_api/upload", files={"files": ("train.jsonl", secured["data"].read_bytes())}).json()[0]
    data = {"path": uploaded, "orig_name": "train.jsonl", "meta": {"_type": "gradio.FileData"}}
    for kind, words in [("remote_code", "trust_remote_code"), ("pickle_only", "allow_pickle")]:
        vals = form(fast_cfg(models[kind], secured["data"]), data_path=data)
        done = queue_call(c, "start_training", vals)[-1]
        assert done["success"] is False and words in done["output"]["error"], done

    # Turned on: a warning; and a folder with safetensors never has its pickle opened.
    vals = form(fast_cfg(models["trapped"], secured["data"], trust_remote_code=True, max_steps=2, save_steps=2,
                         name="trusted"), data_path=data)
    msgs = queue_call(c, "start_training", vals)
    warnings = [m["log"] for m in msgs if m.get("msg") == "log" and m.get("level") == "warning"]
    assert any("trust_remote_code is on" in w for w in warnings), msgs
    assert msgs[-1]["success"] is True
    run = wait_for(lambda: [p for p in run_dirs(secured["tmp"] / "runs") if p.name.endswith("-trusted")], 30, "run")[0]
    wait_for(lambda: json.loads((run / "status.json").read_text())["state"] in ("finished", "failed"), 90,
             "the trusted run to end")
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert not (secured["tmp"] / "PWNED").exists()
