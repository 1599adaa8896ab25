"""The fused LoRA layer (qlora_ui/fused_lora.py) trains on the same quantity as peft's own layers: the same loss
and LoRA gradients on the default step (4-bit NF4 base, bf16 autocast, packed rows, labelled head), with and
without gradient checkpointing and with adapter dropout; it steps aside wherever it would not be exact."""

from __future__ import annotations

import pytest
import torch

from qlora_ui.batching import frozen_to_compute_dtype, labelled_loss, make_collator, use_per_row_attention
from qlora_ui.config import RunConfig
from qlora_ui.fused_lora import FusedLoRALinear, RecomputeCache, fuse_lora_layers, fused_calls
from qlora_ui.modeling import load_for_training
from tests.fault_helpers import write_rows
from tests.test_batching import rows
from tests.test_training import tiny_cfg


@pytest.fixture()
def data_file(tmp_path):
    return write_rows(tmp_path / "train.jsonl")


def load(tiny_model_dir, checkpointing: bool, dropout: float = 0.0, bits: int = 4):
    cfg = RunConfig().updated(base_model=str(tiny_model_dir), lora_dropout=dropout, compute_dtype="bf16",
                              load_in_4bit=bits == 4)
    m = load_for_training(cfg.model, cfg.quantization, cfg.lora, checkpointing).model
    torch.manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:  # non-zero B, so every LoRA A gets a gradient too
            p.data.normal_(0, 0.02)
    frozen_to_compute_dtype(m, torch.bfloat16)
    use_per_row_attention(m)
    m.train()
    return m


def pair(tiny_model_dir, *args):
    """Two copies of one model with the same LoRA weights (get_peft_model draws A from the global RNG)."""
    ref, other = load(tiny_model_dir, *args), load(tiny_model_dir, *args)
    ref_params = dict(ref.named_parameters())
    for n, p in other.named_parameters():
        if p.requires_grad:
            p.data.copy_(ref_params[n].data)
    return ref, other


def step(m, tokenizer, seed: int = 0):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both paths
    batch = make_collator(tokenizer, True)([dict(r) for r in rows()])
    loss = labelled_loss(m, batch, autocast_dtype=torch.bfloat16)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing,dropout,bits", [(True, 0.0, 4), (False, 0.0, 4), (True, 0.1, 4),
                                                        (False, 0.0, 16)],
                         ids=["4bit-checkpointing", "4bit-no-checkpointing", "4bit-dropout", "16bit"])
def test_the_fused_layer_gives_peft_s_loss_and_gradients(tiny_model_dir, tokenizer, checkpointing, dropout, bits):
    ref, fused = pair(tiny_model_dir, checkpointing, dropout, bits)
    n_layers = fuse_lora_layers(fused, keep_weight=checkpointing)
    lora_layers = sum(1 for n, _ in fused.named_modules() if n.endswith("lora_A"))
    assert n_layers == lora_layers > 0
    ref_loss, ref_grads = step(ref, tokenizer)
    loss, grads = step(fused, tokenizer)
    # Every LoRA layer took the fused path: once in the forward, once more in the recompute.
    assert fused_calls(fused) == n_layers * (2 if checkpointing else 1)
    assert fused_calls(ref) == 0
    assert set(grads) == set(ref_grads)
    # Both compute in bf16; the fused layer adds the adapter's product inside one addmm (one rounding instead of
    # peft's three), so they agree to bf16 rounding. Measured: loss within 4e-5, gradients within 1.6e-2 relative
    # (each is 1.2e-2 from the fp32 step: the next test).
    assert loss == pytest.approx(ref_loss, rel=2e-3)
    for n, g in ref_grads.items():
        assert float(g.norm()) > 0, n
        assert grads[n].dtype == torch.float32
        assert float((grads[n] - g).norm()) <= 2e-2 * float(g.norm()), n


def test_the_fused_layer_steps_aside_where_it_would_not_be_exact(tiny_model_dir, tokenizer):
    """Evaluation (no grad, eval mode), no autocast, and a disabled adapter all take peft's own forward, with
    peft's result."""
    ref, fused = pair(tiny_model_dir, False)
    fuse_lora_layers(fused, keep_weight=False)
    batch = make_collator(tokenizer, True)([dict(r) for r in rows()])
    ids, pos = batch["input_ids"], batch["position_ids"]
    for m in (ref, fused):
        m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = ref(input_ids=ids, position_ids=pos).logits
        b = fused(input_ids=ids, position_ids=pos).logits
    assert torch.equal(a, b) and fused_calls(fused) == 0
    fused.train()
    with torch.no_grad():  # training mode without autocast
        fused(input_ids=ids, position_ids=pos)
    with fused.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused(input_ids=ids, position_ids=pos)
    assert fused_calls(fused) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(input_ids=ids, position_ids=pos)
    assert fused_calls(fused) > 0


def test_a_job_trains_through_the_fused_layers_and_the_matmul_attention(tiny_model_dir, data_file, tmp_path,
                                                                        monkeypatch):
    """A job that fell back to peft's layers would train just the same: spy on the function itself."""
    from qlora_ui.jobs import create_job

    applied, from_cache = [], []
    real = FusedLoRALinear.fn()

    class Spy:
        @staticmethod
        def apply(*args):
            applied.append(args[7])  # keep_weight
            from_cache.append(args[9][0] is not None)  # the recompute took the forward's output
            return real.apply(*args)

    monkeypatch.setattr(FusedLoRALinear, "_fn", Spy)
    from qlora_ui import batching

    matmul_rows = []
    real_attention = batching.causal_matmul_attention
    monkeypatch.setattr(batching, "causal_matmul_attention",
                        lambda q, *a: matmul_rows.append(q.shape[2]) or real_attention(q, *a))
    cfg = tiny_cfg(tiny_model_dir, data_file, tmp_path, max_steps=2, eval_fraction=0.0, save_steps=100,
                   gradient_checkpointing=True)
    assert cfg.training.fused_lora
    job = create_job(cfg)
    assert job.run_blocking() == "finished", job.error_message
    # The default 256 MB holds every output of the tiny model: each recompute takes them all (and with a cache
    # the layers keep no dequantized weight: what they save must not depend on the cache).
    assert cfg.training.checkpoint_cache_mb == 256 and applied and sum(from_cache) == len(applied) // 2
    assert not any(applied)
    # Rows of at most 128 tokens under checkpointing: attention in the matmul form, forward and recompute.
    assert matmul_rows and max(matmul_rows) <= batching.MATMUL_ATTENTION_MAX_ROW
    applied.clear()
    off = tiny_cfg(tiny_model_dir, data_file, tmp_path / "off", max_steps=1, eval_fraction=0.0, save_steps=100,
                   fused_lora=False)
    assert create_job(off).run_blocking() == "finished"
    assert applied == []


def test_the_fused_layer_is_as_close_to_the_fp32_step_as_peft_s_bf16_layers(tiny_model_dir, tokenizer):
    """Against the fp32 step (no autocast, fp32 4-bit compute): the bf16 paths both round; the fused one must not
    round more. Measured: LoRA gradients 1.25e-2 (fused) and 1.18e-2 (peft) relative from fp32; loss 6e-5 / 4e-5."""
    ref, fused = pair(tiny_model_dir, True)
    fuse_lora_layers(fused, keep_weight=True)
    cfg = RunConfig().updated(base_model=str(tiny_model_dir), lora_dropout=0.0, compute_dtype="fp32")
    exact = load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model
    ref_params = dict(ref.named_parameters())
    for n, p in exact.named_parameters():
        if p.requires_grad:
            p.data.copy_(ref_params[n].data)
    use_per_row_attention(exact)
    exact.train()
    batch = make_collator(tokenizer, True)([dict(r) for r in rows()])
    exact_loss = labelled_loss(exact, batch)
    exact_loss.backward()
    exact_grads = {n: p.grad for n, p in exact.named_parameters() if p.requires_grad}

    def worst(grads):
        return max(float((grads[n] - g).norm() / g.norm()) for n, g in exact_grads.items())

    peft_loss, peft_grads = step(ref, tokenizer)
    loss, grads = step(fused, tokenizer)
    assert abs(loss - exact_loss.item()) <= 3 * abs(peft_loss - exact_loss.item()) + 1e-4 * abs(exact_loss.item())
    assert worst(grads) <= 1.3 * worst(peft_grads)


@pytest.mark.parametrize("budget", ["all", "part"])
def test_the_recompute_takes_the_forward_s_outputs_and_gives_the_same_gradients(tiny_model_dir, tokenizer, budget):
    """Under gradient checkpointing with a recompute cache: the recompute takes the layers' outputs from the forward
    instead of multiplying again (every layer when the budget holds them all; the first layers when it holds
    part), the loss and gradients are those of the fused layers without a cache (bit for bit: the same
    computation), and nothing is left in the cache after the step."""
    ref, cached = pair(tiny_model_dir, True)
    fuse_lora_layers(ref, keep_weight=True)
    n = sum(1 for name, _ in cached.named_modules() if name.endswith("lora_A"))
    tokens = sum(len(r["input_ids"]) for r in rows())
    # The tiny model's layers: q/k/v/o 64 wide, gate/up/down 128/128/64; bf16 outputs.
    per_step = sum(m.get_base_layer().out_features for name, m in cached.named_modules()
                   if name.endswith(("_proj",)) and hasattr(m, "get_base_layer")) * tokens * 2
    cache = RecomputeCache(per_step if budget == "all" else per_step // 2)
    fuse_lora_layers(cached, keep_weight=True, cache=cache)
    ref_loss, ref_grads = step(ref, tokenizer)
    loss, grads = step(cached, tokenizer)
    hits = cache.hits
    assert hits == n if budget == "all" else 0 < hits < n
    assert cache.entries == {} and cache.used == 0
    assert loss == ref_loss
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    loss2, _ = step(cached, tokenizer)  # a second step: the cache fills and empties again
    assert cache.hits == 2 * hits and loss2 == ref_loss and cache.used == 0


def test_two_forwards_before_one_backward_never_take_each_other_s_outputs(tiny_model_dir, tokenizer):
    """The cache hands an output only to the recompute of the same input. Two forwards of the same shape, then the
    first one's backward: its recompute finds the second forward's outputs in the cache and must not take them.
    The gradients stay exactly those of recomputing everything."""
    ref, cached = pair(tiny_model_dir, True)
    fuse_lora_layers(ref, keep_weight=True)
    cache = RecomputeCache(2**30)
    fuse_lora_layers(cached, keep_weight=True, cache=cache)
    first = make_collator(tokenizer, True)([dict(r) for r in rows(1)])
    second = make_collator(tokenizer, True)([dict(r) for r in rows(2)])
    assert first["input_ids"].shape == second["input_ids"].shape
    grads = []
    for m in (ref, cached):
        m.zero_grad(set_to_none=True)
        loss_first = labelled_loss(m, first, autocast_dtype=torch.bfloat16)
        loss_second = labelled_loss(m, second, autocast_dtype=torch.bfloat16)
        loss_first.backward()  # while the cache holds the second forward's outputs
        loss_second.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert cache.hits == 0 and cache.used == 0
    for name, g in grads[0].items():
        assert torch.equal(grads[1][name], g), name
