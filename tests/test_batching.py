"""The fast step (qlora_ui/batching.py) trains on the same quantity as the plain one: padding-free batches and the
labelled-positions head give the loss and the LoRA gradients of padded batches with full logits."""

from __future__ import annotations

import pytest
import torch

from qlora_ui.batching import frozen_to_compute_dtype, labelled_loss, make_collator
from qlora_ui.config import RunConfig
from qlora_ui.modeling import load_for_training


def rows(seed: int = 1) -> list[dict]:
    """Three rows of different lengths, the first half of each masked (a prompt), as prepare_dataset makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (7, 15, 11):
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:], "attention_mask": [1] * n})
    return out


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def model(request, tiny_model_dir):
    cfg = RunConfig().updated(base_model=str(tiny_model_dir), lora_dropout=0.0, compute_dtype=request.param)
    m = load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model
    torch.manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:  # non-zero B, so every LoRA A gets a gradient too
            p.data.normal_(0, 0.02)
    return request.param, m


def loss_and_grads(m, tokenizer, padding_free: bool, labelled: bool, per_row: bool = False):
    from qlora_ui.batching import PER_ROW_ATTENTION, use_per_row_attention

    base = m.get_base_model()
    if per_row:
        assert use_per_row_attention(m)
    elif base.config._attn_implementation == PER_ROW_ATTENTION:
        base.set_attn_implementation("sdpa")
    m.zero_grad(set_to_none=True)
    batch = make_collator(tokenizer, padding_free)([dict(r) for r in rows()])
    loss = labelled_loss(m, batch) if labelled else m(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("padding_free,labelled,per_row", [(True, False, False), (False, True, False),
                                                           (True, True, False), (True, True, True)],
                         ids=["padding-free", "labelled-head", "both", "both+per-row-attention"])
def test_fast_step_matches_the_padded_full_logits_step(model, tokenizer, padding_free, labelled, per_row):
    dtype, m = model
    ref_loss, ref = loss_and_grads(m, tokenizer, False, False)
    loss, grads = loss_and_grads(m, tokenizer, padding_free, labelled, per_row)
    loss_and_grads(m, tokenizer, False, False)  # back to plain sdpa for the next case
    # fp32: equal to rounding; bf16 compute: the packed sequence's matmuls round differently (measured 7e-4).
    tol = 1e-5 if dtype == "fp32" else 3e-3
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref) and len(ref) > 0
    for n, g in ref.items():
        assert float(g.norm()) > 0, n
        assert float((grads[n] - g).norm()) <= tol * float(g.norm()), n


def test_packed_rows_do_not_attend_across_rows(model, tokenizer):
    """Change the first row: the packed loss of the other rows' tokens must not move (block-diagonal mask)."""
    _, m = model
    batch = make_collator(tokenizer, True)([dict(r) for r in rows()])
    n0 = len(rows()[0]["input_ids"])
    other = batch["input_ids"].clone()
    other[0, :n0] = (other[0, :n0] + 7) % 1000
    with torch.no_grad():
        a = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, n0:]
        b = m(input_ids=other, position_ids=batch["position_ids"]).logits[0, n0:]
    assert float((a - b).abs().max()) < 1e-4


def test_frozen_weights_go_back_to_bf16_and_lora_stays_fp32(tiny_model_dir):
    cfg = RunConfig().updated(base_model=str(tiny_model_dir))
    m = load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model
    saved = frozen_to_compute_dtype(m, torch.bfloat16)
    assert saved > 0
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n
        elif p.is_floating_point():
            assert p.dtype == torch.bfloat16, n


def test_bf16_autocast_with_bf16_frozen_weights_matches_the_fp32_step(tiny_model_dir, tokenizer):
    """The step a job takes by default (docs/performance.md, "Mixed precision on the CPU"): 4-bit compute in bf16,
    the frozen fp32 weights back to bf16, bf16 autocast, packed rows with per-row attention and the labelled head.
    Against the fp32 padded full-logits step with the same LoRA weights: the same loss and gradients to bf16
    rounding, and the LoRA layers really ran in bf16 (without autocast they would run in fp32, or fail)."""
    from qlora_ui.batching import use_per_row_attention

    def load(dtype):
        cfg = RunConfig().updated(base_model=str(tiny_model_dir), lora_dropout=0.0, compute_dtype=dtype)
        return load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model

    ref_m, fast = load("fp32"), load("bf16")
    torch.manual_seed(0)
    ref_params = dict(ref_m.named_parameters())
    for n, p in fast.named_parameters():
        if p.requires_grad:
            if "lora_B" in n:
                ref_params[n].data.normal_(0, 0.02)
            p.data.copy_(ref_params[n].data)
    assert frozen_to_compute_dtype(fast, torch.bfloat16) > 0
    assert fast.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    ref_loss, ref = loss_and_grads(ref_m, tokenizer, False, False)

    assert use_per_row_attention(fast)
    lora_out = set()
    hooks = [mod.register_forward_hook(lambda _m, _i, out: lora_out.add(out.dtype))
             for n, mod in fast.named_modules() if n.endswith("lora_A.default")]
    batch = make_collator(tokenizer, True)([dict(r) for r in rows()])
    loss = labelled_loss(fast, batch, autocast_dtype=torch.bfloat16)
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert hooks and lora_out == {torch.bfloat16}
    errs = {n: float((grads[n].float() - g).norm() / g.norm()) for n, g in ref.items()}
    assert set(grads) == set(ref) and all(g.dtype == torch.float32 for g in grads.values())
    # Measured: loss 4e-5 relative, the worst LoRA gradient 1.2e-2 relative (bf16 has 8 bits of mantissa).
    assert loss.item() == pytest.approx(ref_loss, rel=1e-3)
    assert max(errs.values()) <= 3e-2, max(errs.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("kv_heads", [3, 9], ids=["grouped-query", "multi-head"])
def test_the_matmul_attention_gives_sdpa_s_output_and_gradients(kv_heads):
    """causal_matmul_attention (short rows under gradient checkpointing) against PyTorch's causal sdpa, fp32: the
    same output and q/k/v gradients to rounding, grouped-query heads matched to their key/value head."""
    import torch.nn.functional as F

    from qlora_ui.batching import causal_matmul_attention

    torch.manual_seed(0)
    q = torch.randn(1, 9, 37, 16, requires_grad=True)
    k = torch.randn(1, kv_heads, 37, 16, requires_grad=True)
    v = torch.randn(1, kv_heads, 37, 16, requires_grad=True)
    g = torch.randn(1, 9, 37, 16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 9)
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    out = causal_matmul_attention(q, k, v)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert float((a - b).norm() / b.norm()) < 1e-5


def test_short_rows_take_the_matmul_attention_and_long_rows_sdpa(model, tokenizer, monkeypatch):
    """With a row limit, packed rows up to it go through causal_matmul_attention and longer ones through sdpa;
    the loss and gradients stay those of sdpa for every row."""
    from qlora_ui import batching

    dtype, m = model
    loss_and_grads(m, tokenizer, False, False)  # plain sdpa, whatever an earlier test left
    ref_loss, ref = loss_and_grads(m, tokenizer, True, True, per_row=True)
    calls = []
    real = batching.causal_matmul_attention
    monkeypatch.setattr(batching, "causal_matmul_attention", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    attention = [mod for mod in m.modules() if type(mod).__name__.endswith("Attention")]
    assert attention and all(mod._qlora_studio_matmul_rows_upto == 0 for mod in attention)
    for mod in attention:
        mod._qlora_studio_matmul_rows_upto = 11
    m.zero_grad(set_to_none=True)
    batch = make_collator(tokenizer, True)([dict(r) for r in rows()])
    loss = labelled_loss(m, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    for mod in attention:
        mod._qlora_studio_matmul_rows_upto = 0
    loss_and_grads(m, tokenizer, False, False)  # back to plain sdpa for the next test
    layers = m.get_base_model().config.num_hidden_layers
    assert sorted(calls) == sorted([7, 11] * layers)  # the rows of 7 and 11 tokens; the one of 15 took sdpa
    tol = 1e-5 if dtype == "fp32" else 3e-3
    assert loss.item() == pytest.approx(ref_loss, rel=tol)
    for n, g in ref.items():
        assert float((grads[n] - g).norm()) <= tol * float(g.norm()), n
