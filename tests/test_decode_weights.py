"""Chat decoding made faster without changing a reply (qlora_ui/decode_weights.py, serving._nucleus): the chat base
decoding from its 4-bit weights dequantized once gives the replies the 4-bit path gives, with adapters on, off and
mixed in one batch; the automatic rule keeps 4-bit over its budget; the top-k nucleus draws the tokens the full sort
drew."""

from __future__ import annotations

import pytest

from qlora_ui import decode_weights
from qlora_ui.chat import ChatEngine, GenerationSettings
from qlora_ui.errors import ChatError
from qlora_ui.serving import Request, _nucleus, _pick
from tests.fault_helpers import lora_cfg, make_tiny_model, nudge_adapter

PROMPTS = ["Tell me about the sea.", "What is your name, sailor? Say it twice."]


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    # Large random weights: the usual tiny model (init std 0.02) answers every prompt alike (tests/test_serving.py).
    return make_tiny_model(tmp_path_factory.mktemp("loud-llama"), tokenizer, initializer_range=0.3)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def cfg(request, model_dir):
    # bf16 is the app's compute dtype (the 4-bit path then runs bitsandbytes' repacked CPU kernel); fp32 the tests'.
    return lora_cfg(model_dir, compute_dtype=request.param)


@pytest.fixture(scope="module")
def cfg32(model_dir):
    """One compute dtype is enough where the dtype does not matter (the budget rule, DoRA's path)."""
    return lora_cfg(model_dir)


def _adapter(cfg, out, seed):
    from qlora_ui.modeling import load_for_training

    m = nudge_adapter(load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model, seed=seed, scale=0.5)
    m.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(cfg, tmp_path_factory):
    return [_adapter(cfg, tmp_path_factory.mktemp(f"adapter{s}"), s) for s in (3, 4)]


def msgs(text):
    return [{"role": "user", "content": text}]


def together(engine, jobs):
    """Every (messages, settings, adapter) queued before the worker takes its batch; their final replies."""
    streams = [engine.stream(m, s, a) for m, s, a in jobs]
    firsts = [next(s) for s in streams]
    out = []
    for first, s in zip(firsts, streams):
        last = first
        for last in s:  # noqa: B007
            pass
        out.append(last.strip())
    return out


def replies(mode, cfg, adapters):
    """Replies alone (base, each adapter; greedy and sampled) and in one mixed batch, from an engine in `mode`.

    The 4-bit engine keeps bitsandbytes' plain layout, the forward training runs (modeling.py): on a CPU with
    AVX512-BF16 the chat's 4-bit path was a repacked kernel that rounds inputs and block scales to bf16 (logits off
    by ~0.3 here), which the dequantized copy does not copy; elsewhere the plain layout is the 4-bit path."""
    from qlora_ui.modeling import keep_4bit_layout_trainable

    eng = ChatEngine(dequantize=mode)
    eng.load(cfg)
    if mode == "off":
        keep_4bit_layout_trainable(eng.model)  # before the first forward, which would repack
    names = [eng.load(cfg, a) for a in adapters]
    greedy = GenerationSettings(max_new_tokens=10)
    sampled = GenerationSettings(max_new_tokens=10, temperature=0.9, top_p=0.8, seed=7)
    alone = [eng.reply(msgs(p), s, a) for p in PROMPTS for s in (greedy, sampled) for a in [None, *names]]
    before = eng.server.batches_served
    mixed = together(eng, [(msgs(PROMPTS[0]), greedy, a) for a in [None, *names]])
    assert eng.server.batches_served == before + 1  # one batch: peft's mixed-adapter forward
    return eng, alone, mixed


def test_dequantized_base_gives_the_4bit_replies_with_adapters_on_off_and_mixed(cfg, adapters):
    import torch

    fast, fast_alone, fast_mixed = replies("on", cfg, adapters)
    slow, slow_alone, slow_mixed = replies("off", cfg, adapters)
    assert fast.decoding_from.startswith("dequantized") and decode_weights.is_dequantized(fast.model)
    assert slow.decoding_from.startswith("4-bit") and not decode_weights.is_dequantized(slow.model)
    assert fast_alone == slow_alone
    ids = torch.tensor([fast.tokenizer(PROMPTS[1])["input_ids"]])
    with torch.no_grad(), fast.model.disable_adapter(), slow.model.disable_adapter():
        assert torch.equal(fast.model(input_ids=ids).logits, slow.model(input_ids=ids).logits)  # bit for bit
    assert fast_mixed == slow_mixed
    assert fast_mixed == fast_alone[:3]  # the batch gives each row its reply alone
    assert len(set(fast_mixed)) == 3  # base and both adapters answer differently: the comparison is not vacuous


def test_the_dense_copy_holds_the_nf4_values_not_the_16bit_checkpoint(cfg):
    """The adapter was trained against the dequantized NF4 weights: the copy must be those, not the original."""
    import bitsandbytes.functional as bf
    import torch
    from safetensors.torch import load_file

    eng = ChatEngine(dequantize="on")
    eng.load(cfg)
    layer = eng.model.model.layers[0].mlp.up_proj
    plain = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(layer.dense_weight.dtype)
    assert torch.equal(layer.dense_weight, plain)
    original = load_file(str(cfg.model.base_model) + "/model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(layer.dense_weight, original.to(layer.dense_weight.dtype))


def test_auto_dequantizes_only_without_a_fast_kernel_and_within_the_budget(cfg32, monkeypatch):
    cfg = cfg32

    def engine():
        eng = ChatEngine()  # auto
        eng.load(cfg)
        return eng

    # bitsandbytes' fused AVX512-BF16 (or GPU) kernel beats the copy: decoding is memory-bound (docs/performance.md).
    monkeypatch.setattr(decode_weights, "fast_4bit_kernel", lambda model: "a fused test kernel")
    fused = engine()
    assert fused.decoding_from.startswith("4-bit") and "a fused test kernel" in fused.decoding_from
    assert not decode_weights.is_dequantized(fused.model)
    monkeypatch.setattr(decode_weights, "fast_4bit_kernel", lambda model: None)  # the plain dequantize path
    small = engine()
    assert small.decoding_from.startswith("dequantized")  # a tiny model is well within the budget
    need = decode_weights.dense_bytes(small.model)
    monkeypatch.setattr(decode_weights, "MAX_BYTES", need - 1)
    over = engine()
    assert over.decoding_from.startswith("4-bit") and "over the budget" in over.decoding_from
    assert not decode_weights.is_dequantized(over.model)
    monkeypatch.setattr(decode_weights, "MAX_BYTES", 1 << 40)
    monkeypatch.setattr(decode_weights, "available_ram", lambda: 10 * need - 10)  # the copy is over 10% of it
    assert engine().decoding_from.startswith("4-bit")


def test_the_fused_kernel_is_seen_where_bitsandbytes_would_use_it(cfg32):
    from qlora_ui.modeling import keep_4bit_layout_trainable

    eng = ChatEngine(dequantize="off")
    eng.load(cfg32)
    has_avx512_bf16 = any(getattr(m, "support_avx512bf16_for_cpu", False) for m in eng.model.modules())
    assert (decode_weights.fast_4bit_kernel(eng.model) is not None) == has_avx512_bf16
    keep_4bit_layout_trainable(eng.model)  # the plain layout (DoRA's, training's): no fused kernel
    assert decode_weights.fast_4bit_kernel(eng.model) is None


def test_a_dora_adapter_keeps_the_4bit_path_and_its_replies(cfg32, tmp_path):
    cfg = cfg32
    from qlora_ui.modeling import load_for_training

    dora = cfg.updated(use_dora=True)
    m = nudge_adapter(load_for_training(dora.model, dora.quantization, dora.lora, False).model, seed=4, scale=0.5)
    m.save_pretrained(tmp_path)
    s = GenerationSettings(max_new_tokens=10)
    out = {}
    for mode in ("on", "off"):
        eng = ChatEngine(dequantize=mode)
        eng.load(cfg)
        name = eng.load(cfg, tmp_path)
        assert eng.decoding_from.startswith("4-bit")  # reloaded in the plain 4-bit layout DoRA needs
        out[mode] = [eng.reply(msgs(PROMPTS[0]), s, a) for a in (None, name)]
    assert out["on"] == out["off"] and out["on"][0] != out["on"][1]


def test_an_unknown_mode_is_refused_with_the_modes():
    with pytest.raises(ChatError, match="auto, on, off"):
        ChatEngine(dequantize="yes")


def _pick_full_sort(logits, r, gen) -> int:
    """serving._pick before the top-k nucleus, with its sort made stable: the reference the new one must match token
    for token. (The old sort was unstable: which of several equal probabilities at the nucleus' edge it kept was
    torch's internal order; the new nucleus keeps them lowest token id first, as a stable sort does.)"""
    import torch

    if r.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / r.temperature, dim=-1)
    if r.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True, stable=True)
        keep = sorted_p.cumsum(-1) - sorted_p < r.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def test_topk_nucleus_draws_the_tokens_the_full_sort_drew():
    import torch

    vocab, draws, grew, edge_ties = 49152, 0, 0, 0
    gen = torch.Generator().manual_seed(0)
    for top_p in (0.05, 0.5, 0.9, 0.95, 0.999, 0.99999):
        for temperature in (0.3, 0.7, 1.0, 1.5):
            for scale in (0.5, 3.0, 10.0):  # flat to peaked: nuclei from one token to most of the vocabulary
                logits = torch.randn(vocab, generator=gen) * scale
                if temperature != 1.0:  # bf16 logits, as the model gives them: many equal probabilities
                    logits = logits.bfloat16().float()
                r = Request(ids=[1], temperature=temperature, top_p=top_p, max_new_tokens=1, seed=0, adapter=None)
                probs = torch.softmax(logits / temperature, dim=-1)
                sorted_p, order = probs.sort(descending=True, stable=True)
                keep = sorted_p.cumsum(-1) - sorted_p < top_p
                grew += int(keep.sum()) > 256  # the search had to widen past its first k
                edge = sorted_p[int(keep.sum()) - 1]
                edge_ties += int((sorted_p[keep] == edge).sum()) < int((probs == edge).sum())  # a tie cut in two
                # The same probabilities kept, bit for bit, at the same places.
                assert torch.equal(_nucleus(probs, top_p), torch.zeros_like(probs).scatter(0, order, sorted_p * keep))
                for seed in range(3):
                    a = _pick(logits, r, torch.Generator().manual_seed(seed))
                    b = _pick_full_sort(logits, r, torch.Generator().manual_seed(seed))
                    assert a == b, (top_p, temperature, scale, seed)
                    draws += 1
    assert draws == 216 and grew > 10 and edge_ties > 10
    probs = torch.softmax(torch.randn(vocab, generator=gen), dim=-1)
    assert int((_nucleus(probs, 0.0) > 0).sum()) == 1  # top_p 0: the likeliest token, not an empty set (NaN)
