"""How one training step executes fast, in one place: padding-free batches and a loss computed only where a
label is set. Neither changes the quantity trained on — the mean cross-entropy over the step's labelled tokens
— so curves stay comparable with the plain path and resume stays exact; each part has its own switch.

- Padding-free: a batch of rows of 96-440 tokens padded to the longest spends much of its compute on padding.
  `DataCollatorWithFlattening` concatenates the rows into one sequence with per-row `position_ids`, and
  transformers builds a block-diagonal attention mask from them (no attention across rows; exact only with
  `use_cache=False`, which training uses).
- Labelled-positions head: the logits of 4 x 512 tokens over a 49,152-token vocabulary are 400 MB in fp32, plus
  their gradient, yet only response tokens carry a label. The output layer runs on those positions only, in chunks.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)

HEAD_CHUNK = 4096  # labelled positions per output-layer call: bounds the logits alive at once


def make_collator(tokenizer, padding_free: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if padding_free:
        # separator -100: the first label of every row is ignored, so no row learns to predict across a boundary.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


PER_ROW_ATTENTION = "qlora_studio_per_row_sdpa"
# Rows up to this many tokens take the matmul attention under gradient checkpointing (see causal_matmul_attention).
MATMUL_ATTENTION_MAX_ROW = 256


def causal_matmul_attention(query, key, value, scaling=None):
    """Causal attention of one row as two batched matmuls and a softmax, for short rows on a CPU. PyTorch's CPU
    flash-attention kernel is built for long sequences: on rows of 64-128 tokens (9 heads of 64) its forward and
    backward took 1.8x the time of this, on 256 1.07x, on 512 1.0x and on 1,024 0.3x (bench/attention.py), and
    attention was a quarter of a training step. The price is the (heads x tokens x tokens) probabilities kept for
    the backward, so it is used where that is small: rows of at most MATMUL_ATTENTION_MAX_ROW tokens under
    gradient checkpointing, which keeps one layer's at a time.
    Grouped-query heads are matched to their key/value head without copying the keys (query heads j*g..j*g+g-1
    share key head j, as transformers' repeat_kv lays them out). The softmax runs in fp32."""
    import torch

    _, heads, t, d = query.shape
    kv = key.shape[1]
    g = heads // kv
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(query.reshape(kv, g * t, d), key[0].transpose(-1, -2))  # (kv, g*t, t)
    scores = scores.view(kv, g, t, t).float() * scale
    scores.masked_fill_(torch.ones(t, t, dtype=torch.bool, device=query.device).triu_(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs.view(kv, g * t, t), value[0])  # (kv, g*t, d)
    return out.view(1, heads, t, d)


def per_row_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kw):
    """Attention for a packed batch, one row at a time. Packing makes every linear layer run on one long
    sequence with no padding, but plain sdpa then attends over the whole packed length with a block mask:
    (sum of row lengths)^2 instead of the sum of each row's length^2, which took half of a CPU step (measured:
    1.9 of 3.8 s). Rows are found where position_ids restart at 0; each gets causal attention of its own: sdpa,
    or for short rows under gradient checkpointing the matmul form (causal_matmul_attention)."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is None or query.shape[0] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kw)
    t = query.shape[2]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    bounds = (starts if starts and starts[0] == 0 else [0] + starts) + [t]
    gqa = key.shape[1] != query.shape[1]
    drop = dropout if module.training else 0.0
    matmul_upto = getattr(module, "_qlora_studio_matmul_rows_upto", 0) if drop == 0.0 else 0
    # split, not slices: a slice's backward writes its gradient into a zero tensor of the whole sequence (one per
    # row, per q/k/v, per layer: fill_ and copy_ of the full length); split's backward is one cat.
    sizes = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
    outs = [causal_matmul_attention(q, k, v, scaling) if q.shape[2] <= matmul_upto else
            F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop, scale=scaling, enable_gqa=gqa)
            for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))]
    import torch

    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def use_per_row_attention(model, matmul_rows_upto: int = 0) -> bool:
    """Switch a (peft-wrapped) model that uses sdpa to per-row attention for packed batches. Other attention
    implementations (flash-attention's varlen path on GPUs) already handle packing well: left as they are.
    `matmul_rows_upto`: rows up to this length take causal_matmul_attention (0: sdpa for every row)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PER_ROW_ATTENTION, per_row_sdpa)
    # No mask is built for packed rows (per_row_sdpa finds them from position_ids); with padding it falls back.
    AttentionMaskInterface.register(PER_ROW_ATTENTION, flash_attention_mask)
    base.set_attn_implementation(PER_ROW_ATTENTION)
    for module in base.modules():
        if type(module).__name__.endswith("Attention"):
            module._qlora_studio_matmul_rows_upto = matmul_rows_upto
    return True


def head_parts(model):
    """(decoder, output layer) of a causal LM (through a PeftModel), or None where the model's own forward does
    more than `lm_head(norm(hidden))` (logit soft-capping or scaling): those keep the full forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None
    return decoder, head


def labelled_loss(model, inputs: dict, num_items_in_batch=None, autocast_dtype=None):
    """Cross-entropy summed over the labelled (shifted) positions, divided by `num_items_in_batch` (the step's
    labelled tokens, as the Trainer counts them for gradient accumulation) or by this batch's count: the same
    number the model's own loss gives, without the logits of unlabelled positions."""
    import torch
    import torch.nn.functional as F

    decoder, head = head_parts(model)
    labels = inputs["labels"]
    kw = {k: inputs[k] for k in ("attention_mask", "position_ids") if inputs.get(k) is not None}
    device_type = labels.device.type
    ctx = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        hidden = decoder(input_ids=inputs["input_ids"], use_cache=False, **kw).last_hidden_state
        shift = labels[:, 1:]
        mask = shift != -100
        h = hidden[:, :-1][mask]
        y = shift[mask]
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], HEAD_CHUNK):
            logits = head(h[i:i + HEAD_CHUNK]).float()
            total = total + F.cross_entropy(logits, y[i:i + HEAD_CHUNK], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom


def kept_logits_loss(model, inputs: dict, num_items_in_batch=None, autocast_dtype=None):
    """`labelled_loss` through the model's own forward (for a DDP/FSDP-wrapped model): `logits_to_keep` with the
    positions whose next token is labelled, so the output layer runs on those only."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    shift = labels[:, 1:]
    keep = (shift != -100).any(0).nonzero().squeeze(1)  # positions any row trains on (one set for the batch)
    fwd = {k: v for k, v in inputs.items() if k != "labels"}
    ctx = (torch.autocast(labels.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        logits = model(**fwd, use_cache=False, logits_to_keep=keep).logits
    y = shift[:, keep]
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                            reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else (y != -100).sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom


def trainer_class(labelled_head: bool, autocast_dtype=None):
    """The HF Trainer, with compute_loss on labelled positions only when asked (and possible for the model)."""
    from transformers import Trainer

    if not labelled_head:
        return Trainer

    class LabelledHeadTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "labels" in inputs and head_parts(model) is not None:
                loss = labelled_loss(model, inputs, num_items_in_batch, autocast_dtype)
            elif "labels" in inputs and head_parts(getattr(model, "module", None)) is not None:
                # Wrapped for DDP/FSDP: the forward must go through the wrapper (it syncs the gradients), so
                # the model's own forward runs, asked for the logits of the labelled positions only.
                loss = kept_logits_loss(model, inputs, num_items_in_batch, autocast_dtype)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    # num_items_in_batch counts every process's tokens and DDP averages the gradients: scale
                    # back, as the Trainer's own compute_loss does.
                    loss = loss * self.accelerator.num_processes
            else:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

    return LabelledHeadTrainer


def frozen_to_compute_dtype(model, dtype) -> int:
    """Frozen floating weights back to the compute dtype after `prepare_model_for_kbit_training` made them fp32
    (embeddings, the output layer, norms): under bf16 autocast they are read in bf16 anyway, and on the bundled
    model the 49,152 x 576 embedding alone is 113 MB in fp32. Trainable (LoRA) weights stay fp32 for the
    optimizer. Returns the bytes saved."""
    import torch

    saved = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32 and p.is_floating_point():
            saved += p.numel() * (4 - torch.empty((), dtype=dtype).element_size())
            p.data = p.data.to(dtype)
    return saved
