"""Preference tuning (DPO, ORPO) on the same 4-bit base + LoRA as SFT, through TRL's own trainers.

training.TrainingJob loads the model and owns the run; this module builds the TRL trainer for `method` dpo / orpo:
the preference pairs (data/preference.py), the TRL config made from the same RunConfig fields as the SFT
TrainingArguments, and the reference. It knows nothing about Gradio.

The reference (DPO): no ref_model is loaded. TRL 1.16, handed a PeftModel and no ref_model, copies the starting
adapter into a frozen second adapter named "ref" (trl/trainer/dpo_trainer.py, `model.add_adapter("ref", ...)`) and
computes reference log-probs through it (`use_adapter(model, "ref")`); with no "ref" adapter it disables the adapters
(`use_adapter(model, None)`): the 4-bit base alone. Both run on the one base in memory. A fresh adapter starts as a
no-op (every lora_B is zero), so its copy equals the base: the copy is deleted and the reference is the base with the
adapter off, one LoRA pass cheaper. A run that starts from an SFT adapter (--init-adapter) keeps TRL's frozen copy,
so the reference is the SFT model, the usual SFT -> DPO recipe (a reference of the bare base would count what SFT
already learned as preference reward).

The project's SFT fast paths are off here: padding-free batches (TRL 1.16 turns its own padding_free off for DPO,
and the chosen/rejected pairing needs padded rows) and our labelled-positions head (batching.py); TRL's fused head
computes the completion log-probs in chunks instead, without full-vocabulary logits.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# TRL's log keys -> metrics.jsonl keys (no "/" so they read as plain names in JSON, plots and the CLI).
METRIC_KEYS = {
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected",
    "nll_loss": "nll_loss",  # ORPO: its SFT term
    "log_odds_ratio": "log_odds_ratio",  # ORPO: its preference term
}


def metric_row(logs: dict[str, Any]) -> dict[str, float]:
    """The preference metrics of one TRL log call, renamed; eval ones get the eval_ prefix."""
    out = {}
    for k, v in logs.items():
        prefix = "eval_" if k.startswith("eval_") else ""
        name = METRIC_KEYS.get(k[len(prefix):])
        if name is not None and isinstance(v, (int, float)):
            out[prefix + name] = float(v)
    return out


def adapter_is_noop(model) -> bool:
    """True when the active adapter changes nothing yet: every lora_B is zero and there is no DoRA magnitude."""
    import torch

    for name, p in model.named_parameters():
        if ".default." not in name:
            continue
        if "lora_magnitude_vector" in name:
            return False
        if "lora_B" in name and bool(torch.any(p.detach() != 0)):
            return False
    return True


def ref_uses_base(trainer) -> bool:
    """Whether the trainer's reference pass is the base with the adapter off (no "ref" adapter)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return "ref" not in getattr(model, "peft_config", {})


def build_trainer(cfg, loaded, train_ds, eval_ds, args_kw: dict[str, Any], callbacks: list):
    """The TRL trainer for cfg.training.method (a RunConfig) on `loaded.model` and the prepared pairs
    (data/preference.py), with the SFT path's TrainingArguments keywords (`args_kw`) and callbacks."""
    import torch

    from .data.render import FALLBACK_CHAT_TEMPLATE

    tr = cfg.training
    tok = loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE  # TRL renders the pairs with apply_chat_template
    if not tr.group_by_length:
        train_ds = train_ds.remove_columns(["length"])
    kw = dict(args_kw)
    if eval_ds is None:
        kw.update(eval_strategy="no", eval_steps=None)
    # Set explicitly: TRL's configs default to gradient checkpointing on and bf16 on, unlike the run config.
    kw.update(gradient_checkpointing=tr.gradient_checkpointing, beta=tr.beta,
              max_length=None,  # pairs over max_length were dropped above, never truncated
              include_num_input_tokens_seen="non_padding", remove_unused_columns=False)
    if tr.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**kw, padding_free=False, precompute_ref_log_probs=False)
        trainer = DPOTrainer(model=loaded.model, ref_model=None, args=args, train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tok, callbacks=callbacks)
        model = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in model.peft_config:
            if adapter_is_noop(model):
                # A no-op copy: the reference is exactly the base with the adapter off (see the module doc).
                model.delete_adapter("ref")
                model.set_adapter("default")
                log.info("DPO reference: the 4-bit base with the adapter off (no second model)")
            else:
                for name, p in model.named_parameters():
                    if ".ref." in name:
                        p.requires_grad_(False)  # a frozen reference, never in the optimizer
                log.info("DPO reference: the starting adapter, frozen (TRL's 'ref' copy on the same 4-bit base)")
    elif tr.method == "orpo":
        # Experimental in TRL 1.16 (trl.experimental.orpo): ORPO has no reference at all.
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        # ORPO truncates to max_length itself; the pairs are already within it, so nothing is cut.
        kw.update(max_length=cfg.data.max_length)
        kw.pop("include_num_input_tokens_seen")  # its batches have no plain input_ids to count
        args = ORPOConfig(**kw)
        trainer = ORPOTrainer(model=loaded.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tok, callbacks=callbacks)
    else:
        raise ValueError(f"not a preference method: {tr.method}")
    # TRL casts a quantized model's trainable LoRA weights to bf16; keep them fp32 as the SFT path does: at DPO's
    # small learning rates a bf16 weight rounds most updates away (8 bits of mantissa).
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return trainer
