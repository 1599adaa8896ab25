"""llama.cpp kept portable and out of our processes: the build holds no AMX tile code, a crash of the llama.cpp
child ends one reply (answered by transformers instead), never the app, the other sessions or a training."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from qlora_ui.native import build
from qlora_ui.native.client import BackendStopped, LlamaCppProcess, describe_exit

AMX_ASM = """
    .text
    ldtilecfg (%rax)
    tilezero %tmm4
    tileloadd (%rax,%rbx,1), %tmm1
    tdpbssd %tmm1, %tmm2, %tmm3
    tdpbf16ps %tmm1, %tmm2, %tmm3
    tilerelease
    vaddps %zmm1, %zmm2, %zmm3
"""


def test_amx_count_finds_tile_instructions_and_nothing_else(tmp_path):
    """The disassembly check itself can fail: an object with six AMX instructions (and one AVX-512) counts six."""
    if shutil.which("as") is None:
        pytest.fail("binutils' `as` is missing: apt-get install binutils")
    (tmp_path / "amx.s").write_text(AMX_ASM)
    subprocess.run(["as", "-o", str(tmp_path / "amx.o"), str(tmp_path / "amx.s")], check=True)
    assert build.amx_instruction_count(tmp_path / "amx.o") == 6


def test_installed_llama_cpp_is_this_configuration_and_holds_no_amx_tile_code():
    libs = build.cpu_libraries()
    assert libs, "llama-cpp-python's libggml-cpu is not installed: make install"
    assert build.is_current(), (f"the venv's llama-cpp-python is not the {build.build_key()} build; "
                                "`python -m qlora_ui.native.build` installs it")
    for lib in libs:
        assert build.amx_instruction_count(lib) == 0, lib


def test_build_flags_are_portable_and_name_the_wheel_folder():
    args = build.cmake_args("x86_64")
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AVX512=OFF"} <= set(args)
    assert build.cmake_args("aarch64") == []
    # Another configuration is another folder: a wheel built with other flags is never picked up.
    assert build.build_key("x86_64") != build.build_key("aarch64")
    assert build.build_key() in str(build.wheel_dir())


def test_exit_descriptions():
    assert describe_exit(-4) == "signal 4, illegal instruction"
    assert describe_exit(-11) == "signal 11, segmentation fault"
    assert describe_exit(1, "Traceback...\nValueError: bad magic\n") == "exit code 1: ValueError: bad magic"


@pytest.fixture(scope="module")
def bundled_gguf() -> Path:
    from qlora_ui.modeling import bundled_gguf_path

    return bundled_gguf_path()


LONG_PROMPT = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


def test_sigill_in_the_child_ends_that_reply_and_the_next_request_is_answered(bundled_gguf):
    from qlora_ui.chat import GenerationSettings
    from qlora_ui.chat_llama import LlamaCppEngine

    eng = LlamaCppEngine()
    eng.load(bundled_gguf)
    first = eng.pid
    assert first != os.getpid()
    got = []
    with pytest.raises(BackendStopped, match=r"the llama\.cpp backend stopped \(signal 4, illegal instruction\)"):
        for text in eng.stream(LONG_PROMPT, GenerationSettings(max_new_tokens=400)):
            got.append(text)
            if len(got) == 3:
                os.kill(eng.pid, signal.SIGILL)
    assert 3 <= len(got) < 300  # the reply ended at the crash, not at its length
    # This process lives on, and the next request starts a new child and is answered.
    again = list(eng.stream([{"role": "user", "content": "Say hi"}], GenerationSettings(max_new_tokens=8)))
    assert again and again[-1].strip() and eng.pid != first
    eng.close()


def test_abandoned_reply_is_cancelled_in_the_child(bundled_gguf):
    """A reader that leaves stops the child generating: the next request is answered at once, not after 400
    tokens of the abandoned one."""
    from qlora_ui.chat import GenerationSettings
    from qlora_ui.chat_llama import LlamaCppEngine

    eng = LlamaCppEngine()
    eng.load(bundled_gguf)
    stream = eng.stream(LONG_PROMPT, GenerationSettings(max_new_tokens=400))
    next(stream), next(stream)
    stream.close()
    answers = eng.child.request("chat", messages=LONG_PROMPT, max_tokens=4)
    msgs = list(answers)
    assert msgs[-1]["done"] and msgs[-1]["chunks"] <= 4
    eng.close()


def test_a_child_that_dies_at_start_says_how(tmp_path, monkeypatch):
    child = LlamaCppProcess(tmp_path / "x.gguf")
    child.args = [child.args[0], "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    with pytest.raises(BackendStopped, match=r"signal 4, illegal instruction"):
        child.start(timeout=60)


def test_probe_failure_is_remembered_and_the_backend_offers_transformers_only(tmp_path, monkeypatch):
    """Where llama.cpp dies on this CPU, the probe says so once (kept per CPU and build) and the Backend choice
    falls back to transformers with the reason."""
    from qlora_ui.native import client
    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import chat
    from qlora_ui.ui.tabs.chat import LLAMA_CPP, TRANSFORMERS

    monkeypatch.setenv("QLORA_STUDIO_CACHE", str(tmp_path / "cache"))
    real_start = client.LlamaCppProcess.start
    starts = []

    def dies(self, timeout=60):
        starts.append(self.args)
        self.args = [self.args[0], "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
        return real_start(self, timeout)

    monkeypatch.setattr(client.LlamaCppProcess, "start", dies)
    ok, why = client.probe()
    assert not ok and "signal 4, illegal instruction" in why
    assert client.probe() == (ok, why) and len(starts) == 1  # remembered: no second child
    warnings = []
    monkeypatch.setattr(chat.gr, "Warning", lambda m, *a, **k: warnings.append(m))
    update = chat.check_backend(Studio(tmp_path / "runs"), LLAMA_CPP)
    assert update["choices"] == [TRANSFORMERS] and update["value"] == TRANSFORMERS
    assert "illegal instruction" in update["info"] and "illegal instruction" in warnings[0]
    assert "choices" not in chat.check_backend(Studio(tmp_path / "runs"), TRANSFORMERS)  # nothing to probe


@pytest.mark.slow
def test_crash_mid_reply_leaves_the_app_the_other_session_and_the_training_running(tmp_path, tiny_model_dir,
                                                                                    bundled_gguf, monkeypatch):
    """The issue's scenario through the Chat tab's handler: a training runs, a second session chats through
    transformers, and the llama.cpp child is killed with SIGILL mid-reply. That reply is finished by transformers
    with the message; the training and the other chat go on; the next llama.cpp request is answered."""
    from qlora_ui.jobs import create_job
    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import chat
    from tests.fault_helpers import ByName, chat_input, fast_cfg, wait_for, write_rows

    c = ByName()  # the Chat tab's components, by name

    # A finished run with an adapter, and a GGUF in its export folder (the bundled model's: a real chat model).
    runs = tmp_path / "runs"
    done = create_job(fast_cfg(tiny_model_dir, write_rows(tmp_path / "rows.jsonl"), max_steps=2, save_steps=2,
                               runs_dir=str(runs), name="chatty"))
    assert done.run_blocking() == "finished", done.error_message
    (done.run.path / "export").mkdir(exist_ok=True)
    gguf_name = "chatty-q4_1.gguf"
    shutil.copy(bundled_gguf, done.run.path / "export" / gguf_name)

    studio = Studio(runs, model_roots=[tiny_model_dir])
    job = studio.start(fast_cfg(tiny_model_dir, tmp_path / "rows.jsonl", max_steps=100_000, save_steps=100_000,
                                runs_dir=str(runs), name="long"))
    wait_for(lambda: job.step >= 2, 180, "the training's first steps")

    warnings: list[str] = []
    monkeypatch.setattr(chat.gr, "Warning", lambda m, *a, **k: warnings.append(str(m)))
    other: dict = {}

    def second_session():
        last = None
        for last in chat.send_message(studio, c, chat_input(done.run.name, "final adapter", "Hello there",  # noqa: B007
                                                            max_new_tokens=24), session="other"):
            pass
        other["history"] = last["history"]

    # Warm the llama.cpp child first (the probe and the load), so the kill lands mid-reply.
    for _ in chat.send_message(studio, c, chat_input(done.run.name, gguf_name, "Hi", max_new_tokens=8), session="me"):
        pass
    pid = studio.gguf_chat.pid
    step_before = job.step
    t = threading.Thread(target=second_session)
    shown, after_warning = None, 0
    long = chat_input(done.run.name, gguf_name, LONG_PROMPT[0]["content"], max_new_tokens=400)
    for n, out in enumerate(chat.send_message(studio, c, long, session="me")):
        shown = out
        after_warning += bool(warnings)
        if n == 3:
            os.kill(pid, signal.SIGILL)
            t.start()
    history = shown["history"]
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert any("the llama.cpp backend stopped (signal 4, illegal instruction); answering with transformers "
               "instead" in w for w in warnings), warnings
    # The reply went on after the message: transformers streamed it (the tiny model's text itself may be blank).
    assert after_warning >= 2
    t.join(300)
    assert not t.is_alive() and other["history"][-1]["role"] == "assistant"  # the other session was answered
    wait_for(lambda: job.step > step_before + 1, 180, "the training to go on after the crash")
    assert job.alive
    # The next llama.cpp request is answered by a new child.
    last = None
    for last in chat.send_message(studio, c, chat_input(done.run.name, gguf_name, "Say hi", max_new_tokens=8),  # noqa: B007
                                  session="me"):
        pass
    assert last["history"][-1]["content"].strip()  # the bundled GGUF's real model: a real reply
    assert studio.gguf_chat.pid not in (None, pid)
    studio.stop()
    wait_for(lambda: not job.alive, 120, "the training to stop")
    studio.gguf_chat.close()
