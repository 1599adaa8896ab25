"""Chat tab: streaming chat with a run's adapter (or the base), and base-vs-adapter side by side.

Every reply goes through the app's batch server (transformers) or the run's exported GGUF in a llama.cpp child
process; a child that dies ends that reply's llama.cpp path only, and transformers answers instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from ...config import BUNDLED_MODEL, ConfigError, RunConfig
from ...studio import Studio
from ..feedback import USER_ERRORS, user_error, warn

log = logging.getLogger(__name__)

BASE_ONLY = "Base model only"
TRANSFORMERS = "transformers (4-bit + adapter)"
LLAMA_CPP = "llama.cpp (exported GGUF)"
NO_GGUF = "no GGUF yet: export the run in the Runs tab"


def build() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        c["run"] = gr.Dropdown(label="Run", choices=[BASE_ONLY], value=BASE_ONLY, scale=2,
                               info="A run with an adapter, or the bundled base model.", elem_id="chat-run")
        c["checkpoint"] = gr.Dropdown(label="Adapter", choices=[], scale=2,
                                      info="The final adapter or a checkpoint's.")
        c["refresh"] = gr.Button("↻ Refresh runs", scale=1)
    c["backend"] = gr.Radio([TRANSFORMERS, LLAMA_CPP], value=TRANSFORMERS, label="Backend", elem_id="chat-backend",
                            info="llama.cpp answers from the run's exported GGUF (Runs tab, Export): faster on a CPU.")
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            c["system"] = gr.Textbox(label="System prompt", placeholder="(the template's default)", scale=3)
            # Made before the seed, placed after it: the chat API takes its inputs in the order the components
            # were made (run, adapter, system, temperature, top_p, max_new_tokens, seed, message, history).
            c["temperature"] = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                                         info="0 = greedy (same answer every time)", render=False)
            c["top_p"] = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", render=False)
            c["max_new_tokens"] = gr.Slider(8, 1024, value=96, step=8, label="Max new tokens",
                                            elem_id="max-new-tokens", render=False)
            c["seed"] = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=2**31 - 1, scale=1)
        with gr.Row():
            for k in ("temperature", "top_p", "max_new_tokens"):
                c[k].render()
    c["chatbot"] = gr.Chatbot(label="Chat", height=380, elem_id="chatbot")
    with gr.Row():
        c["msg"] = gr.Textbox(label="Message", placeholder="Ask something…", scale=5, elem_id="chat-msg")
        c["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="send-btn")
        c["compare"] = gr.Button("Compare with base", scale=1, elem_id="compare-btn")
        c["clear"] = gr.Button("Clear", scale=1)
    with gr.Row(visible=True, elem_id="cmp-row"):
        c["cmp_base"] = gr.Textbox(label="Base model", lines=6, interactive=False, elem_id="cmp-base")
        c["cmp_adapter"] = gr.Textbox(label="With adapter", lines=6, interactive=False, elem_id="cmp-adapter")
    # The same model from other apps: made after every input of the chat API, so its signature does not change.
    with gr.Accordion("Use it from other apps (OpenAI-compatible API)", open=False, elem_id="chat-api"):
        c["api_info"] = gr.Markdown(elem_id="chat-api-info")
        # A text box: gr.Code keeps a tall empty editor under a one-line command.
        c["api_curl"] = gr.Textbox(label="curl", lines=2, max_lines=4, interactive=False, buttons=["copy"],
                                   elem_id="chat-api-curl")
        c["api_python"] = gr.Code(label="Python (openai)", language="python", interactive=False, buttons=["copy"],
                                  elem_id="chat-api-python")
    c["history"] = gr.State([])  # per session: the conversation as role/content messages
    c["picked"] = gr.State(False)  # per session: the user chose a run, so the newest run is no longer followed
    # A run finishing while the page is open becomes the chat's run (opening the tab also does).
    c["follow"] = gr.Timer(5.0)
    return c


ASK = ("run", "checkpoint", "system", "temperature", "top_p", "max_new_tokens", "seed", "msg")


def ask_inputs(c: dict) -> set:
    return {c[k] for k in ASK}


# ---- run and adapter lists ----

def chat_runs(studio: Studio) -> Any:
    names = [r.name for r in studio.runs() if r.has_adapter() or r.checkpoints()]
    return gr.update(choices=[BASE_ONLY] + names)


def follow_run(studio: Studio, current: str | None, picked: bool) -> Any:
    """Opening the Chat tab, or a run finishing, selects the newest run with an adapter, unless the user chose."""
    newest = None if picked else next((r.name for r in studio.runs() if r.has_adapter()), None)
    if newest is None or newest == current:
        return gr.skip()
    return chat_runs(studio) | {"value": newest}


def adapter_options(studio: Studio, run_name: str | None, backend: str = TRANSFORMERS) -> Any:
    from ...chat import adapter_choices
    from ...export import ggufs

    if not run_name or run_name == BASE_ONLY:
        return gr.update(choices=[], value=None)
    try:
        run = studio.open(run_name)
    except USER_ERRORS as e:
        raise user_error(e) from None
    if backend == LLAMA_CPP:
        opts = [p.name for p in ggufs(run)] or [NO_GGUF]
    else:
        opts = [p.name if p.name != "adapter" else "final adapter" for p in adapter_choices(run.path)]
    return gr.update(choices=opts, value=opts[0] if opts else None)


def check_backend(studio: Studio, backend: str) -> Any:
    """Choosing llama.cpp runs the once-per-machine probe (a child evaluates a few tokens); where llama.cpp cannot
    run, the choice says why and offers transformers only."""
    from ...native.client import probe

    if backend != LLAMA_CPP:
        return gr.skip()
    ok, why = probe()
    if ok:
        return gr.skip()
    warn(f"llama.cpp does not run on this machine: {why}. Chat answers with transformers.")
    return gr.update(choices=[TRANSFORMERS], value=TRANSFORMERS, info=f"llama.cpp is unavailable here: {why}.")


def is_gguf_choice(adapter: str | None) -> bool:
    """The llama.cpp backend shows GGUF files in the Adapter list: the choice itself says which backend answers."""
    return bool(adapter) and (adapter == NO_GGUF or adapter.endswith(".gguf"))


# ---- one request ----

def _chat_target(studio: Studio, run_name: str | None, adapter: str | None) -> tuple[RunConfig, Path | None]:
    if not run_name or run_name == BASE_ONLY:
        return RunConfig().updated(base_model=BUNDLED_MODEL), None
    run = studio.open(run_name)
    cfg = run.config()
    studio.check_model(cfg.model)
    if not adapter:
        # No choice made (yet): the newest adapter the run has, final or checkpoint.
        from ...chat import adapter_choices

        found = adapter_choices(run.path)
        path = found[0] if found else run.adapter_dir
    elif adapter == "final adapter":
        path = run.adapter_dir
    else:
        path = run.checkpoints_dir / Path(adapter).name
    if not (path / "adapter_config.json").is_file():
        raise ConfigError([f"{run.name} has no adapter at {path.name} yet. Pick a checkpoint or wait for the run."])
    return cfg, path


def _settings(studio: Studio, ask: dict):
    from ...chat import MAX_MESSAGE_CHARS, GenerationSettings

    system = ask["system"] or ""
    if len(system) > MAX_MESSAGE_CHARS:
        raise gr.Error(f"The system prompt is {len(system):,} characters; the limit is {MAX_MESSAGE_CHARS:,}.")
    return GenerationSettings(system_prompt=system, temperature=float(ask["temperature"] or 0),
                              top_p=float(ask["top_p"]), max_new_tokens=int(studio.cap_new_tokens(
                                  ask["max_new_tokens"])), seed=int(ask["seed"] or 0))


def _checked_message(msg) -> str:
    """The stripped chat message, or a gr.Error when it is empty or over the server's size limit."""
    from ...chat import MAX_MESSAGE_CHARS

    msg = (msg or "").strip()
    if not msg:
        raise gr.Error("Type a message first.")
    if len(msg) > MAX_MESSAGE_CHARS:
        raise gr.Error(f"Your message is {len(msg):,} characters; this chat takes at most {MAX_MESSAGE_CHARS:,}. "
                       "Send a shorter message.")
    return msg


def _load_for_chat(studio: Studio, run_name, adapter, msg) -> tuple[str, str | None]:
    """(the stripped message, the loaded adapter's name or None for the base), or a gr.Error saying why not."""
    msg = _checked_message(msg)
    try:
        cfg, path = _chat_target(studio, run_name, adapter)
        return msg, studio.chat.load(cfg, path)
    except USER_ERRORS as e:
        raise user_error(e) from None


def _guarded(replies: Iterator[str]) -> Iterator[str]:
    """A reply stream whose user errors (a prompt over the token limit) become readable gr.Errors; closing this
    closes the engine's stream too, which stops its generation."""
    try:
        yield from replies
    except USER_ERRORS as e:
        raise user_error(e) from None
    finally:
        replies.close()


def _load_gguf_for_chat(studio: Studio, run_name, gguf, msg) -> str:
    """llama.cpp backend: the stripped message once the run's exported GGUF is loaded, or a gr.Error saying why not."""
    from ...export import ggufs

    msg = _checked_message(msg)
    if not run_name or run_name == BASE_ONLY:
        raise gr.Error("The llama.cpp backend answers from a run's exported GGUF: pick a run.")
    try:
        run = studio.open(run_name)
        found = {p.name: p for p in ggufs(run)}
        if not found or gguf == NO_GGUF:
            raise ConfigError([f"{run.name} has no GGUF export yet. Export it in the Runs tab (Export, GGUF), or use "
                               "the transformers backend."])
        studio.gguf_chat.load(found.get(Path(gguf or "").name) or next(iter(found.values())))
    except USER_ERRORS as e:
        raise user_error(e) from None
    return msg


def send_message(studio: Studio, c: dict, values: dict, session: str | None = None) -> Iterator[dict]:
    """Stream one reply into the chat: {chatbot: shown, msg: "", history: the conversation}."""
    from ...chat_llama import BackendStopped

    ask = {k: values.get(c[k]) for k in ASK}
    run_name, adapter = ask["run"], ask["checkpoint"]

    def shown_as(shown, history):
        return {c["chatbot"]: shown, c["msg"]: "", c["history"]: history}

    backend = LLAMA_CPP if is_gguf_choice(adapter) else TRANSFORMERS
    if backend == LLAMA_CPP:
        try:
            msg = _load_gguf_for_chat(studio, run_name, adapter, ask["msg"])
        except BackendStopped as e:
            # llama.cpp cannot run (the probe failed, or its child died loading): this reply comes from transformers.
            warn(f"{e}; answering with transformers instead.")
            backend, adapter = TRANSFORMERS, None
    if backend == TRANSFORMERS:
        msg, name = _load_for_chat(studio, run_name, adapter, ask["msg"])
    history = list(values.get(c["history"]) or []) + [{"role": "user", "content": msg}]
    settings = _settings(studio, ask)
    shown = history + [{"role": "assistant", "content": ""}]
    yield shown_as(shown, history)
    reply = ""
    replies = (studio.gguf_chat.stream(history, settings, threads=studio.chat_threads()) if backend == LLAMA_CPP
               else studio.chat.stream(history, settings, name, threads=studio.chat_threads(), session=session))
    try:
        for reply in _guarded(replies):
            shown[-1] = {"role": "assistant", "content": reply}
            yield shown_as(shown, history)
    except BackendStopped as e:
        # The llama.cpp child died mid-reply (the app did not): say so, and answer this message with transformers.
        # The next llama.cpp request starts a new child.
        log.warning("%s; answering with transformers instead", e)
        warn(f"{e}; answering with transformers instead.")
        _, name = _load_for_chat(studio, run_name, None, msg)
        for reply in _guarded(studio.chat.stream(history, settings, name, threads=studio.chat_threads(),
                                                 session=session)):
            shown[-1] = {"role": "assistant", "content": reply}
            yield shown_as(shown, history)
    history = history + [{"role": "assistant", "content": reply.strip()}]
    yield shown_as(history, history)


def compare_with_base(studio: Studio, c: dict, values: dict, session: str | None = None) -> Iterator[dict]:
    """The same prompt and seed through one loaded base, adapter off and on (always the transformers path): both
    requests are queued at once, so they are answered in one batch (peft's mixed-adapter forward)."""
    ask = {k: values.get(c[k]) for k in ASK}
    run_name, adapter = ask["run"], ask["checkpoint"]
    if is_gguf_choice(adapter):
        adapter = None  # the list shows GGUF files: compare the run's newest adapter
    if (ask["msg"] or "").strip() and (not run_name or run_name == BASE_ONLY):
        raise gr.Error("Pick a run with an adapter to compare against the base model.")
    msg, name = _load_for_chat(studio, run_name, adapter, ask["msg"])
    settings = _settings(studio, ask)
    messages = [{"role": "user", "content": msg}]
    threads = studio.chat_threads()
    # The session counts once: the pair is one request from this browser.
    streams = [_guarded(studio.chat.stream(messages, settings, None, threads=threads, session=session)),
               _guarded(studio.chat.stream(messages, settings, name, threads=threads))]
    texts, live = ["", ""], [True, True]
    try:
        for i in (0, 1):  # start both, so both are queued before either is served
            texts[i] = next(streams[i], texts[i])
        yield {c["cmp_base"]: texts[0], c["cmp_adapter"]: texts[1]}
        while any(live):
            for i in (0, 1):
                if live[i]:
                    try:
                        texts[i] = next(streams[i])
                    except StopIteration:
                        live[i] = False
            yield {c["cmp_base"]: texts[0], c["cmp_adapter"]: texts[1]}
    finally:
        for s in streams:
            s.close()


# ---- the same model from other apps (the OpenAI-compatible API, qlora_ui/api/) ----

API_NOTES = {"open": "No key needed from this machine.",
             "key": "Set `QLORA_API_KEY` to one of the keys the app was started with (`--api-key`).",
             "off": "The API is off on this shared app: whoever runs it turns it on with `--api-key`."}


def api_example(studio: Studio, c: dict, run_name: str | None, host: str | None = None,
                scheme: str = "http") -> dict:
    """The base URL, the selected run's model id, and a curl line and an `openai` snippet for it, copyable."""
    from ...api import base_url, client_examples

    model = run_name if run_name and run_name != BASE_ONLY else BUNDLED_MODEL
    access = getattr(studio, "api_access", "open")  # set where app.py mounts /v1
    url = base_url(host, scheme)
    ex = client_examples(url, model, access)
    info = (f"Base URL `{url}` · model `{model}`"
            + (" (its latest saved adapter)" if model != BUNDLED_MODEL else "") + f" · {API_NOTES[access]}")
    return {c["api_info"]: info, c["api_curl"]: ex["curl"], c["api_python"]: ex["python"]}


def _reached_at(request: gr.Request | None) -> tuple[str | None, str]:
    """(host, scheme) the browser reached the app by: the share link's host behind the tunnel, over https."""
    headers = getattr(request, "headers", None) or {}
    host = headers.get("x-forwarded-host") or headers.get("host")
    scheme = headers.get("x-forwarded-proto") or ("https" if (host or "").endswith(".gradio.live") else "http")
    return host, scheme.split(",")[0].strip()


def _api_example_event(studio: Studio, c: dict) -> dict:
    def example(run_name, request: gr.Request):
        return api_example(studio, c, run_name, *_reached_at(request))

    return dict(fn=example, inputs=c["run"], outputs=[c["api_info"], c["api_curl"], c["api_python"]],
                show_progress="hidden", api_name=False)


def wire(studio: Studio, c: dict, chat_tab: gr.Tab) -> None:
    c["refresh"].click(lambda: chat_runs(studio), None, c["run"], api_name=False)
    options = dict(fn=lambda run, backend: adapter_options(studio, run, backend), inputs=[c["run"], c["backend"]],
                   outputs=c["checkpoint"], api_name=False)
    c["run"].change(**options)
    c["run"].change(**_api_example_event(studio, c))
    c["backend"].change(**options)
    c["backend"].input(lambda backend: check_backend(studio, backend), c["backend"], c["backend"], api_name=False)
    # Chat follows the newest run with an adapter until the user picks a run themselves.
    c["run"].input(lambda: True, None, c["picked"], api_name=False)
    follow = dict(fn=lambda run, picked: follow_run(studio, run, picked), inputs=[c["run"], c["picked"]],
                  outputs=c["run"], show_progress="hidden", api_name=False)
    chat_tab.select(**follow)
    c["follow"].tick(**follow)

    # The backend needs no input of its own (the API keeps its inputs): the Adapter list then holds GGUF files.
    # Chat requests run concurrently up to what the batch server takes (it queues and batches them); the
    # browser session is passed on, so one session has one request at a time.
    # One request at a time per signed-in user (new sessions are free to make), else per browser session.
    def send(values: dict, request: gr.Request):
        who = getattr(request, "username", None) or getattr(request, "session_hash", None)
        yield from send_message(studio, c, values, session=who)

    def compare(values: dict, request: gr.Request):
        who = getattr(request, "username", None) or getattr(request, "session_hash", None)
        yield from compare_with_base(studio, c, values, session=who)

    # Room beyond what the batch server takes, so a request over its limit reaches it and hears "busy" at once
    # (with exactly its limit, the extra ones waited silently in Gradio's queue).
    limit = dict(concurrency_limit=studio.chat.server.max_waiting + studio.chat.server.max_batch + 8,
                 concurrency_id="chat")
    send_args = dict(fn=send, inputs=ask_inputs(c) | {c["history"]}, outputs=[c["chatbot"], c["msg"], c["history"]],
                     **limit)
    c["send"].click(**send_args, api_name="chat")
    c["msg"].submit(**send_args, api_name=False)
    # The answers sit below the chat: bring them into view, or the button seems to do nothing.
    c["compare"].click(compare, ask_inputs(c), [c["cmp_base"], c["cmp_adapter"]], api_name="compare_with_base",
                       **limit, js="(...args) => { document.querySelector('#cmp-row')?.scrollIntoView("
                                   "{behavior: 'smooth', block: 'center'}); return args; }")
    c["clear"].click(lambda: ([], [], "", ""), None, [c["chatbot"], c["history"], c["cmp_base"], c["cmp_adapter"]],
                     api_name=False)


def page_load(studio: Studio, c: dict, demo: gr.Blocks) -> None:
    demo.load(lambda: chat_runs(studio), None, c["run"], api_name=False)
    demo.load(**_api_example_event(studio, c))
