"""Preference tuning (DPO) on the tiny random Llama: it learns, its reference is the base with the adapter off, one
base in memory, stop/resume continues the curve, every preference format is read, bad files are refused early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_ui.config import DataConfig
from qlora_ui.data.preference import check_preference_file, inspect_preferences, prepare_preferences
from qlora_ui.errors import DataError
from tests.fault_helpers import LORA_FP32, cli, fast_cfg, make_cfg, nudge_adapter

TOPICS = ["the sea", "a ship", "gold", "the wind", "a map", "the moon", "a parrot", "rum", "a storm", "an island"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def separable_pairs(n: int = 40) -> list[dict]:
    """Easy to tell apart: the chosen answer is always pirate talk, the rejected always a refusal."""
    return [{"prompt": f"Tell me about {TOPICS[i % 10]} ({i}).", "chosen": f"Arr! {TOPICS[i % 10]} be grand, matey.",
             "rejected": f"Sorry, I cannot help with {TOPICS[i % 10]}."} for i in range(n)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", separable_pairs())


def dpo_cfg(model_dir, data, runs_dir, **kw):
    # A short system prompt keeps SmolLM2's long default one out of every row: shorter steps.
    return fast_cfg(model_dir, data, runs_dir=str(runs_dir), learning_rate=5e-3, beta=0.1, max_length=128,
                    system_prompt="Answer.", **{"method": "dpo", "max_steps": 10, "save_steps": 5, **kw})


@pytest.fixture(scope="module")
def dpo_runs(tiny_model_dir, pairs_file, tmp_path_factory):
    """One uninterrupted 10-step DPO run, and one stopped at step 5 then resumed to 10 (steps cost seconds on a
    shared 2-core machine, so 10, not 20)."""
    from qlora_ui.jobs import create_job, resume_job

    runs = tmp_path_factory.mktemp("dpo-runs")
    full = create_job(dpo_cfg(tiny_model_dir, pairs_file, runs, name="full"))
    assert full.run_blocking() == "finished", full.error_message

    holder = {}

    def stop_at_5(event, row):
        if event == "metrics" and row.get("step") == 5:
            holder["job"].stop()

    part = create_job(dpo_cfg(tiny_model_dir, pairs_file, runs, name="part"), listener=stop_at_5)
    holder["job"] = part
    assert part.run_blocking() == "stopped", part.error_message
    resumed = resume_job(part.run)
    assert resumed.run_blocking() == "finished", resumed.error_message
    return full, part, resumed


def test_dpo_learns(dpo_runs):
    full, _, _ = dpo_runs
    rows = [r for r in full.run.read_metrics() if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))
    first, last = rows[:3], rows[-3:]
    assert sum(r["loss"] for r in last) < 0.8 * sum(r["loss"] for r in first)
    acc = [r["reward_accuracy"] for r in rows]
    assert sum(acc[-3:]) / 3 > sum(acc[:3]) / 3 and sum(acc[-3:]) / 3 >= 0.9
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    assert all(k in rows[-1] for k in ("reward_chosen", "reward_rejected"))
    # The same curves in TensorBoard, under TRL's names.
    from qlora_ui.tboard import read_scalars

    tags = read_scalars(full.run.path)
    assert {"train/loss", "train/rewards/accuracies", "train/rewards/margins"} <= set(tags)
    assert json.loads((full.run.adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not (full.run.adapter_dir / "ref").exists()


def test_stopped_dpo_run_resumes_on_the_same_curve(dpo_runs):
    full, part, resumed = dpo_runs
    assert part.run.path == resumed.run.path
    rows = [r for r in resumed.run.read_metrics() if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))  # no step twice, none missing
    ref = {r["step"]: r["loss"] for r in full.run.read_metrics() if "loss" in r}
    for r in rows:  # the resumed half continues the uninterrupted run's curve
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=0.05, abs=0.02), r["step"]
    assert resumed.run.read_status()["state"] == "finished"


def _trainer(model_dir, data, tmp_path, **kw):
    """A DPO trainer as the job builds it (fp32, no dropout: log-probs compare exactly), not trained."""
    from qlora_ui.modeling import load_for_training, resolve_init_adapter
    from qlora_ui.preference_training import build_trainer

    cfg = make_cfg(model_dir, data, defaults=LORA_FP32, method="dpo", max_length=128, mixed_precision=False,
                   gradient_checkpointing=False, system_prompt="Answer.", runs_dir=str(tmp_path), **kw)
    init = resolve_init_adapter(cfg.lora.init_adapter, cfg.runs_dir)
    loaded = load_for_training(cfg.model, cfg.quantization, cfg.lora, False, init)
    data = prepare_preferences(cfg.data, loaded.tokenizer, seed=0)
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, use_cpu=True,
                report_to="none", bf16=False, fp16=False, save_strategy="no", logging_steps=1)
    return build_trainer(cfg, loaded, data.train, None, args, []), cfg


def _base_logps(cfg, batch):
    """Completion log-probs of a freshly loaded 4-bit base, no PEFT at all: computed apart from the trainer."""
    import torch

    from qlora_ui.modeling import load_base_model

    base = load_base_model(cfg.model.base_model, cfg.model, cfg.quantization)
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (lp * batch["completion_mask"][:, 1:]).sum(1), base


def _policy_logps(trainer, batch):
    import torch

    model = trainer.model
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(1)


def count_4bit(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_reference_is_the_base_with_the_adapter_off_and_one_base_in_memory(tiny_model_dir, pairs_file, tmp_path):
    import torch

    from qlora_ui.preference_training import ref_uses_base

    trainer, cfg = _trainer(tiny_model_dir, pairs_file, tmp_path)
    assert trainer.ref_model is None and ref_uses_base(trainer)
    # Train the adapter away from its no-op start, so "adapter on" and "adapter off" differ.
    nudge_adapter(trainer.model, seed=1, scale=0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, batch)
    base_lp, base = _base_logps(cfg, batch)
    assert torch.allclose(torch.cat([ref_c, ref_r]).float(), base_lp, atol=1e-3), (ref_c, ref_r, base_lp)
    assert not torch.allclose(_policy_logps(trainer, batch).float(), base_lp, atol=1e-2)
    # One copy of the base: the trainer's model holds exactly the base's 4-bit layers (2 layers x 7), no more.
    assert count_4bit(trainer.model) == count_4bit(base) == 14


def test_dpo_from_an_sft_adapter_keeps_it_as_the_frozen_reference(dpo_runs, pairs_file, tmp_path):
    import torch

    from qlora_ui.preference_training import ref_uses_base

    full, _, _ = dpo_runs  # any finished run's adapter stands in for an SFT one
    trainer, _ = _trainer(full.cfg.model.base_model, pairs_file, tmp_path, init_adapter=str(full.run.path))
    assert not ref_uses_base(trainer) and trainer.ref_model is None
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)
    assert count_4bit(trainer.model) == 14
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch)).float()
    # At the start the reference is the policy (the SFT model), not the bare base.
    assert torch.allclose(ref, _policy_logps(trainer, batch).float(), atol=1e-3)


# ---- formats ----

MSG = [{"role": "user", "content": "What is 2+2?"}]
FORMATS = {
    "standard strings": {"prompt": "What is 2+2?", "chosen": "Arr, 4!", "rejected": "5"},
    "standard messages": {"prompt": MSG, "chosen": [{"role": "assistant", "content": "Arr, 4!"}],
                          "rejected": [{"role": "assistant", "content": "5"}]},
    "hh text": {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: Arr, 4!",
                "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"},
    "hh messages": {"chosen": MSG + [{"role": "assistant", "content": "Arr, 4!"}],
                    "rejected": MSG + [{"role": "assistant", "content": "5"}]},
    "ultrafeedback": {"prompt": "What is 2+2?", "prompt_id": "x",
                      "chosen": MSG + [{"role": "assistant", "content": "Arr, 4!"}],
                      "rejected": MSG + [{"role": "assistant", "content": "5"}],
                      "messages": MSG + [{"role": "assistant", "content": "Arr, 4!"}],
                      "score_chosen": 9.0, "score_rejected": 2.0},
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_preference_format_is_read(name, tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "p.jsonl", [FORMATS[name]] * 3)
    report = inspect_preferences(DataConfig(data_path=str(f), max_length=256), tokenizer)
    assert report.rows_kept == 3
    p = report.pair
    assert p["prompt"][-1] == {"role": "user", "content": "What is 2+2?"}
    assert p["chosen"] == [{"role": "assistant", "content": "Arr, 4!"}]
    assert p["rejected"] == [{"role": "assistant", "content": "5"}]
    assert p["tokens"]["chosen"] > 0 and p["tokens"]["rejected"] > 0 and p["tokens"]["prompt"] > 0
    assert "rejected (" in report.summary()


def test_rows_are_dropped_with_reasons(tmp_path, tokenizer):
    rows = separable_pairs(4) + [{"prompt": "Hi", "chosen": "Same", "rejected": "Same"},
                                 {"prompt": "", "chosen": "A", "rejected": "B"},
                                 {"prompt": "Long", "chosen": "word " * 400, "rejected": "B"}]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    report = inspect_preferences(DataConfig(data_path=str(f), max_length=128), tokenizer)
    assert report.rows_kept == 4
    assert report.dropped == {"identical": 1, "empty": 1, "too_long": 1}


# ---- bad files: one message naming the column, before a run folder ----

BAD = {
    "identical": ([{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(3)], "'chosen' equals"),
    "no rejected": ([{"prompt": f"q{i}", "chosen": "a"} for i in range(3)], "column 'rejected' is missing"),
    "sft rows": ([{"instruction": f"q{i}", "output": "a"} for i in range(3)], "'chosen' and 'rejected' are missing"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_preference_files_are_refused_before_a_run_folder(name, tmp_path, tiny_model_dir):
    from qlora_ui.jobs import create_job

    rows, words = BAD[name]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        check_preference_file(DataConfig(data_path=str(f)))
    assert words in str(e.value) and "\n" not in str(e.value)
    runs = tmp_path / "runs"
    with pytest.raises(DataError, match=words.replace("'", ".")):
        create_job(dpo_cfg(tiny_model_dir, f, runs))
    assert not runs.exists() or not any(runs.iterdir())


def test_cli_refuses_a_bad_preference_file_with_exit_2(tmp_path, tiny_model_dir):
    f = write_jsonl(tmp_path / "bad.jsonl", BAD["no rejected"][0])
    runs = tmp_path / "runs"
    p = cli("train", "--model", tiny_model_dir, "--data", f, "--method", "dpo", "--runs-dir", runs, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "column 'rejected' is missing" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_method_and_beta_are_validated():
    from qlora_ui.config import ConfigError, RunConfig

    with pytest.raises(ConfigError) as e:
        RunConfig().updated(method="ppo", beta=0)
    assert "method" in str(e.value)
    with pytest.raises(ConfigError, match="beta"):
        RunConfig().updated(beta=0).validate()
    with pytest.raises(ConfigError, match="init_adapter"):
        RunConfig().updated(init_adapter="x", lora_init="gaussian").validate()


def test_data_panel_shows_a_preference_pair(tokenizer, pairs_file):
    from qlora_ui.config import RunConfig
    from qlora_ui.ui.tabs.model_data import preference_view

    cfg = RunConfig().updated(data_path=str(pairs_file), method="dpo", max_length=256)
    summary, _, fig, example = preference_view(cfg, tokenizer)
    assert "preference (standard)" in summary and "40 kept" in summary
    assert "Chosen (preferred)" in example and "Rejected" in example and "Arr!" in example and "Sorry" in example
    assert example.count(" tokens") == 3 and fig is not None


def test_planner_counts_two_sequences_per_preference_row():
    import dataclasses

    from qlora_ui.config import RunConfig
    from qlora_ui.memory import PlanSettings, activation_bytes, chunked_head_bytes
    from qlora_ui.shapes import resolve_shape

    shape = resolve_shape("llama-7b")
    sft = PlanSettings.from_config(RunConfig().updated(batch_size=4, max_length=512))
    dpo = PlanSettings.from_config(RunConfig().updated(batch_size=4, max_length=512, method="dpo"))
    assert dpo.preference and not sft.preference
    assert activation_bytes(shape, dpo, "qlora") > 1.5 * activation_bytes(shape, sft, "qlora")
    # the same as an SFT step of twice the rows: chosen and rejected are one batch (SFT's recompute cache aside:
    # DPO keeps peft's own layers, so it has none)
    # (TRL switches dropout off for preference methods, so no LoRA dropout masks either)
    twice = PlanSettings.from_config(RunConfig().updated(batch_size=8, max_length=512, lora_dropout=0.0),
                                     recompute_cache=0)
    assert dpo.recompute_cache == 0 and sft.recompute_cache == 256 * 2**20
    orpo = PlanSettings.from_config(RunConfig().updated(batch_size=4, max_length=512, method="orpo"))
    assert not orpo.chunked_head and activation_bytes(shape, orpo, "qlora") == activation_bytes(shape, twice, "qlora")
    # DPO's head is TRL's tiled one (never the whole logits): a tile of 4,096 tokens here, not all 4,096 x 2 rows.
    # On a GPU it needs far less than full logits; on the CPU its torch fallback keeps five fp32 copies of the tile
    # (bench/preference_memory.py measured them), which can be more than the full logits' phase.
    assert dpo.chunked_head
    t, full = 8 * 512, 8 * 512 * shape.vocab * 14
    gpu = chunked_head_bytes(dataclasses.replace(dpo, device="cuda"), t, shape.hidden, shape.vocab)
    cpu = chunked_head_bytes(dataclasses.replace(dpo, device="cpu"), t, shape.hidden, shape.vocab)
    assert gpu < full / 2 and cpu > 2 * gpu
    assert chunked_head_bytes(dpo, 2 * t, shape.hidden, shape.vocab) < 1.2 * chunked_head_bytes(
        dpo, t, shape.hidden, shape.vocab)  # more tokens than a tile: one tile at a time (+ their fp32 grads)


def test_preference_pairs_given_to_sft_say_which_method_reads_them(tmp_path, tiny_model_dir, pairs_file):
    from qlora_ui.jobs import create_job

    runs = tmp_path / "runs"
    with pytest.raises(DataError, match="set method dpo or orpo"):
        create_job(fast_cfg(tiny_model_dir, pairs_file, runs_dir=str(runs)))
    assert not runs.exists() or not any(runs.iterdir())


def test_orpo_trains_on_the_same_engine(tiny_model_dir, pairs_file, tmp_path):
    """ORPO is TRL-experimental (trl.experimental.orpo): checked to run with the pinned versions, no reference."""
    from qlora_ui.jobs import create_job

    job = create_job(dpo_cfg(tiny_model_dir, pairs_file, tmp_path / "runs", method="orpo", max_steps=2,
                             save_steps=2))
    assert job.run_blocking() == "finished", job.error_message
    rows = [r for r in job.run.read_metrics() if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(k in rows[-1] for k in ("nll_loss", "log_odds_ratio", "reward_accuracy"))
    assert (job.run.adapter_dir / "adapter_model.safetensors").is_file()


def test_check_data_reads_a_pairs_file_as_dpo_would(tmp_path, tiny_model_dir):
    """`check-data` has no method setting: a file of pairs (no SFT format reads it) is reported as preference data,
    with a note naming the methods that train it, instead of "Cannot tell the dataset format"."""
    f = write_jsonl(tmp_path / "p.jsonl", separable_pairs(6))
    p = cli("check-data", f, "--base-model", tiny_model_dir, "--max-length", "128")
    assert p.returncode == 0, p.stderr
    assert "Format: preference (standard)" in p.stdout and "Rows: 6 read, 6 kept" in p.stdout
    assert "chosen (" in p.stdout and "rejected (" in p.stdout and "method dpo or orpo" in p.stdout
    bad = write_jsonl(tmp_path / "same.jsonl", BAD["identical"][0])
    p = cli("check-data", bad, "--base-model", "none")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "identical" in p.stderr and "'chosen' and 'rejected' are the same answer" in p.stderr
