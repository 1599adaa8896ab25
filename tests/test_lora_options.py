"""LoRA options on a tiny 4-bit model: LoftQ init (our CPU path), DoRA, rsLoRA, Gaussian init."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_ui.config import ConfigError, RunConfig
from qlora_ui.jobs import create_job
from qlora_ui.modeling import load_for_training
from tests.fault_helpers import lora_cfg, nudge_adapter

OPTIONS = {"loftq": dict(lora_init="loftq"), "gaussian": dict(lora_init="gaussian"), "dora": dict(use_dora=True),
           "rslora": dict(use_rslora=True)}


def batch(tokenizer):
    ids = torch.randint(5, len(tokenizer) - 1, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def saved_adapter(cfg: RunConfig, ids, out):
    """Train-side model with a non-trivial adapter (B and DoRA magnitudes moved), saved to `out`; returns its
    logits for `ids` (eval mode, the trainable 4-bit layout)."""
    m = nudge_adapter(load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model, seed=1, scale=0.05)
    m.eval()
    with torch.no_grad():
        before = m(input_ids=ids).logits
    m.save_pretrained(out)
    return before


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_trains_two_steps_with_every_lora_gradient(option, tiny_model_dir, tokenizer):
    cfg = lora_cfg(tiny_model_dir, **OPTIONS[option])
    m = load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model
    m.train()
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    if option == "dora":
        assert any("lora_magnitude_vector" in n for n in params)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for _ in range(2):  # after one step B is non-zero, so with any init every A has a gradient at the second
        opt.zero_grad(set_to_none=True)
        loss = m(**batch(tokenizer)).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
    missing = [n for n, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert all(torch.isfinite(torch.tensor(losses)))


def test_gaussian_init_draws_lora_a_from_a_normal_distribution(tiny_model_dir):
    """peft's "gaussian" init: A ~ N(0, 1/r), B = 0; the default is Kaiming-uniform A (std ~0.07 here). Checked by
    spread and by shape: kurtosis 3 for a normal, 1.8 for a uniform."""

    def lora_a(init):
        cfg = lora_cfg(tiny_model_dir, lora_init=init)
        m = load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model
        assert all(float(p.abs().max()) == 0 for n, p in m.named_parameters() if "lora_B" in n)
        return torch.cat([p.detach().flatten() for n, p in m.named_parameters() if "lora_A" in n])

    def kurtosis(x):
        z = (x - x.mean()) / x.std()
        return float((z**4).mean())

    gauss, default = lora_a("gaussian"), lora_a("default")
    assert gauss.numel() > 5000
    assert float(gauss.std()) == pytest.approx(1 / 8, rel=0.05)
    assert 2.7 < kurtosis(gauss) < 3.3, kurtosis(gauss)
    assert kurtosis(default) < 2.2, kurtosis(default)


def test_loftq_brings_each_4bit_layer_closer_to_its_original_weight(tiny_model_dir):
    from qlora_ui.loftq import apply_loftq

    cfg = lora_cfg(tiny_model_dir)  # default init, then LoftQ by hand to read the report
    m = load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model
    report = apply_loftq(m, str(tiny_model_dir))
    assert report.layers == len(report.errors) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    for name, (plain, loftq) in report.errors.items():
        assert 0 < loftq < plain, (name, plain, loftq)
    assert report.mean_after < 0.95 * report.mean_before, report.summary()
    # B·A·scaling is the top-r part of the residual: the scaling is divided out (peft leaves it on top).
    from safetensors import safe_open

    layer = m.base_model.model.model.layers[0].self_attn.q_proj
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
    from qlora_ui.loftq import _dequantized

    q = _dequantized(layer.base_layer)
    u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert torch.allclose(delta, best, atol=1e-4)


def test_loftq_init_with_rslora_scaling_is_the_same_correction(tiny_model_dir):
    """rsLoRA changes the scaling (alpha/sqrt(r) instead of alpha/r); LoftQ divides it out, so B·A·scaling (the
    correction the 4-bit layer gets) is the same either way."""
    import math

    from qlora_ui.loftq import apply_loftq

    reports, models = {}, {}
    for rs in (False, True):
        cfg = lora_cfg(tiny_model_dir, use_rslora=rs)
        models[rs] = load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model
        reports[rs] = apply_loftq(models[rs], str(tiny_model_dir))
    for name, (_, after) in reports[False].errors.items():
        assert reports[True].errors[name][1] == pytest.approx(after, rel=1e-3)
    for i in range(2):
        plain, rs = (models[k].base_model.model.model.layers[i].self_attn.q_proj for k in (False, True))
        assert plain.scaling["default"] == pytest.approx(16 / 8)
        assert rs.scaling["default"] == pytest.approx(16 / math.sqrt(8))
        delta = [layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
                 for layer in (plain, rs)]
        assert float(delta[0].abs().max()) > 1e-3 and torch.allclose(delta[0], delta[1], atol=1e-4)


@pytest.mark.parametrize("option", ["dora", "rslora", "loftq"])
def test_saved_adapter_reloads_with_the_same_logits(option, tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel

    from qlora_ui.modeling import keep_4bit_layout_trainable, load_base_model

    cfg = lora_cfg(tiny_model_dir, **OPTIONS[option])
    ids = batch(tokenizer)["input_ids"]
    before = saved_adapter(cfg, ids, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] == (option == "dora") and saved["use_rslora"] == (option == "rslora")
    base = load_base_model(str(tiny_model_dir), cfg.model, cfg.quantization)
    keep_4bit_layout_trainable(base)  # the same 4-bit kernel as `before` (the CPU inference repack rounds ~2e-3)
    again = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        after = again(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()


def test_a_run_records_the_options_and_logs_loftq(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"Arr, {i}!"}) + "\n"
                            for i in range(12)))
    cfg = lora_cfg(tiny_model_dir, lora_init="loftq", use_rslora=True, data_path=str(data), max_steps=2,
                   batch_size=2, eval_fraction=0.0, save_steps=100, runs_dir=str(tmp_path / "runs"), name="opt",
                   optimizer="adamw_torch", gradient_checkpointing=False)
    job = create_job(cfg)
    assert job.run_blocking() == "finished", job.error_message
    again = job.run.config()
    assert (again.lora.lora_init, again.lora.use_rslora, again.lora.use_dora) == ("loftq", True, False)
    assert "LoftQ: 14 layers initialised" in job.run.log_path.read_text()


def test_loftq_needs_4bit_and_does_not_combine_with_dora(tiny_model_dir):
    with pytest.raises(ConfigError, match="load_in_4bit"):
        lora_cfg(tiny_model_dir, lora_init="loftq", load_in_4bit=False, compute_dtype="bf16").validate()
    with pytest.raises(ConfigError, match="use_dora"):
        lora_cfg(tiny_model_dir, lora_init="loftq", use_dora=True).validate()


def test_loftq_without_safetensors_says_what_to_do(tmp_path, tiny_model_dir):
    from qlora_ui.loftq import LoftQError, SafetensorsWeights

    with pytest.raises(LoftQError, match="lora_init default"):
        SafetensorsWeights(tmp_path)


def test_chat_serves_a_dora_adapter_with_the_training_logits(tiny_model_dir, tokenizer, tmp_path):
    """On an AVX512-BF16 CPU the chat base repacks its 4-bit weights at the first generate, and DoRA's weight
    norm then dequantized the repacked bytes (logits off by 0.16): a DoRA adapter gets a plain-layout base. (The
    batch server's rule that keeps DoRA rows out of mixed batches: tests/test_serving.py, the DoRA test.)"""
    from qlora_ui.chat import ChatEngine, GenerationSettings

    cfg = lora_cfg(tiny_model_dir, use_dora=True)
    ids = batch(tokenizer)["input_ids"]
    before = saved_adapter(cfg, ids, tmp_path / "adapter")
    eng = ChatEngine()
    eng.load(cfg)
    eng.reply([{"role": "user", "content": "Hi"}], GenerationSettings(max_new_tokens=2), None)  # the base generated
    name = eng.load(cfg, tmp_path / "adapter")
    eng.model.set_adapter(name)
    with torch.no_grad():
        after = eng.model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
