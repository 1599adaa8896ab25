"""Supervised fine-tuning's trainer: the project's own fast step on the 4-bit base + LoRA.

training.TrainingJob loads the model and owns the run; this module builds the Trainer for `method: sft`, as
preference_training.py builds TRL's for dpo / orpo, from the same TrainingArguments keywords and callbacks. The fast
paths it switches on (each a setting, each measured in docs/performance.md): padding-free packed batches with
attention per row (the matmul form for short rows on the CPU), the labelled-positions head, and the fused LoRA
layers with their recompute cache. It knows nothing about Gradio.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def build_trainer(cfg, loaded, train_ds, eval_ds, args_kw: dict[str, Any], callbacks: list, *, amp: bool,
                  sharded: bool):
    """The Trainer for cfg (a RunConfig) on `loaded.model`: `amp` is bf16/fp16 autocast on, `sharded` FSDP or
    ZeRO-3 across processes (the fused layers read each frozen weight whole, so they stay off there)."""
    import torch
    from transformers import TrainingArguments

    from .batching import MATMUL_ATTENTION_MAX_ROW, make_collator, trainer_class, use_per_row_attention

    tr = cfg.training
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(**args_kw)
    collator = make_collator(loaded.tokenizer, tr.padding_free)
    # Short rows take the matmul attention where its probabilities are kept one layer at a time, on the CPU
    # (measured there against PyTorch's CPU flash kernel; GPU kernels are another matter).
    matmul_upto = MATMUL_ATTENTION_MAX_ROW if tr.gradient_checkpointing and not on_gpu else 0
    if tr.padding_free and use_per_row_attention(loaded.model, matmul_upto):
        log.info("packed batches: attention runs per row (no cross-row or padded attention work)")
    dtype = cfg.quantization.compute_dtype
    amp_dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]) if amp else None
    if tr.fused_lora and amp and not sharded:
        from .fused_lora import fuse_for_training

        fuse_for_training(loaded.model, tr)
    train_cls = trainer_class(tr.labelled_head, amp_dtype)
    return train_cls(model=loaded.model, args=args, eval_dataset=eval_ds, data_collator=collator,
                     train_dataset=train_ds if tr.group_by_length else train_ds.remove_columns(["length"]),
                     callbacks=callbacks)
