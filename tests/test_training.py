"""Training on a tiny random Llama in NF4: loss falls, stop saves, resume continues, the generate trap."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from qlora_ui.config import RunConfig
from qlora_ui.jobs import create_job, resume_job
from qlora_ui.runs import RunDir
from tests.fault_helpers import make_cfg, write_rows

# Eight steps that learn (constant high LR, no dropout), with eval and checkpoints every four.
TRAIN = dict(name="t", max_steps=8, batch_size=4, learning_rate=5e-3, lr_scheduler="constant", warmup_ratio=0.0,
             lora_r=8, lora_alpha=16, lora_dropout=0.0, max_length=128, eval_fraction=0.1, eval_steps=4,
             save_steps=4, logging_steps=1, gradient_checkpointing=False, optimizer="adamw_torch", max_grad_norm=1.0)


@pytest.fixture()
def data_file(tmp_path) -> Path:
    return write_rows(tmp_path / "train.jsonl")


def tiny_cfg(model_dir, data_file, tmp_path, **kw) -> RunConfig:
    return make_cfg(model_dir, data_file, defaults={"runs_dir": str(tmp_path / "runs"), **TRAIN}, **kw)


def steps_of(rows):
    return [r["step"] for r in rows if "loss" in r]


def test_few_steps_finite_falling_loss_and_run_folder(tiny_model_dir, data_file, tmp_path):
    job = create_job(tiny_cfg(tiny_model_dir, data_file, tmp_path))
    assert job.run_blocking() == "finished", job.error_message
    run = job.run
    rows = run.read_metrics()
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    for r in rows:
        if "loss" in r:
            assert {"step", "loss", "lr", "epoch", "tokens_per_s"} <= set(r)
            assert r["tokens_per_s"] > 0
    assert any("eval_loss" in r for r in rows)
    assert run.read_status()["state"] == "finished"
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert (run.path / "config.yaml").is_file() and run.config().lora.lora_r == 8
    assert [c.name for c in run.checkpoints()] == ["checkpoint-4", "checkpoint-8"]
    # the dataset travels with the run
    assert Path(run.config().data.data_path).parent == run.data_dir


def test_adapter_loads_with_peft_on_the_4bit_base(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel

    from qlora_ui.modeling import load_base_model

    job = create_job(tiny_cfg(tiny_model_dir, data_file, tmp_path, max_steps=2, eval_fraction=0.0))
    assert job.run_blocking() == "finished"
    cfg = job.run.config()
    base = load_base_model(str(tiny_model_dir), cfg.model, cfg.quantization)
    model = PeftModel.from_pretrained(base, str(job.run.adapter_dir))
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 6


def test_stop_saves_adapter_and_resume_continues_the_steps(tiny_model_dir, data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, data_file, tmp_path, max_steps=30, save_steps=100, eval_steps=0)
    job = create_job(cfg).start()
    deadline = time.time() + 120
    while job.step < 3 and time.time() < deadline and job.alive:
        time.sleep(0.05)
    job.stop()
    assert job.wait(120) == "stopped", job.error_message
    run = job.run
    stopped_at = job.step
    assert 3 <= stopped_at < 30
    assert run.read_status()["state"] == "stopped"
    assert run.read_status()["message"] == f"stopped at step {stopped_at}; adapter saved from the current weights"
    assert run.has_adapter()
    assert run.last_checkpoint().name == f"checkpoint-{stopped_at}"  # stop also leaves a resumable checkpoint

    before = [r for r in run.read_metrics() if r["step"] <= stopped_at]
    resumed = resume_job(RunDir(run.path))
    assert resumed.run_blocking() == "finished", resumed.error_message
    steps = steps_of(run.read_metrics())
    assert steps == list(range(1, 31))  # no duplicate, no missing step across the resume
    # It continued from the checkpoint, not from step 0 over a truncated file: the rows up to the stop are the
    # very rows written before it (same losses, same timestamps), and the log names the checkpoint.
    assert [r for r in run.read_metrics() if r["step"] <= stopped_at] == before
    assert f"resuming from {run.checkpoints_dir / f'checkpoint-{stopped_at}'}" in run.log_path.read_text()


def test_resume_drops_metrics_after_the_checkpoint(tiny_model_dir, data_file, tmp_path):
    """A crash after checkpoint 4 but at step 6: the curve restarts cleanly from step 4."""
    cfg = tiny_cfg(tiny_model_dir, data_file, tmp_path, max_steps=6, save_steps=4, eval_steps=0)
    job = create_job(cfg)
    assert job.run_blocking() == "finished", job.error_message
    run = job.run
    import shutil

    shutil.rmtree(run.checkpoints_dir / "checkpoint-6")
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 7, "loss": 1.0')  # a torn line, as after kill -9
    assert steps_of(run.read_metrics()) == [1, 2, 3, 4, 5, 6]  # torn line tolerated
    run.write_status("running", "pretend crashed")
    st = json.loads(run.status_path.read_text())
    st["pid"] = 999_999  # a process that no longer exists
    run.status_path.write_text(json.dumps(st))
    assert run.read_status()["state"] == "interrupted"
    kept = [r for r in run.read_metrics() if r["step"] <= 4]
    again = resume_job(RunDir(run.path))
    assert again.run_blocking() == "finished"
    assert steps_of(run.read_metrics()) == [1, 2, 3, 4, 5, 6]
    assert [r for r in run.read_metrics() if r["step"] <= 4] == kept  # rows up to checkpoint-4 untouched
    assert f"resuming from {run.checkpoints_dir / 'checkpoint-4'}" in run.log_path.read_text()


def test_eval_mid_training_keeps_lora_gradients(tiny_model_dir, data_file, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class GradProbe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            # Every lora_B must get a real gradient at every step (lora_A's are zero while B is still 0).
            grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
            seen.append((state.global_step, len(grads), sum(g is None for g in grads),
                         sum(1 for g in grads if g is not None and float(g.abs().sum()) == 0.0)))

    cfg = tiny_cfg(tiny_model_dir, data_file, tmp_path, max_steps=6, eval_steps=2)
    job = create_job(cfg, extra_callbacks=[GradProbe()])
    assert job.run_blocking() == "finished", job.error_message
    evals = [r["step"] for r in job.run.read_metrics() if "eval_loss" in r]
    assert evals[:2] == [2, 4]
    assert len(seen) == 6
    for step, n, none, zero in seen:
        assert n > 0 and none == 0 and zero == 0, (step, n, none, zero)


def test_nan_loss_fails_with_a_hint_and_keeps_checkpoint(tiny_model_dir, data_file, tmp_path):
    from transformers import TrainerCallback

    class PoisonWeights(TrainerCallback):
        """Make the loss really NaN from step 3 on: a LoRA weight set to NaN."""

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    cfg = tiny_cfg(tiny_model_dir, data_file, tmp_path, max_steps=6, save_steps=2, eval_steps=0)
    job = create_job(cfg, extra_callbacks=[PoisonWeights()])
    assert job.run_blocking() == "failed"
    st = job.run.read_status()
    assert st["state"] == "failed" and "nan" in st["message"].lower() and "learning_rate" in st["message"]
    assert job.run.last_checkpoint().name == "checkpoint-2"


def test_out_of_memory_fails_with_a_hint(tiny_model_dir, data_file, tmp_path):
    from transformers import TrainerCallback

    class OOM(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg = tiny_cfg(tiny_model_dir, data_file, tmp_path, max_steps=6, save_steps=2, eval_steps=0)
    job = create_job(cfg, extra_callbacks=[OOM()])
    assert job.run_blocking() == "failed"
    msg = job.run.read_status()["message"]
    assert "out of memory" in msg.lower() and "batch_size" in msg and "gradient_checkpointing" in msg


def test_a_model_that_generated_is_never_trained(tiny_model_dir):
    """The CPU trap: generate() repacks 4-bit weights; training that object gets None LoRA grads."""
    from qlora_ui.config import LoraConfig, ModelConfig, QuantConfig
    from qlora_ui.modeling import load_base_model, mark_generated, prepare_for_training

    m = load_base_model(str(tiny_model_dir), ModelConfig(), QuantConfig())
    with torch.no_grad():
        m.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    mark_generated(m)
    with pytest.raises(RuntimeError, match="generation"):
        prepare_for_training(m, LoraConfig(), False, True)


def test_the_chat_engine_tags_every_model_it_generates_with(tiny_model_dir, data_file, tmp_path):
    """As the app does it: a model the chat engine generated with (base or adapter) is refused for training.
    If the engine stopped tagging its models, this fails."""
    from qlora_ui.chat import ChatEngine, GenerationSettings
    from qlora_ui.config import LoraConfig
    from qlora_ui.modeling import prepare_for_training

    engine = ChatEngine()
    engine.load(tiny_cfg(tiny_model_dir, data_file, tmp_path))
    engine.reply([{"role": "user", "content": "hi"}], GenerationSettings(max_new_tokens=2), None)
    with pytest.raises(RuntimeError, match="generation"):
        prepare_for_training(engine.model, LoraConfig(), False, True)


def test_chat_engine_and_training_use_separate_instances(tiny_model_dir, data_file, tmp_path):
    """Chat generating in the same process must not break a later training's gradients."""
    from qlora_ui.chat import ChatEngine, GenerationSettings

    cfg = tiny_cfg(tiny_model_dir, data_file, tmp_path, max_steps=2, eval_fraction=0.0)
    engine = ChatEngine()
    engine.load(cfg)
    engine.reply([{"role": "user", "content": "hi"}], GenerationSettings(max_new_tokens=3), None)
    from transformers import TrainerCallback

    nones = []

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            nones.append(sum(p.grad is None for n, p in model.named_parameters() if p.requires_grad))

    job = create_job(cfg, extra_callbacks=[Probe()])
    assert job.run_blocking() == "finished"
    assert nones == [0, 0]


def test_a_job_trains_through_every_fast_path(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """docs/performance.md's speed comes from paths whose loss equals the plain one (tests/test_batching.py), so a
    job that fell back to the plain step would train just the same: spy on the step itself. Every batch is packed
    (one sequence, per-row position_ids, no attention mask, no padding), attention takes the per-row branch, the
    loss is the labelled-positions head under bf16 autocast, and the frozen weights are bf16."""
    from qlora_ui import batching

    seen = {"batches": [], "row_lengths": [], "per_row": 0, "packed_attention": 0}
    real_collator, real_loss, real_attn = batching.make_collator, batching.labelled_loss, batching.per_row_sdpa

    def collator(tokenizer, padding_free):
        inner = real_collator(tokenizer, padding_free)

        def collate(features):
            seen["row_lengths"].append(sum(len(f["input_ids"]) for f in features))
            return inner(features)
        return collate

    def loss(model, inputs, num_items_in_batch=None, autocast_dtype=None):
        emb = model.get_base_model().get_input_embeddings().weight
        seen["batches"].append(({k: v.detach().clone() for k, v in inputs.items()}, autocast_dtype, emb.dtype))
        return real_loss(model, inputs, num_items_in_batch, autocast_dtype)

    def attn(module, query, key, value, attention_mask, *a, position_ids=None, **kw):
        seen["per_row"] += 1
        seen["packed_attention"] += position_ids is not None and attention_mask is None and query.shape[0] == 1
        return real_attn(module, query, key, value, attention_mask, *a, position_ids=position_ids, **kw)

    monkeypatch.setattr(batching, "make_collator", collator)
    monkeypatch.setattr(batching, "labelled_loss", loss)
    monkeypatch.setattr(batching, "per_row_sdpa", attn)
    cfg = tiny_cfg(tiny_model_dir, data_file, tmp_path, max_steps=2, eval_fraction=0.0, save_steps=100)
    assert cfg.training.padding_free and cfg.training.labelled_head and cfg.training.mixed_precision
    assert cfg.quantization.compute_dtype == "bf16"
    job = create_job(cfg)
    assert job.run_blocking() == "finished", job.error_message
    assert len(seen["batches"]) == 2
    for inputs, autocast_dtype, frozen in seen["batches"]:
        ids, pos = inputs["input_ids"], inputs["position_ids"]
        assert ids.shape[0] == 1 and pos.shape == ids.shape and "attention_mask" not in inputs
        starts = (pos[0] == 0).nonzero().flatten().tolist()
        assert len(starts) == 4 and starts[0] == 0  # the batch's 4 rows, back to back
        assert autocast_dtype == torch.bfloat16 and frozen == torch.bfloat16
    # Not one padding token: each packed sequence is exactly as long as the rows collated into it (the Trainer
    # may collate one batch ahead of the steps it runs).
    made = list(seen["row_lengths"])
    for inputs, _, _ in seen["batches"]:
        made.remove(inputs["input_ids"].shape[1])
    # 2 layers x 2 steps (no gradient checkpointing: the backward does not call attention again), all per row
    assert seen["per_row"] == 4 and seen["packed_attention"] == 4
