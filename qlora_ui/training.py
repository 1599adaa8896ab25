"""The training job: one object owns the thread, the stop event, the metrics and the caught exception.

`TrainingJob.run_blocking()` trains here (the CLI); `TrainingJob.start()` runs the same in a thread (the UI). A job
is made by jobs.create_job / jobs.resume_job, which check everything first. The engine reports through the run
folder (status.json, metrics.jsonl, train.log) and an optional listener callback; it knows nothing about Gradio.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import UserError
from .runs import RunDir

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]  # (event, payload): "metrics", "status", "log"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf. Not a UserError: like running out of memory it ends a run that was accepted, and the
    run's status says what to change (failure_hint); the CLI exits 1 for it as for any failed run."""


def failure_hint(exc: BaseException) -> str:
    """One actionable sentence for the common ways a run dies."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if "out of memory" in text or isinstance(exc, MemoryError):
        return ("Out of memory: lower batch_size (raise grad_accum to keep the effective batch), turn on "
                "gradient_checkpointing, shorten max_length, or use paged_adamw_8bit. To go on from the last "
                "checkpoint: Retry smaller in the Train tab, or train --resume RUN --batch-size B --grad-accum A.")
    if isinstance(exc, TrainingDiverged) or "nan" in text:
        return "The loss became NaN/inf: lower the learning_rate (e.g. 1e-4), keep max_grad_norm at 0.3, use bf16."
    if isinstance(exc, (UserError, ValueError)):
        return "Fix the setting named above and start again."
    return "See train.log in the run folder for details; resume continues from the last checkpoint."


def _make_callback(job: TrainingJob):
    from transformers import TrainerCallback

    class JobCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            job.max_steps = state.max_steps
            job._session_start_step = state.global_step
            job._t_start = time.time()
            job._last_log = (time.time(), state.num_input_tokens_seen or 0)
            job.run.write_status("running", "training", max_steps=state.max_steps, step=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            job.step = state.global_step
            if job.should_stop(args.world_size):
                # Save a resumable checkpoint at the stop point too, not only the adapter.
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss} at step {state.global_step}")
            now = time.time()
            tokens = state.num_input_tokens_seen or 0
            t_prev, tok_prev = job._last_log
            job._last_log = (now, tokens)
            done = state.global_step - job._session_start_step
            elapsed = now - job._t_start
            eta = (state.max_steps - state.global_step) * elapsed / done if done > 0 else None
            row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                                   "world_size": args.world_size}
            if job.cfg.training.method != "sft":
                from .preference_training import metric_row

                row.update(metric_row(logs))  # rewards, margins, reward accuracy (eval_ ones at eval steps)
            if "eval_loss" in logs:
                row["eval_loss"] = logs["eval_loss"]
            else:
                if "train_loss" in logs:  # the end-of-training summary row: not a log step
                    return
                # num_input_tokens_seen is already summed over every process by the Trainer.
                row.update(loss=loss, lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                           tokens_per_s=(tokens - tok_prev) / max(now - t_prev, 1e-6),
                           tokens_seen=tokens)
            row.update(elapsed_s=round(job.elapsed_before + elapsed, 2),
                       eta_s=None if eta is None else round(eta, 1), time=now, max_steps=state.max_steps)
            from .modeling import memory_now

            row.update({k: round(v, 3) for k, v in memory_now().items()})
            job._record(row)

        def on_save(self, args, state, control, **kw):
            job.run.write_status("running", f"checkpoint saved at step {state.global_step}",
                                 step=state.global_step, last_checkpoint=state.global_step)

    return JobCallback()


class RankView(RunDir):
    """The run folder as a non-zero rank of a multi-process run sees it: readable, never written (rank 0 writes
    the run folder; the Trainer itself writes only its per-rank RNG state into checkpoints)."""

    def write_status(self, *a, **kw) -> None:
        pass

    def write_config(self, *a, **kw) -> None:
        pass

    def append_metrics(self, *a, **kw) -> None:
        pass

    def truncate_metrics(self, *a, **kw) -> None:
        pass


class TrainingJob:
    """A training run: `run_blocking()` trains here, `start()` in a thread, `stop()` asks it to end and save.

    The constructor only stores: jobs.create_job and jobs.resume_job check the config, model and data and make the
    run folder first. `rank` is this process's rank in a multi-process run (qlora_ui.launch); only rank 0 writes
    the run folder.
    """

    def __init__(self, cfg: RunConfig, run: RunDir, *, resume: bool = False, listener: Listener | None = None,
                 extra_callbacks: list | None = None, rank: int = 0):
        self.cfg = cfg
        self.run = run
        self.resume = resume
        self.rank = rank
        self.listener = listener
        self.extra_callbacks = extra_callbacks or []
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.metrics: list[dict[str, Any]] = self.run.read_metrics() if resume else []
        self.error: BaseException | None = None
        self.error_message = ""
        self.state = "created"
        self.phase = "waiting"
        self.step = 0
        self.max_steps = 0
        self.elapsed_before = max((r.get("elapsed_s", 0) for r in self.metrics), default=0.0)
        self._t_start = time.time()
        self._session_start_step = 0
        self._last_log = (time.time(), 0)
        self.report = None  # the data report, once the dataset is read
        self.footprint_bytes = 0
        self.load_seconds = 0.0
        self.tboard = None  # TensorBoard events beside metrics.jsonl, opened when training starts

    # ---- control ----
    def start(self) -> TrainingJob:
        self.thread = threading.Thread(target=self.run_blocking, name=f"train-{self.run.name}", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def should_stop(self, world_size: int = 1) -> bool:
        """Whether to end at this step. Every process of a multi-process run must end at the same step (one left
        training would wait forever for the others' gradients), so the ranks agree through one all-reduce."""
        stop = self.stop_event.is_set()
        if world_size <= 1:
            return stop
        import torch
        import torch.distributed as dist
        from accelerate import PartialState

        flag = torch.tensor([1.0 if stop else 0.0], device=PartialState().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.stop_event.set()  # this rank now knows too (the final eval and the state depend on it)
        return bool(flag.item())

    def wait(self, timeout: float | None = None) -> str:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.state

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() or self.state == "running"

    def progress(self) -> dict[str, Any]:
        last = next((r for r in reversed(self.metrics) if "loss" in r), {})
        return {"state": self.state, "phase": self.phase, "step": self.step, "max_steps": self.max_steps,
                "elapsed_s": last.get("elapsed_s"), "eta_s": last.get("eta_s"), "loss": last.get("loss"),
                "run": self.run.name, "message": self.error_message}

    # ---- internals ----
    def _record(self, row: dict[str, Any]) -> None:
        self.metrics.append(row)
        self.run.append_metrics(row)
        if self.tboard is not None:
            self.tboard.write(row)
        parts = [f"step {row['step']}/{row.get('max_steps')}"]
        for k in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "reward_accuracy", "reward_margin",
                  "eval_reward_accuracy"):
            if row.get(k) is not None:
                parts.append(f"{k} {row[k]:.4g}")
        log.info(" | ".join(parts))
        self._emit("metrics", row)

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        if self.listener is not None:
            try:
                self.listener(event, payload)
            except Exception:  # noqa: BLE001 - a broken listener (closed UI) must not kill training
                log.exception("listener failed on %s", event)

    def _sharded(self) -> bool:
        """FSDP / ZeRO-3 flatten the frozen weights into shards: the fused LoRA layers read them whole."""
        name = self.cfg.training.accelerate_config
        if not name or self.cfg.training.processes <= 1:
            return False
        from .accelerate_configs import SHARDED, strategy_of

        return strategy_of(name) in SHARDED

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        log.info(phase)
        self.run.write_status("running", phase)
        self._emit("status", {"state": "running", "message": phase})

    def run_blocking(self) -> str:
        if self.rank == 0:
            handler = logging.FileHandler(self.run.log_path, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        else:  # other ranks' warnings go to the launcher's log (launch.log), never into train.log
            handler = logging.StreamHandler()
            handler.setLevel(logging.WARNING)
            handler.setFormatter(logging.Formatter(f"[rank {self.rank}] %(levelname)s %(message)s"))
        pkg_log = logging.getLogger("qlora_ui")
        pkg_log.addHandler(handler)
        if pkg_log.level == logging.NOTSET or pkg_log.level > logging.INFO:
            pkg_log.setLevel(logging.INFO)
        self.state = "running"
        try:
            self._train()
        except BaseException as e:  # noqa: BLE001 - every failure must end up in status.json, not kill the app
            self.error = e
            hint = failure_hint(e)
            self.error_message = f"{type(e).__name__}: {str(e)[:500]}\n{hint}"
            log.error("training failed: %s", self.error_message)
            # The stack goes to train.log and the app console (INFO), never to a CLI user's terminal.
            log.info("traceback:\n%s", traceback.format_exc())
            self.state = "failed"
            self.run.write_status("failed", self.error_message, step=self.step)
            self._emit("status", {"state": "failed", "message": self.error_message})
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            if self.tboard is not None:
                self.tboard.close()
            pkg_log.removeHandler(handler)
            handler.close()
        return self.state

    def _train(self) -> None:
        from .imports import ml_libraries

        ml_libraries()  # this thread may be the first to import transformers (qlora_ui/imports.py says why)
        from .data import prepare_dataset
        from .modeling import load_for_training, trainable_parameters

        cfg, tr = self.cfg, self.cfg.training
        self.run.write_status("running", "starting", started=time.time())
        ckpt = None
        if self.resume:
            ckpt = self.run.last_checkpoint()
            step = RunDir.checkpoint_step(ckpt)
            self.run.truncate_metrics(step)  # no duplicate steps in the curve after resume
            self.metrics = self.run.read_metrics()
            self.elapsed_before = max((r.get("elapsed_s", 0) for r in self.metrics), default=0.0)
            log.info("resuming from %s", ckpt or "the start (no checkpoint was saved)")
        from .tboard import TensorBoardLog

        if self.rank == 0:
            self.tboard = TensorBoardLog(self.run.path, resume_step=(step + 1) if self.resume else None)

        # bitsandbytes quantizes each weight as it loads: the load is the quantizing step.
        self._set_phase("loading model" + (f" and quantizing it to 4-bit {cfg.quantization.quant_type.upper()}"
                                           if cfg.quantization.load_in_4bit else ""))
        from transformers import set_seed

        # get_peft_model draws the LoRA A init from torch's global RNG: seed it here, or two runs with one
        # seed in the same process (a UI session, a benchmark) start from different adapters.
        set_seed(tr.seed)
        from .loftq import PHASE as loftq_phase
        from .modeling import resolve_init_adapter

        init = resolve_init_adapter(cfg.lora.init_adapter, cfg.runs_dir)
        if init is not None:
            log.info("starting from the adapter in %s", init)
        # LoftQ, if on, reports "LoftQ layer i/N" as phases; only while this job loads (a CLI run reuses the thread).
        heard = loftq_phase.set(self._set_phase)
        try:
            loaded = load_for_training(cfg.model, cfg.quantization, cfg.lora, tr.gradient_checkpointing, init)
        finally:
            loftq_phase.reset(heard)
        self.footprint_bytes, self.load_seconds = loaded.footprint_bytes, loaded.load_seconds
        trainable, total = trainable_parameters(loaded.model)
        log.info("loaded %s in %.1f s: base footprint %.1f MB, trainable %d of %d parameters (%.2f%%)",
                 loaded.path, loaded.load_seconds, loaded.footprint_bytes / 1e6, trainable, total,
                 100 * trainable / max(total, 1))

        self._set_phase("reading and tokenizing the dataset")
        if tr.method == "sft":
            prepared = prepare_dataset(cfg.data, loaded.tokenizer, seed=tr.seed)
        else:  # preference pairs (prompt / chosen / rejected message lists), rendered by TRL's trainer
            from .data.preference import prepare_preferences

            prepared = prepare_preferences(cfg.data, loaded.tokenizer, seed=tr.seed, method=tr.method)
        self.report = prepared.report
        log.info("dataset:\n%s", prepared.report.summary())
        if tr.batch_size > len(prepared.train):
            # Not refused: a small upload with a preset's batch still trains, each step on every row.
            log.warning("batch_size %d is larger than the %d training rows: every step uses all %d rows. Lower "
                        "batch_size to %d or less, or add rows.", tr.batch_size, len(prepared.train),
                        len(prepared.train), len(prepared.train))

        # Memory-mapped Arrow from the preparation cache (qlora_ui/data/prepare.py), with its `length` column.
        train_ds = prepared.train
        eval_ds = prepared.eval if len(prepared.eval) else None

        import torch

        from .batching import frozen_to_compute_dtype

        on_gpu = torch.cuda.is_available()
        dtype = cfg.quantization.compute_dtype
        # Mixed precision on CPU too: this CPU multiplies bf16 at ~3x its fp32 rate, and the 4-bit layers
        # already compute in bf16. fp16 autocast is GPU-only (no fp16 CPU kernels worth having).
        amp = tr.mixed_precision and (dtype == "bf16" or (dtype == "fp16" and on_gpu))
        if amp and cfg.quantization.load_in_4bit:
            saved = frozen_to_compute_dtype(loaded.model, getattr(torch, {"bf16": "bfloat16",
                                                                          "fp16": "float16"}[dtype]))
            log.info("frozen weights kept in %s: %.1f MB less than fp32", dtype, saved / 1e6)
        args_kw = dict(
            output_dir=str(self.run.checkpoints_dir),
            num_train_epochs=tr.epochs,
            max_steps=tr.max_steps if tr.max_steps > 0 else -1,
            per_device_train_batch_size=tr.batch_size,
            per_device_eval_batch_size=tr.batch_size,
            gradient_accumulation_steps=tr.grad_accum,
            learning_rate=tr.learning_rate,
            lr_scheduler_type=tr.lr_scheduler,
            warmup_steps=tr.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
            optim=tr.optimizer,
            weight_decay=tr.weight_decay,
            max_grad_norm=tr.max_grad_norm,
            seed=tr.seed,
            data_seed=tr.seed,
            logging_steps=tr.logging_steps,
            logging_first_step=True,
            logging_nan_inf_filter=False,  # a NaN loss must reach our callback and stop the run
            eval_strategy=("steps" if tr.eval_steps > 0 else "no") if eval_ds is not None else "no",
            eval_steps=tr.eval_steps if tr.eval_steps > 0 else None,
            save_strategy="steps",
            save_steps=tr.save_steps,
            save_total_limit=tr.save_total_limit,
            train_sampling_strategy="group_by_length" if tr.group_by_length else "random",
            length_column_name="length",
            # Packed batches have no padding and no attention mask: every token counts. (Counting by pad id
            # would miss SmolLM2's end-of-turn tokens, which double as its pad token.)
            include_num_input_tokens_seen="all" if tr.padding_free else "non_padding",
            bf16=amp and dtype == "bf16",
            fp16=amp and dtype == "fp16",
            use_cpu=not on_gpu,
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            # LoRA under DDP: every adapter weight gets a gradient each step, so no search for unused ones.
            ddp_find_unused_parameters=False,
        )
        callbacks = [_make_callback(self), *self.extra_callbacks]
        if tr.method != "sft":
            # DPO / ORPO through TRL on the same model and arguments; padding-free and the labelled-only head are
            # SFT's (preference_training.py says why they are off).
            from .preference_training import build_trainer

            trainer = build_trainer(cfg, loaded, train_ds, eval_ds, args_kw, callbacks)
            args = trainer.args
        else:
            from .sft_training import build_trainer

            trainer = build_trainer(cfg, loaded, train_ds, eval_ds, args_kw, callbacks, amp=amp,
                                    sharded=self._sharded())
            args = trainer.args
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the listener, not stdout
        self._set_phase("training")
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        if eval_ds is not None and tr.eval_steps == 0 and not self.stop_event.is_set():
            trainer.evaluate()  # eval_steps 0 = evaluate once at the end

        self.phase = "saving adapter"
        if args.world_size > 1:
            # Every process takes part (FSDP gathers the sharded adapter); the Trainer writes on rank 0 only.
            trainer.save_model(str(self.run.adapter_dir))
            if self.rank == 0:
                loaded.tokenizer.save_pretrained(self.run.adapter_dir)
                # save_model also pickles the TrainingArguments; an adapter folder holds no pickles.
                (self.run.adapter_dir / "training_args.bin").unlink(missing_ok=True)
        else:
            self.save_adapter(loaded.model, loaded.tokenizer)
        if self.stop_event.is_set():
            self.state = "stopped"
            msg = f"stopped at step {self.step}; adapter saved from the current weights"
        else:
            self.state = "finished"
            msg = f"finished {self.step} steps"
        self.run.write_status(self.state, msg, step=self.step, finished=time.time())
        self._emit("status", {"state": self.state, "message": msg})
        log.info(msg)

    def save_adapter(self, model, tokenizer) -> Path:
        out = self.run.adapter_dir
        if self.rank != 0:
            return out
        # Only the trained adapter: DPO from an init adapter also holds TRL's frozen "ref" copy of where it started.
        model.save_pretrained(out, safe_serialization=True, selected_adapters=["default"])
        tokenizer.save_pretrained(out)
        return out
