"""A run exported to GGUF battles the same run's adapter on its 4-bit base in the arena: both answers come back, the
GGUF's from llama.cpp in its child process (never this process), the adapter's from the batch server. And the
llama.cpp engine asks the machine probe once, not once per message, and again only after its child died."""

from __future__ import annotations

import os
import signal

import pytest

from tests.fault_helpers import DATA, ByName, make_cfg, nudge_adapter, wait_for

C = ByName()


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tiny_model_dir):
    """A run on the tiny model with a nudged adapter (so the adapter changes the answers), exported to GGUF Q8_0 by
    llama.cpp's own converter: (run, the GGUF's path)."""
    from qlora_ui import export as ex
    from qlora_ui.modeling import load_for_training
    from qlora_ui.runs import create_run

    runs = tmp_path_factory.mktemp("arena-gguf") / "runs"
    cfg = make_cfg(tiny_model_dir, DATA / "alpaca.json", runs_dir=str(runs), name="gguf", lora_r=4, lora_alpha=8,
                   lora_dropout=0.0)
    run = create_run(cfg)
    loaded = load_for_training(cfg.model, cfg.quantization, cfg.lora, False)
    nudge_adapter(loaded.model, seed=0, scale=0.5)
    loaded.model.save_pretrained(run.adapter_dir)
    run.write_status("finished", "made for the arena GGUF test")
    return run, ex.export_run(run, "gguf", "q8_0").path


def llama_cpp_runs_here() -> None:
    from qlora_ui.native.client import probe

    ok, why = probe()
    assert ok, f"llama.cpp does not run on this machine ({why}): `make install` builds it"


def test_a_gguf_export_battles_the_4bit_run_and_both_answer(gguf_run, tiny_model_dir):
    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import arena as tab

    llama_cpp_runs_here()
    run, gguf = gguf_run
    studio = Studio(run.path.parent, model_roots=[tiny_model_dir])
    gguf_id = f"{run.name}/{gguf.name}"
    assert {run.name, gguf_id} <= set(tab.contestant_choices(studio, C)["contestants"]["choices"])
    try:
        ask = {"contestants": [run.name, gguf_id], "source": tab.TYPED, "typed": "Tell me about ships.",
               "prompt_run": None, "file": None, "temperature": 0.0, "max_new_tokens": 12, "seed": 0}
        shown = tab.new_battle(studio, C, ask)
        battle = studio.arena.battles()[-1]
        assert shown["battle"] == battle.id and {battle.model_a, battle.model_b} == {run.name, gguf_id}
        answers = {battle.model_a: battle.answer_a, battle.model_b: battle.answer_b}
        assert answers[run.name].strip() and answers[gguf_id].strip(), answers
        # The GGUF answered from its own child process, kept warm for the next battle.
        child = studio.gguf_chat.child
        assert studio.gguf_chat.path == str(gguf.resolve()) and child is not None and child.alive()
        assert child.pid != os.getpid()
        # Greedy and seeded: a second battle on the same prompt gets the same two answers, in either order.
        tab.new_battle(studio, C, ask)
        again = studio.arena.battles()[-1]
        assert {again.model_a: again.answer_a, again.model_b: again.answer_b} == answers
        assert studio.gguf_chat.child is child  # the same warm child answered again
    finally:
        studio.gguf_chat.close()  # the child process goes with the test


def test_the_llama_cpp_engine_probes_once_and_again_after_its_child_died(gguf_run, monkeypatch):
    from qlora_ui import chat_llama
    from qlora_ui.chat import GenerationSettings

    llama_cpp_runs_here()
    _, gguf = gguf_run
    asked = []
    real = chat_llama.probe
    monkeypatch.setattr(chat_llama, "probe", lambda *a, **kw: asked.append(1) or real(*a, **kw))
    engine = chat_llama.LlamaCppEngine()
    settings = GenerationSettings(max_new_tokens=4, temperature=0.0, seed=0)
    hi = [{"role": "user", "content": "Hi"}]
    try:
        for _ in range(3):  # a message each: load, then reply
            engine.load(gguf)
            assert engine.reply(hi, settings) is not None
        assert len(asked) == 1
        first = engine.pid
        os.kill(first, signal.SIGKILL)  # the child dies between two messages
        wait_for(lambda: not engine.child.alive(), 10, "the killed child to be seen dead")
        engine.load(gguf)
        assert len(asked) == 2 and engine.child.alive() and engine.pid != first
        assert engine.reply(hi, settings) is not None
    finally:
        engine.close()
