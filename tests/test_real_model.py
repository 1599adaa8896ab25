"""The real bundled SmolLM2-135M-Instruct: GGUF -> bf16 cache -> NF4 QLoRA with falling loss; the adapter reloads."""

from __future__ import annotations

import json

import pytest

from tests.fault_helpers import cli


@pytest.mark.slow
def test_bundled_model_learns_in_10_steps_keeps_lora_gradients_through_eval_and_reloads(tmp_path, bundled_dir):
    """One real run for three checks (each real-model run costs about a minute on 2 cores): the loss falls, an
    evaluation mid-training leaves every LoRA gradient in place, and the adapter reloads with plain peft.

    The gradients: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first no-grad eval forward;
    the packed kernel has no backward, so LoRA gradients silently vanished after the first evaluation."""
    import torch
    from peft import PeftModel
    from transformers import TrainerCallback

    from qlora_ui.config import load_preset
    from qlora_ui.data import render_chat
    from qlora_ui.jobs import create_job
    from qlora_ui.modeling import load_base_model, load_tokenizer

    zero_counts = []

    class GradProbe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
            zero_counts.append(sum(1 for g in grads if g is None or float(g.abs().sum()) == 0.0))

    assert (bundled_dir / "model.safetensors").is_file() and (bundled_dir / "config.json").is_file()
    cfg = load_preset("cpu-quickstart").updated(max_steps=10, save_steps=10, eval_steps=5, eval_fraction=0.02,
                                                  runs_dir=str(tmp_path / "runs"), batch_size=4)
    job = create_job(cfg, extra_callbacks=[GradProbe()])
    assert job.run_blocking() == "finished", job.error_message
    assert [r["step"] for r in job.run.read_metrics() if "eval_loss" in r][:1] == [5]
    assert zero_counts == [0] * 10
    assert job.footprint_bytes > 0
    losses = [r["loss"] for r in job.run.read_metrics() if "loss" in r]
    assert len(losses) == 10 and all(0 < x < 20 for x in losses)
    # It learns: the pirate answers' loss falls within ten steps at this learning rate (means of 3 steps, as
    # single batches of 4 random rows are noisy).
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses

    # The adapter loads with plain peft on a fresh 4-bit base and generates.
    base = load_base_model(str(bundled_dir), cfg.model, cfg.quantization)
    assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    model = PeftModel.from_pretrained(base, str(job.run.adapter_dir))
    tok = load_tokenizer(str(bundled_dir), cfg.model)
    text = render_chat(tok, [{"role": "user", "content": "How are you?"}], add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip()
    adapter_cfg = json.loads((job.run.adapter_dir / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == cfg.lora.lora_r
    assert "lm_head" not in str(adapter_cfg["target_modules"])


@pytest.mark.slow
def test_cli_chat_prints_a_reply_from_the_base(bundled_dir):
    out = cli("chat", "--prompt", "What is the capital of France?", "--base-only", "--max-new-tokens", "12",
              timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
