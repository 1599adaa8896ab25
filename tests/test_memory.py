"""The memory planner: the QLoRA paper's numbers, its own consistency, the CLI, and a real measured step."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_ui import memory, plan_cli, plots
from qlora_ui.config import BUNDLED_MODEL, RunConfig, load_preset
from qlora_ui.memory import (
    CONST_BITS_DOUBLE,
    CONST_BITS_SINGLE,
    GB,
    PlanSettings,
    ShapeError,
    estimate,
    plan_for_config,
    resolve_shape,
)

ROOT = Path(__file__).resolve().parent.parent


def cfg_for(model: str, **flat) -> RunConfig:
    return RunConfig().updated(base_model=model, **flat)


def paper_plan(**flat):
    """LLaMA-65B at the paper's settings (Guanaco 65B: batch 1, 512 tokens, r 64 on all linear layers,
    paged AdamW 32-bit, checkpointing), with the paper code's bf16 adapters and embeddings."""
    cfg = cfg_for("llama-65b", batch_size=1, max_length=512, lora_r=64, **flat)
    return plan_for_config(cfg, 48, precision="paper")


# ---------------------------------------------------------------- the paper's table

def test_full_finetune_65b_is_780gb():
    plan = paper_plan()
    full = plan.to_json()["full_finetune_gb"]
    assert abs(full - 780) / 780 < 0.05
    # 780 GB = 16-bit weights + 16-bit gradients + 32-bit Adam: 2 + 2 + 8 bytes per parameter.
    parts = plan.breakdown["full_finetune"]
    n = plan.shape.total_params
    assert parts["weights"] == 2 * n and parts["gradients"] == 2 * n and parts["optimizer"] == 8 * n


@pytest.mark.parametrize("precision", ["paper", "app"])
def test_qlora_65b_is_the_documented_figure(precision):
    cfg = cfg_for("llama-65b", batch_size=1, max_length=512, lora_r=64)
    plan = plan_for_config(cfg, 48, precision=precision)
    j = plan.to_json()
    # The figures docs/memory.md states (47.0 GB with the paper's precisions; 51.2 GB with this app's fp32
    # adapters and embeddings), to 1%: a drift of a gigabyte in the 65B headline is a regression.
    if precision == "paper":
        assert j["qlora_gb"] == pytest.approx(46.98, rel=0.01)
        assert j["verdict"] == "tight"
    else:
        # This app keeps adapters and embeddings in fp32 (peft's defaults): more than 48 GB, so on 48 GB it
        # runs only by paging optimizer state to CPU — which is what paged optimizers are for.
        assert j["qlora_gb"] == pytest.approx(51.23, rel=0.01)
        assert j["qlora_gb"] - plan.spillable_gb() < 48 < j["qlora_gb"]
        assert j["verdict"] == "tight"


def test_double_quant_saves_0373_bits_per_param_about_3gb_at_65b():
    assert CONST_BITS_SINGLE == pytest.approx(0.5)
    assert CONST_BITS_DOUBLE == pytest.approx(0.127, abs=0.001)
    plan = paper_plan()
    saved = plan.breakdown["qlora_no_double_quant"]["quant_constants"] - plan.breakdown["qlora"]["quant_constants"]
    assert saved * 8 / plan.shape.quantized_params == pytest.approx(0.373, abs=0.002)
    assert 2.9 < saved / GB < 3.1
    j = plan.to_json()
    assert j["qlora_no_double_quant_gb"] - j["qlora_gb"] == pytest.approx(saved / GB, abs=0.01)


def test_qlora_weights_are_about_4_bits_per_param():
    plan = paper_plan()
    q = plan.breakdown["qlora"]
    bits = (q["weights"] + q["quant_constants"]) * 8 / plan.shape.total_params
    assert 4.1 < bits < 4.3  # 4 + 0.127, plus the 16-bit embeddings and lm_head


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("name,billions", [
    ("llama-7b", 6.74), ("llama-13b", 13.02), ("llama-33b", 32.53), ("llama-65b", 65.29),
    ("llama-2-70b", 68.98), ("mistral-7b", 7.24), ("qwen2.5-0.5b", 0.494), ("qwen2.5-7b", 7.62),
    ("smollm2-135m", 0.1345),
])
def test_shipped_shapes_match_published_parameter_counts(name, billions):
    assert resolve_shape(name).total_params / 1e9 == pytest.approx(billions, rel=0.005)


@pytest.mark.parametrize("name,shape", [
    ("huggyllama/llama-65b", "llama-65b"), ("huggyllama/llama-30b", "llama-33b"), ("LLAMA-7B", "llama-7b"),
    ("mistralai/Mistral-7B-v0.1", "mistral-7b"), ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"), (BUNDLED_MODEL, "smollm2-135m"),
])
def test_names_and_hub_ids_resolve(name, shape):
    assert resolve_shape(name).name == shape


def test_bundled_model_is_planned_without_converting_it(monkeypatch):
    from qlora_ui import modeling

    def boom():
        raise AssertionError("the planner must not convert or load the bundled model")

    monkeypatch.setattr(modeling, "ensure_bundled_model", boom)
    plan = plan_for_config(RunConfig(), 24)
    assert plan.shape.name == "smollm2-135m"


def test_local_config_json_counts_like_transformers(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = resolve_shape(str(tiny_model_dir))
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads) == (64, 128, 2, 4, 2)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    # The config.json file itself works too.
    assert resolve_shape(str(tiny_model_dir / "config.json")).total_params == shape.total_params
    plan = plan_for_config(cfg_for(str(tiny_model_dir)), 1)
    assert plan.to_json()["qlora_gb"] > 0


def test_qwen_style_config_counts_attention_bias(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    conf = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    conf.save_pretrained(tmp_path)
    shape = resolve_shape(str(tmp_path))
    assert shape.attention_bias
    assert shape.total_params == sum(p.numel() for p in AutoModelForCausalLM.from_config(conf).parameters())


def test_unknown_model_lists_known_shapes(tmp_path):
    with pytest.raises(ShapeError, match="llama-65b"):
        resolve_shape("nobody/no-such-model")
    with pytest.raises(ShapeError, match="config.json"):
        resolve_shape(str(tmp_path))  # a folder without config.json


# ---------------------------------------------------------------- behaviour of the estimate

def qlora_gb(**kw) -> float:
    s = PlanSettings(**kw)
    return sum(estimate(resolve_shape("llama-7b"), s)["qlora"].values()) / GB


def test_monotone_in_batch_seq_rank():
    assert qlora_gb(batch=1) < qlora_gb(batch=2) < qlora_gb(batch=8)
    assert qlora_gb(seq=256) < qlora_gb(seq=512) < qlora_gb(seq=2048)
    assert qlora_gb(rank=8) < qlora_gb(rank=64)


def test_checkpointing_and_8bit_optimizer_save_memory():
    assert qlora_gb(gradient_checkpointing=True) < qlora_gb(gradient_checkpointing=False)
    assert qlora_gb(optimizer="paged_adamw_8bit") < qlora_gb(optimizer="paged_adamw_32bit")
    parts = estimate(resolve_shape("llama-7b"), PlanSettings(optimizer="paged_adamw_8bit"))["qlora"]
    assert parts["optimizer"] == pytest.approx(parts["adapter"] / 4 * 2)  # 2 bytes per fp32 adapter weight


def test_methods_are_ordered_and_lora_trains_only_adapters():
    parts = estimate(resolve_shape("llama-13b"), PlanSettings())
    totals = {m: sum(p.values()) for m, p in parts.items()}
    assert totals["qlora"] < totals["qlora_no_double_quant"] < totals["lora_16bit"] < totals["full_finetune"]
    assert parts["qlora"]["gradients"] == parts["qlora"]["adapter"]  # gradients only for trainable weights
    assert parts["lora_16bit"]["quant_constants"] == 0 and parts["full_finetune"]["adapter"] == 0


def test_verdict_and_advice():
    cfg = cfg_for("llama-7b", batch_size=4, max_length=512, gradient_checkpointing=False)
    roomy = plan_for_config(cfg, 400)
    assert roomy.verdict == "fits" and roomy.advice == ""
    small = plan_for_config(cfg, 24)
    assert small.verdict == "will not fit"
    assert "gradient checkpointing" in small.advice  # the first change that costs no quality
    # The advice is a single change that makes it fit.
    assert plan_for_config(cfg.updated(gradient_checkpointing=True), 24).verdict == "fits"
    hopeless = plan_for_config(cfg_for("llama-65b"), 4)
    assert hopeless.verdict == "will not fit" and "smaller model" in hopeless.advice


def test_16bit_base_gets_4bit_advice():
    plan = plan_for_config(cfg_for("llama-7b", load_in_4bit=False), 12)
    assert plan.method == "lora_16bit" and plan.verdict == "will not fit"
    assert "4-bit" in plan.advice


def test_detect_device_memory():
    gb, label = memory.detect_device_memory_gb()
    assert gb > 0.5
    import torch

    assert label.startswith("GPU" if torch.cuda.is_available() else "RAM")


def test_figure_has_stacked_parts_device_line_and_verdict():
    plan = plan_for_config(cfg_for("llama-13b"), 24)
    fig = plots.plan_figure(plan)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.name for b in bars] == [p.replace("_", " ") for p in memory.PARTS]
    assert all(len(b.y) == 4 for b in bars)
    assert fig.layout.barmode == "stack"
    assert any(s.y0 == pytest.approx(24) for s in fig.layout.shapes)
    assert plan.verdict in fig.layout.title.text


@pytest.mark.parametrize("mixed_precision", [False, True], ids=["fp32", "bf16-autocast"])
def test_activation_model_matches_autograd_saved_tensors(tiny_model_dir, mixed_precision):
    """The per-layer tensor list equals what autograd really saves in one decoder layer (CPU, no checkpointing):
    without mixed precision, and with it as training.py runs it (frozen weights in bf16, bf16 autocast)."""
    import contextlib

    import torch

    from qlora_ui.batching import frozen_to_compute_dtype
    from qlora_ui.modeling import load_for_training

    cfg = cfg_for(str(tiny_model_dir))
    net = load_for_training(cfg.model, cfg.quantization, cfg.lora, gradient_checkpointing=False).model
    if mixed_precision:
        frozen_to_compute_dtype(net, torch.bfloat16)
    net.train()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    layer = net.base_model.model.model.layers[1]
    saved: dict[int, int] = {}
    recording = []
    layer.register_forward_pre_hook(lambda *a: recording.append(1))
    layer.register_forward_hook(lambda *a: recording.clear())

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if recording and ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    b, s = 2, 32
    ids = torch.randint(3, 1000, (b, s))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed_precision else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
    shape = resolve_shape(str(tiny_model_dir))
    settings = PlanSettings(device="cpu", mixed_precision=mixed_precision)
    predicted = sum(memory.layer_saved_tensors(shape, settings, "qlora").values()) * b * s
    # The rotary cos/sin (shared by every layer) is the only thing the list leaves out.
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.05)


# ---------------------------------------------------------------- CLI

def run_plan(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    plan_cli.add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_keys_and_paper_numbers(capsys):
    rc, out, _ = run_plan(["--model", "llama-65b", "--batch", "1", "--seq", "512", "--rank", "64", "--json",
                           "--device-gb", "48"], capsys)
    assert rc == 0
    j = json.loads(out)
    for key in ("full_finetune_gb", "lora_16bit_gb", "qlora_gb", "qlora_no_double_quant_gb", "breakdown",
                "device_gb", "verdict"):
        assert key in j
    assert set(j["breakdown"]) == set(memory.METHODS)
    assert set(j["breakdown"]["qlora"]) == set(memory.PARTS)
    assert abs(j["full_finetune_gb"] - 780) / 780 < 0.05
    assert j["device_gb"] == 48 and j["verdict"] == "tight"  # 51.2 GB with paged optimizer state to spill


def test_cli_text_and_flags(capsys):
    rc, out, _ = run_plan(["--model", "llama-7b", "--no-gradient-checkpointing", "--optimizer", "paged_adamw_8bit",
                           "--device-gb", "8"], capsys)
    assert rc == 0
    assert "QLoRA (NF4 + double quant)" in out and "paged_adamw_8bit" in out and "checkpointing off" in out


def test_cli_bad_model_exits_2_with_one_line(capsys):
    rc, out, err = run_plan(["--model", "llama-9000b"], capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "llama-65b" in err and "llama-9000b" in err


def test_cli_bad_value_exits_2(capsys):
    rc, _, err = run_plan(["--model", "llama-7b", "--batch", "0"], capsys)
    assert rc == 2 and "batch_size" in err


def test_cli_preset_plans_for_its_gpu(capsys):
    rc, out, _ = run_plan(["--preset", "gpu-65b-48gb", "--json"], capsys)
    j = json.loads(out)
    assert rc == 0 and j["device_gb"] == 48 and j["shape"] == "llama-65b"


def test_main_cli_has_plan():
    proc = subprocess.run([sys.executable, "-m", "qlora_ui", "plan", "--model", "llama-65b", "--json",
                           "--device-gb", "48"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shape"] == "llama-65b"


def test_engine_does_not_import_gradio():
    code = "import sys, qlora_ui.memory as m; m.plan_for_config(m.RunConfig(), 8); assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------- presets and the UI panel

GPU_PRESETS = {"gpu-7b-24gb": "llama-7b", "gpu-13b-24gb": "llama-13b", "gpu-33b-48gb": "llama-33b",
               "gpu-65b-48gb": "llama-65b"}
GPU_VERDICTS = {"gpu-7b-24gb": "fits", "gpu-13b-24gb": "fits", "gpu-33b-48gb": "fits", "gpu-65b-48gb": "tight"}


@pytest.mark.parametrize("name,shape", GPU_PRESETS.items())
def test_gpu_presets_fit_their_gpu(name, shape):
    cfg = load_preset(name)
    assert "/" in cfg.model.base_model  # a hub id
    assert resolve_shape(cfg.model.base_model).name == shape
    assert cfg.lora.lora_r == 64 and cfg.lora.lora_alpha == 16 and cfg.training.optimizer == "paged_adamw_32bit"
    assert cfg.training.batch_size * cfg.training.grad_accum == 16
    plan = plan_for_config(cfg, memory.preset_target_gb(name))
    assert plan.verdict == GPU_VERDICTS[name], plan.markdown()
    assert name in memory.preset_verdict(name, cfg)


def test_memory_panel_updates_for_every_preset():
    import re

    from qlora_ui.config import list_presets
    from qlora_ui.ui.memory_panel import update_memory_panel

    # The verdict each bundled preset must get: on this CPU for the CPU presets, on the GPU a gpu-* preset is
    # named for (the 65B recipe needs 47.0 of 48 GB: tight, as in the paper).
    expected = {"cpu-quickstart": "FITS", "qlora-paper": "FITS", "gpu-7b-24gb": "fits", "gpu-13b-24gb": "fits",
                "gpu-33b-48gb": "fits", "gpu-65b-48gb": "tight"}
    assert set(expected) <= set(list_presets())
    for name, want in expected.items():
        fig, md = update_memory_panel(load_preset(name), preset=name)
        assert fig is not None, name
        if name.startswith("gpu-"):
            got = re.findall(r"→ \*\*([a-z ]+)\*\*", md)[0]
        else:
            got = re.findall(r'qs-badge [a-z-]+">([A-Z ]+)<', md)[0]
        assert got == want, (name, md[:300])
    fig, md = update_memory_panel(cfg_for("nobody/nothing"))
    assert fig is None and "No memory estimate" in md


def test_memory_panel_shows_the_parts_behind_each_total():
    """Issue 24, newcomer item 8: "QLoRA 3.98 GB vs 16-bit LoRA 3.53 GB vs full 3.39 GB" beside "saves 37%" read
    as QLoRA costing the most. The panel splits each total into weights / activations / trainable state and says
    what the saving is about and what dominates, with the estimate's own numbers."""
    import re

    from qlora_ui.ui.memory_panel import update_memory_panel

    cfg = load_preset("cpu-quickstart")
    assert cfg.model.base_model == BUNDLED_MODEL
    plan = plan_for_config(cfg)
    _, md = update_memory_panel(cfg)
    b = {m: {p: v / memory.GB for p, v in parts.items()} for m, parts in plan.breakdown.items()}
    rows = {}
    for line in md.splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in memory.METHODS.values():
            rows[cells[0]] = [float(c.removesuffix(" GB")) for c in cells[1:]]
    assert set(rows) == {memory.METHODS[m] for m in ("qlora", "lora_16bit", "full_finetune")}, md
    for m in ("qlora", "lora_16bit", "full_finetune"):
        weights, act, trainable, total = rows[memory.METHODS[m]]
        assert weights == pytest.approx(b[m]["weights"] + b[m]["quant_constants"], abs=0.006)
        assert act == pytest.approx(b[m]["activations"], abs=0.006)
        assert trainable == pytest.approx(b[m]["adapter"] + b[m]["gradients"] + b[m]["optimizer"], abs=0.006)
        assert total == pytest.approx(plan.total_gb(m), abs=0.006)
        assert weights + act + trainable == pytest.approx(total, abs=0.02)
    # The saving is stated as a saving on the weights, in GB and as a share of them, not of the total.
    saved = b["lora_16bit"]["weights"] - b["qlora"]["weights"] - b["qlora"]["quant_constants"]
    m = re.search(r"4-bit saves \*\*([0-9.]+) GB on the base weights\*\* \((\d+)% of them\)", md)
    assert m, md
    assert float(m.group(1)) == pytest.approx(saved, abs=0.006)
    assert int(m.group(2)) == round(100 * saved / b["lora_16bit"]["weights"])
    # On the bundled model activations dominate, and the text says so and why QLoRA's total is the larger.
    assert b["qlora"]["activations"] > plan.total_gb("qlora") / 2
    assert "activations dominate" in md and "outweighs the weight saving on this model" in md
    # A 7B model at 512 tokens: QLoRA's total is the smaller, so no "outweighs" sentence.
    _, md7 = update_memory_panel(load_preset("gpu-7b-24gb"), preset="gpu-7b-24gb")
    assert "4-bit saves **" in md7 and "outweighs" not in md7


def test_memory_panel_builds_components():
    import gradio as gr

    from qlora_ui.ui.memory_panel import build_memory_panel

    with gr.Blocks():
        comps = build_memory_panel()
    assert isinstance(comps["plot"], gr.Plot) and isinstance(comps["verdict"], gr.Markdown)


# ---------------------------------------------------------------- against a measured training step

def measure(model: str, batch: int, seq: int) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "measure_memory.py"), "--model", model,
                           "--batch", str(batch), "--seq", str(seq), "--json", "--threads", "1", "--tensors"],
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]


# est/measured against the live tensors, as measured (docs/memory.md, "Estimate vs measurement"): tiny 1.00,
# bundled 1.05 — the same in every run and on every CPU path tried, because the tally counts tensors only. The
# bundled model's 5% is the planner counting the LoRA gradients (20 MB) at the loss phase, which comes before
# backward has made any. The band leaves 3% below and above those.
TENSOR_BAND = (0.97, 1.08)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tiny", "bundled"])
def test_estimate_matches_a_measured_step_as_documented(case, tiny_model_dir, bundled_dir):
    """A real NF4 + LoRA training step (2 steps, so the optimizer state exists), to what docs/memory.md claims:
    the planner's step memory (gradients + optimizer + activations) within 20% of the measured peak RSS increase
    (what a user sees; it moves with glibc and with the kernels oneDNN picks for the CPU), its tensor part within
    TENSOR_BAND of the peak of the live tensors the step creates (bench/measure_memory.py's TensorTally: the
    allocator's view, independent of the CPU), and the loaded model to 10%."""
    model, batch, seq = (str(tiny_model_dir), 2, 128) if case == "tiny" else (str(bundled_dir), 2, 256)
    rows = [{k: v for k, v in r.items() if k != "raw"} for r in measure(model, batch, seq)]
    row = next(r for r in rows if "ratio" in r)
    print(json.dumps(row))  # with -s, the numbers behind the verdict (docs/memory.md records them per CPU)
    assert 0.8 <= row["ratio"] <= 1.2, row
    low, high = TENSOR_BAND
    assert row.get("ratio_tensors") is not None and low <= row["ratio_tensors"] <= high, row
    # The loaded weights too: NF4 + constants + fp32 embeddings + adapters, against the tensors in memory.
    assert row["est_static_gb"] == pytest.approx(row["tensor_gb"], rel=0.1)


def test_settings_from_config_follow_the_config():
    cfg = cfg_for("llama-7b", batch_size=3, max_length=256, lora_r=8, optimizer="adamw_8bit",
                  gradient_checkpointing=False, double_quant=False)
    s = PlanSettings.from_config(cfg)
    assert (s.batch, s.seq, s.rank, s.optimizer, s.gradient_checkpointing) == (3, 256, 8, "adamw_8bit", False)
    assert s.method == "qlora_no_double_quant"
    assert dataclasses.replace(s, load_in_4bit=False).method == "lora_16bit"
