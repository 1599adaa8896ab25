"""The OpenAI-compatible API (/v1), through the real `openai` client against a running app.py: replies streamed and
not, the same reply as the Chat tab, models listed, base and adapter at once, every error status, a client that goes
away, keys. Two apps: one on loopback without keys (a room of 4 rows), one reachable beyond loopback with a login
and an API key (one row, one waiting: busy and disconnects are easy to see)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.fault_helpers import ROOT, ByName, chat_input, fast_cfg, wait_for, write_rows

KEY = "sk-test-0123456789abcdef"
AUTH = ("alice", "correct horse")
HI = [{"role": "user", "content": "Say the word number 3."}]


def train_run(tmp: Path, model: Path) -> str:
    from qlora_ui.jobs import create_job

    # A high learning rate, so the adapter's greedy reply differs from the base's (the cross-talk test needs it).
    cfg = fast_cfg(model, write_rows(tmp / "rows.jsonl"), max_steps=4, save_steps=2, learning_rate=1e-2,
                   runs_dir=str(tmp / "runs"), name="api")
    job = create_job(cfg)
    assert job.run_blocking() == "finished"
    return job.run.name


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    from tests.fault_helpers import start_app

    tmp = tmp_path_factory.mktemp("api")
    proc, url = start_app(tmp, tiny_model_dir, "--chat-max-batch", "4")
    # Trained while the app runs: /v1/models must list it without a restart.
    run = train_run(tmp, tmp / "models" / "tiny")
    yield dict(tmp=tmp, url=url, run=run, log=next(tmp.glob("app-*.log")))
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def keyed(served):
    """The same runs, on an app reachable beyond loopback: a login for the page, a key for /v1."""
    from tests.fault_helpers import start_app

    tmp = served["tmp"]
    users, keys = tmp / "users.txt", tmp / "keys.txt"
    users.write_text(f"{AUTH[0]}:{AUTH[1]}\n")
    keys.write_text(f"# clients\n{KEY}\n")
    users.chmod(0o600)
    keys.chmod(0o600)
    before = set(tmp.glob("app-*.log"))
    proc, url = start_app(tmp, None, "--host", "0.0.0.0", "--auth-file", str(users), "--api-key-file", str(keys),
                          "--chat-max-batch", "1", "--chat-max-waiting", "1", "--chat-max-new-tokens", "1024")
    log = next(iter(set(tmp.glob("app-*.log")) - before))
    yield dict(url=url, run=served["run"], log=log)
    proc.terminate()
    proc.wait(30)


def client(url: str, key: str | None = "unused") -> openai.OpenAI:
    # No retries: a 429 must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def ask(c: openai.OpenAI, model: str, messages=HI, **kw):
    kw = {"max_tokens": 12, "temperature": 0, "seed": 7} | kw
    return c.chat.completions.create(model=model, messages=messages, **kw)


# ---- replies ----

@pytest.mark.slow
def test_models_lists_the_base_and_a_freshly_trained_run(served):
    models = {m.id: m for m in client(served["url"]).models.list()}
    run = models[served["run"]]
    assert run.object == "model" and run.owned_by == "qlora-studio" and run.created > 1_700_000_000
    assert run.model_extra["parent"] == "tiny" and "tiny" in models
    assert "bundled:SmolLM2-135M-Instruct" in models
    assert client(served["url"]).models.retrieve(served["run"]).id == served["run"]


@pytest.mark.slow
def test_a_reply_equals_the_chat_tabs_for_the_same_run_messages_seed(served):
    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import chat as chat_tab

    r = ask(client(served["url"]), served["run"], max_tokens=16)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == served["run"] and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.system_fingerprint == f"{served['run']}/adapter"  # which adapter answered
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    studio = Studio(served["tmp"] / "runs", model_roots=[served["tmp"] / "models"])
    last = None
    for last in chat_tab.send_message(studio, ByName(), chat_input(served["run"], "final adapter", HI[0]["content"],  # noqa: B007
                                                                   max_new_tokens=16, seed=7)):
        pass
    assert last["history"][-1]["content"] == choice.message.content.strip()


@pytest.mark.slow
def test_streamed_reply_is_well_formed_and_equals_the_whole_one(served):
    c = client(served["url"])
    whole = ask(c, served["run"], max_tokens=10)
    chunks = list(ask(c, served["run"], max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {ch.object for ch in chunks} == {"chat.completion.chunk"} and len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])

    # The raw event stream, read by the client's own line iterator: data lines of JSON (or comments), [DONE] last.
    with c.chat.completions.with_streaming_response.create(model=served["run"], messages=HI, max_tokens=4,
                                                           stream=True) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert all(line.startswith(("data: ", ":")) for line in lines)
    assert data[-1] == "[DONE]" and all(json.loads(d)["object"] == "chat.completion.chunk" for d in data[:-1])


@pytest.mark.slow
def test_max_tokens_stop_and_plain_completions(served):
    c = client(served["url"])
    r = ask(c, served["run"], max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    full = ask(c, served["run"], max_tokens=12).choices[0].message.content
    word = full.split()[1]  # a stop string from the middle of the greedy reply
    cut = ask(c, served["run"], max_tokens=12, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[:full.index(word)]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(c, served["run"], max_tokens=12, stop=word,
                                                                         stream=True) if ch.choices)
    assert streamed == full[:full.index(word)]

    done = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 5
    parts = list(c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                      stream=True))
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text


@pytest.mark.slow
def test_base_and_adapter_at_once_each_get_their_own_reply(served):
    c = client(served["url"])
    alone = {m: ask(c, m, max_tokens=16).choices[0].message.content for m in ("tiny", served["run"])}
    assert alone["tiny"] != alone[served["run"]], "the adapter should change the greedy reply"
    together: dict[str, list[str]] = {m: [] for m in alone}

    def one(model):
        together[model].append(ask(c, model, max_tokens=16).choices[0].message.content)

    threads = [threading.Thread(target=one, args=(m,)) for m in list(alone) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == {m: [text, text] for m, text in alone.items()}


@pytest.mark.slow
def test_a_run_still_training_answers_from_its_latest_checkpoint(served):
    import shutil

    from qlora_ui.runs import RunDir

    runs = served["tmp"] / "runs"
    # A run mid-training: checkpoints saved, no final adapter yet, its process (this one) alive.
    training = RunDir(runs / "20991231-000000-training")
    shutil.copytree(runs / served["run"], training.path)
    shutil.rmtree(training.adapter_dir)
    training.write_status("running", "training")
    try:
        assert training.name in {m.id for m in client(served["url"]).models.list()}
        r = ask(client(served["url"]), training.name, max_tokens=4)
        assert r.system_fingerprint == f"{training.name}/checkpoint-4 (still training)"
        assert r.choices[0].message.content
    finally:
        shutil.rmtree(training.path)


@pytest.mark.slow
def test_an_exported_gguf_is_listed_and_answered_by_llama_cpp(served):
    import shutil

    from qlora_ui.modeling import bundled_gguf_path
    from qlora_ui.native.client import probe

    ok, why = probe()
    if not ok:
        pytest.skip(f"llama.cpp does not run on this machine: {why}")
    export = served["tmp"] / "runs" / served["run"] / "export"
    export.mkdir(exist_ok=True)
    gguf = export / "api-q8_0.gguf"
    shutil.copy(bundled_gguf_path(), gguf)  # stands in for the run's own export (same vocabulary)
    model = f"{served['run']}/api-q8_0.gguf"
    c = client(served["url"])
    try:
        assert model in {m.id for m in c.models.list()}
        r = ask(c, model, max_tokens=8)
        assert r.system_fingerprint == f"{served['run']}/export/api-q8_0.gguf (llama.cpp)"
        assert r.choices[0].message.content and 0 < r.usage.completion_tokens <= 9
        streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(c, model, max_tokens=8, stream=True))
        assert streamed == r.choices[0].message.content  # greedy: the same reply
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=model, prompt="Once", max_tokens=4)
        assert e.value.code == "unsupported_model"
    finally:
        gguf.unlink()


@pytest.mark.slow
def test_every_error_has_openais_shape_and_status(served):
    c = client(served["url"])
    cases = [
        (openai.NotFoundError, 404, "model_not_found", dict(model="no-such-model")),
        (openai.BadRequestError, 400, "invalid_value", dict(temperature=3)),
        (openai.BadRequestError, 400, "unsupported_value", dict(n=2)),
        (openai.BadRequestError, 400, "unsupported_parameter",
         dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])),
        (openai.BadRequestError, 400, "string_above_max_length",
         dict(messages=[{"role": "user", "content": "x" * 8001}])),
        (openai.BadRequestError, 400, "context_length_exceeded",
         dict(messages=[{"role": "user", "content": " 7" * 3999}])),
    ]
    for error, status, code, kw in cases:
        with pytest.raises(error) as e:
            ask(c, kw.pop("model", served["run"]), **kw)
        assert e.value.status_code == status and e.value.code == code, kw
        assert set(e.value.body) == {"message", "type", "param", "code"} and e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, served["run"], messages=[{"role": "user", "content": " 7" * 3999}])
    assert re.search(r"accepts \([\d,]+, leaving room", e.value.message)  # the limit is named
    raw = httpx.post(f"{served['url']}/v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"


@pytest.mark.slow
def test_the_chat_tabs_example_works_as_copied(served):
    from urllib.parse import urlsplit

    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import chat as chat_tab

    studio = Studio(served["tmp"] / "runs", model_roots=[served["tmp"] / "models"])
    host = urlsplit(served["url"]).netloc
    shown = chat_tab.api_example(studio, ByName(), served["run"], host=host)
    assert f"`{served['url']}/v1`" in shown["api_info"] and f"`{served['run']}`" in shown["api_info"]
    curl = subprocess.run(["bash", "-c", shown["api_curl"]], capture_output=True, text=True, timeout=120)
    reply = json.loads(curl.stdout)
    assert reply["model"] == served["run"] and reply["choices"][0]["message"]["content"]
    python = subprocess.run([sys.executable, "-c", shown["api_python"]], capture_output=True, text=True, timeout=120)
    assert python.returncode == 0 and python.stdout.strip(), python.stderr
    base = chat_tab.api_example(studio, ByName(), chat_tab.BASE_ONLY, host=host)
    assert '"bundled:SmolLM2-135M-Instruct"' in base["api_curl"]
    studio.api_access = "key"  # what app.py's mount sets when keys are configured
    keyed = chat_tab.api_example(studio, ByName(), served["run"], host="abc.gradio.live", scheme="https")
    assert "Bearer $QLORA_API_KEY" in keyed["api_curl"] and "https://abc.gradio.live/v1" in keyed["api_curl"]
    assert 'os.environ["QLORA_API_KEY"]' in keyed["api_python"]


# ---- the shared app: keys, busy, a client that goes away ----

@pytest.mark.slow
def test_keys_are_required_behind_a_non_local_host(keyed):
    url = keyed["url"]
    none = httpx.get(f"{url}/v1/models")
    assert none.status_code == 401 and none.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, "sk-wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert keyed["run"] in {m.id for m in client(url, KEY).models.list()}


@pytest.mark.slow
def test_a_login_cookie_does_not_open_the_api_and_a_key_does_not_open_the_page(keyed):
    url = keyed["url"]
    browser = httpx.Client(base_url=url, timeout=30)
    assert browser.post("/login", data={"username": AUTH[0], "password": AUTH[1]}).json() == {"success": True}
    assert browser.get("/config").status_code == 200  # the cookie opens the page...
    assert browser.get("/v1/models").status_code == 401  # ...not the API
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/v1/models", headers=bearer).status_code == 200
    assert httpx.get(f"{url}/config", headers=bearer).status_code == 401
    # A page on another site cannot use a key it holds; an API client (no Origin) or the app's own page can.
    assert httpx.get(f"{url}/v1/models", headers=bearer | {"Origin": "https://evil.example"}).status_code == 403
    assert httpx.get(f"{url}/v1/models", headers=bearer | {"Origin": url}).status_code == 200


def stream_until_running(c: openai.OpenAI, model: str, n: int = 3):
    """A long streamed reply, read until `n` content chunks came (so its row is decoding): (stream, chunk times)."""
    stream = ask(c, model, max_tokens=1024, temperature=1.0, stream=True)
    times = []
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            times.append(time.time())
            if len(times) >= n:
                return stream, times
    raise AssertionError("the reply ended before it was long")


@pytest.mark.slow
def test_busy_is_429_with_retry_after(keyed):
    c = client(keyed["url"], KEY)
    running, _ = stream_until_running(c, keyed["run"])  # the one row
    waiting = ask(c, keyed["run"], max_tokens=4, stream=True)  # the one waiting place
    try:
        with pytest.raises(openai.RateLimitError) as e:
            ask(c, keyed["run"], max_tokens=4)
        assert e.value.status_code == 429 and e.value.response.headers["Retry-After"] == "2"
        assert e.value.code == "rate_limit_exceeded" and "busy" in e.value.message
    finally:
        running.close()
        waiting.close()


@pytest.mark.slow
def test_a_client_that_goes_away_frees_its_row(keyed):
    c = client(keyed["url"], KEY)
    stream, times = stream_until_running(c, keyed["run"], n=20)
    rate = (len(times) - 1) / max(times[-1] - times[0], 1e-3)  # tokens/s of this one row
    stream.close()
    gone = time.time()
    # One row in this app: the next request is answered only once the abandoned row has left the batch.
    r = ask(c, keyed["run"], max_tokens=2)
    waited = time.time() - gone
    left = (1024 - len(times)) / rate
    assert r.choices[0].message.content is not None
    assert waited < left / 3, f"the next reply waited {waited:.1f} s; the abandoned row had {left:.1f} s left"
    line = wait_for(lambda: re.search(r"api: client went away after (\d+) of 1024 tokens",
                                      keyed["log"].read_text()), 10, "the API's log line")
    assert int(line.group(1)) < 1024

    # Not streamed: the client gives up after 2 s; the server notices within a second and stops the row.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{keyed['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=2,
                   json={"model": keyed["run"], "messages": HI, "max_tokens": 1024, "temperature": 1.0})
    gone = time.time()
    ask(c, keyed["run"], max_tokens=2)
    waited, left = time.time() - gone, 1024 / rate - 2
    assert waited < left / 2, f"the next reply waited {waited:.1f} s; the abandoned row had {left:.1f} s left"


@pytest.mark.slow
def test_behind_share_without_a_key_the_api_stays_off(tmp_path):
    from tests.fault_helpers import start_app

    # The tunnel request goes to a proxy that never answers, as on a machine whose network drops it: Gradio waits
    # up to 30 s while the page already answers. /v1 and the host check must be in place from the first request.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    proxy = f"http://127.0.0.1:{silent.getsockname()[1]}"
    proc, url = start_app(tmp_path, None, "--share", "--auth", f"{AUTH[0]}:{AUTH[1]}",
                          env_extra={"HTTPS_PROXY": proxy, "https_proxy": proxy})
    try:
        off = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert off.status_code == 401 and off.json()["error"]["code"] == "api_off"
        rebound = httpx.get(f"{url}/", headers={"Host": "rebind.attacker.example"})
        assert rebound.status_code == 421
        silent.close()  # the tunnel request fails now, and launch() goes on to its start messages
        log = wait_for(lambda: "(/v1) is off" in (t := next(tmp_path.glob("app-*.log")).read_text()) and t, 60,
                       "the start message about the API")
        assert "--api-key" in log
        assert "Could not create the public share link" in log
    finally:
        proc.terminate()
        proc.wait(30)
        silent.close()


# ---- without a running app ----

def test_key_files_others_can_read_are_refused_and_the_api_is_off_without_a_key(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY}\n")
    keys.chmod(0o644)
    out = subprocess.run([sys.executable, "app.py", "--api-key-file", str(keys), "--runs-dir", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "chmod 600" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "qlora_ui", "serve", "--host", "0.0.0.0", "--runs-dir",
                          str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--api-key" in out.stderr and "Traceback" not in out.stderr

    from fastapi.testclient import TestClient

    from qlora_ui.api import build_api
    from qlora_ui.studio import Studio

    studio = Studio(tmp_path / "runs")
    off = TestClient(build_api(studio, keys=[], exposed=True))
    r = off.get("/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "api_off"
    assert TestClient(build_api(studio, keys=[], exposed=False)).get("/models").status_code == 200  # loopback


def test_wrong_keys_are_throttled_like_the_login(tmp_path):
    from fastapi.testclient import TestClient

    from qlora_ui.api import build_api
    from qlora_ui.studio import Studio

    api = TestClient(build_api(Studio(tmp_path / "runs"), keys=[KEY], exposed=True))
    for _ in range(5):
        assert api.get("/models", headers={"Authorization": "Bearer sk-guess"}).status_code == 401
    locked = api.get("/models", headers={"Authorization": f"Bearer {KEY}"})  # even the right key, for a while
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
    assert locked.json()["error"]["code"] == "too_many_failed_keys"


@pytest.mark.slow
def test_serve_answers_headless_with_only_the_runs_named(served):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = served["tmp"]
    log = open(tmp / "serve.log", "w")
    # With the dequantized chat copy on (the app's --chat-dequantize, here too): the same replies as the app's.
    proc = subprocess.Popen([sys.executable, "-m", "qlora_ui", "serve", "--run", served["run"], "--runs-dir",
                             str(tmp / "runs"), "--port", str(port), "--chat-dequantize", "on"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 120, "serve to answer", every=0.5)
        c = client(url)
        assert {m.id for m in c.models.list()} == {served["run"], "tiny"}
        assert ask(c, served["run"], max_tokens=16).choices[0].message.content == \
            ask(client(served["url"]), served["run"], max_tokens=16).choices[0].message.content
        assert httpx.get(f"{url}/", timeout=5).status_code == 404  # no page
        assert "chat base decodes from dequantized" in (tmp / "serve.log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_streamed_text_holds_back_half_characters_and_half_stop_strings():
    from qlora_ui.api import Cutter

    cut = Cutter(["END"])
    # a multi-byte character not yet complete, and a tail that may become the stop string, are not sent yet
    assert [cut.update(t, False) for t in ("Hi \ufffd", "Hi é", "Hi é E", "Hi é EN", "Hi é ENx")] == \
        ["Hi ", "é", " ", "", "ENx"]
    assert cut.update("Hi é ENx and END more", False) == " and " and cut.stopped
    assert cut.text == "Hi é ENx and "
    last = Cutter([])
    assert last.update("a\ufffd", True) == "a\ufffd" and not last.stopped  # the final text is sent as it is


def test_bad_requests_are_refused_before_any_model_loads(tmp_path):
    from fastapi.testclient import TestClient

    from qlora_ui.api import MAX_BODY_BYTES, build_api
    from qlora_ui.studio import Studio

    api = TestClient(build_api(Studio(tmp_path / "runs")))
    ok = {"model": "bundled:SmolLM2-135M-Instruct", "messages": HI}
    cases = [
        ({**ok, "temperature": 2.5}, 400, "temperature"), ({**ok, "top_p": 0}, 400, "top_p"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens"), ({**ok, "max_tokens": 1.5}, 400, "max_tokens"),
        ({**ok, "seed": True}, 400, "seed"), ({**ok, "n": 3}, 400, "n"), ({**ok, "logprobs": True}, 400, "logprobs"),
        ({**ok, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"), ({**ok, "stream": "yes"}, 400, "stream"),
        ({"model": ok["model"], "messages": []}, 400, "messages"),
        ({**ok, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "messages[0].content"),
        ({**ok, "messages": HI + [{"role": "assistant", "content": "x"}]}, 400, "messages"),
        ({"messages": HI}, 400, "model"), ({**ok, "model": "../../etc"}, 404, "model"),
    ]
    for body, status, param in cases:
        r = api.post("/chat/completions", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (body, r.json())
    # neutral values of unsupported parameters, as some clients always send them, pass on to the model lookup
    r = api.post("/chat/completions", json={**ok, "model": "nope", "presence_penalty": 0, "tools": [], "n": 1,
                                            "messages": [{"role": "developer", "content": "Be brief."}] + HI})
    assert r.status_code == 404
    assert api.post("/completions", json={"model": "tiny", "prompt": ["a", "b"]}).status_code == 400
    big = api.post("/chat/completions", content=b" " * (MAX_BODY_BYTES + 1),
                   headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert api.get("/nothing").json()["error"]["code"] == "unknown_url"
