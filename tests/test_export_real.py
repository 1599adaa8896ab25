"""Export of a short run on the real bundled SmolLM2-135M: merged folder and GGUF Q8_0, checked against each other."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qlora_ui import export as ex
from tests.fault_helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from qlora_ui.config import load_preset
    from qlora_ui.jobs import create_job

    tmp = tmp_path_factory.mktemp("real-export")
    cfg = load_preset("cpu-quickstart").updated(max_steps=4, batch_size=4, save_steps=4, eval_steps=0,
                                                runs_dir=str(tmp / "runs"), name="pirate")
    job = create_job(cfg)
    assert job.run_blocking() == "finished", job.error_message
    return job.run


@pytest.fixture(scope="module")
def exported(real_run):
    merged = ex.export_run(real_run, "merged")
    gguf = ex.export_run(real_run, "gguf", "q8_0")
    return merged, gguf


def test_merged_folder_loads_without_peft(exported):
    merged, _ = exported
    code = ("import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(merged.path)!r})\n"
            f"t = AutoTokenizer.from_pretrained({str(merged.path)!r})\n"
            "assert t.chat_template and 'peft' not in sys.modules, sorted(k for k in sys.modules if 'peft' in k)\n"
            "print(type(m).__name__, m.dtype)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LlamaForCausalLM", "torch.bfloat16"]


def test_gguf_next_token_argmax_matches_the_merged_model(exported, real_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, gguf = exported
    assert gguf.path.name == f"{real_run.name}-q8_0.gguf" and gguf.path.parent == real_run.path / "export"
    mf = gguf.modelfile.read_text()
    assert f"FROM ./{gguf.path.name}" in mf and "<|im_start|>{{" not in mf and "{{ .Content }}<|im_end|>" in mf

    tok = AutoTokenizer.from_pretrained(merged.path)
    # The merged weights computed in float32, as llama.cpp does: bf16 activations alone move ~3% of the argmaxes
    # (an f16 GGUF agrees with the fp32 computation at every position; see docs/export.md).
    model = AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32).eval()
    from qlora_ui.native.client import LlamaCppProcess

    llm = LlamaCppProcess(gguf.path, n_ctx=512, logits_all=True)  # a child process: a fault fails this test only
    llm.start()
    from qlora_ui.data import render_chat

    prompts = ["Where is the treasure buried?", "What is your favourite food?", "Tell me about the sea.",
               "Do you like computers?", "Who are you?", "How old are you?"]
    same = total = clear_same = clear_total = 0
    for p in prompts:
        text = render_chat(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": "Arr, matey!"}])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        hf = logits.argmax(-1).tolist()
        gg = llm.call("argmax", tokens=ids)
        top = logits.topk(3, -1)
        for i, (a, b) in enumerate(zip(hf, gg)):
            total += 1
            same += a == b
            # Q8_0 moves logits by tenths: where the merged model's first choice leads its second by half a logit
            # or more, the GGUF must pick it too; where it does not, the GGUF may pick a close second (a broken
            # quantizer would pick anything).
            if float(top.values[i, 0] - top.values[i, 1]) >= 0.5:
                clear_total += 1
                clear_same += a == b
            assert b in top.indices[i].tolist(), (p, i, b)
    llm.close()
    assert total > 200 and clear_total > 150
    # Measured: 245/254 (96.5%) on one adapter, 227/254 (89%) on another trained as well (the six prompts share a
    # system-prompt prefix, so one near tie there counts six times); at clear positions, every one agreed.
    assert clear_same / clear_total >= 0.98, f"GGUF Q8_0 agrees at {clear_same}/{clear_total} clear positions"
    assert same / total >= 0.85, f"GGUF Q8_0 agrees with the merged model at {same}/{total} positions"
