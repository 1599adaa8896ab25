"""bench/quality.py's core on the tiny random model: the table's shape and ratios, not the real numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from tests.fault_helpers import ROOT, make_cfg


def load_bench():
    if "bench_quality" not in sys.modules:  # bench/ is scripts, not a package
        if str(ROOT / "bench") not in sys.path:  # as when run as a script: bench/common.py imports as `common`
            sys.path.append(str(ROOT / "bench"))
        spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_quality"] = mod  # dataclasses look their module up here
        spec.loader.exec_module(mod)
    return sys.modules["bench_quality"]


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def tiny_cfg(tiny_model_dir, tmp_path_factory):
    return make_cfg(tiny_model_dir, preset="cpu-quickstart", max_rows=60, eval_fraction=0.1, max_steps=2, eval_steps=1,
                    save_steps=2, batch_size=4, runs_dir=str(tmp_path_factory.mktemp("runs")))


def test_every_variant_gives_a_table_against_16bit_lora(bench, tiny_cfg):
    results = bench.train_all(tiny_cfg)  # also checks: same held-out rows, same LoRA init, adapters trained
    assert [r.key for r in results] == ["lora16", "nf4_dq", "fp4", "nf4", "nf4_loftq", "nf4_dora", "nf4_fp32", "nf4_2x"]
    assert len({r.eval_hash for r in results}) == 1 and results[0].eval_rows == 6
    for r in results:
        # step 0 = the (quantized) base, then every step; (h) trains twice as long
        assert [s for s, _ in r.eval_curve] == ([0, 1, 2, 3, 4] if r.key == "nf4_2x" else [0, 1, 2])
        assert math.isfinite(r.eval_loss) and r.eval_loss == r.eval_curve[-1][1]
    assert results[0].footprint_mb > results[1].footprint_mb  # the 16-bit base really is 16-bit

    rows = bench.comparison_rows(results)
    base = results[0].eval_loss
    assert [r["key"] for r in rows] == [v.key for v in bench.VARIANTS] + ["best_nf4"]
    same_steps = [r.eval_loss for r in results if r.key in bench.NF4_KEYS]
    assert rows[-1]["eval_loss"] == min(same_steps) and rows[-1]["met"] == (min(same_steps) / base <= 1.02)
    assert rows[-2]["goal"] == "-"  # twice the steps: no goal at the same step count
    assert rows[0]["ratio"] == 1.0 and rows[0]["goal"] == "baseline" and rows[0]["met"] is None
    for row, res in zip(rows, results):
        assert row["ratio"] == pytest.approx(res.eval_loss / base)
    assert rows[1]["met"] == (rows[1]["ratio"] <= bench.GOAL_RATIO)
    assert rows[2]["met"] == (results[1].eval_loss <= results[2].eval_loss and
                              results[3].eval_loss <= results[2].eval_loss)
    text = bench.format_table(rows)
    assert [c.strip() for c in text.splitlines()[0].split(" | ")] == ["variant", "eval loss", "ratio to 16-bit",
                                                                       "goal", "met"]
    assert len(text.splitlines()) == 2 + len(rows)
    assert bench.format_table(rows, markdown=True).startswith("| variant | eval loss | ratio to 16-bit | goal | met |")


def test_ratios_are_against_the_baseline_not_the_first_row(bench):
    def res(key, loss):
        return bench.VariantResult(key, key, loss, [(0, loss)], [], "", 0, 0, 0, 1, "h", "h", True)

    rows = bench.comparison_rows([res("lora16", 2.0), res("nf4_dq", 2.1), res("fp4", 2.2), res("nf4", 2.02)])
    assert [round(r["ratio"], 3) for r in rows] == [1.0, 1.05, 1.1, 1.01, 1.01]
    assert [r["met"] for r in rows] == [None, False, True, True, True]  # the last: the best NF4 (nf4, 2.02)
    with pytest.raises(ValueError):
        bench.comparison_rows([res("nf4_dq", 2.0)])
    with pytest.raises(RuntimeError, match="eval_hash"):
        a, b = res("lora16", 2.0), res("nf4", 2.0)
        b.eval_hash = "other"
        bench.check_same_conditions([a, b])


def test_weight_error_and_kl_on_the_tiny_model(bench, tiny_cfg, tokenizer):
    path = tiny_cfg.model.base_model
    w = bench.weight_error(path, tiny_cfg)
    assert w["n_layers"] == 2 * 7 and set(w["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"}
    assert 0 < w["mean"]["nf4"] < w["mean"]["fp4"] < 1  # random normal init: NF4 is the better fit
    assert w["gaussian"]["nf4"] == pytest.approx(0.092, abs=0.005)

    convs, rows = bench.heldout_conversations(tiny_cfg, tokenizer)
    assert len(convs) == len(rows) == 6
    kl = bench.output_kl(path, tiny_cfg, rows)
    assert kl["models"]["bf16"]["kl_all"] == pytest.approx(0.0, abs=1e-6)
    assert all(kl["models"][s]["kl_all"] > 0 for s in ("nf4_dq", "fp4", "nf4"))
    assert kl["preamble_tokens"] > 0  # the template's fixed system prompt, reported apart from the held-out text
    assert kl["tokens"]["all"] == kl["tokens"]["preamble"] + kl["tokens"]["text"] > kl["tokens"]["response"] > 0


def test_style_score():
    from qlora_ui.evidence import quantization_evidence  # noqa: F401 - imported without gradio

    bench = load_bench()
    s = bench.style_score("Arr! Th' sun be about 93 million miles from earth, matey. Yo-ho-ho!")
    assert s["format"] and s["pirate_words"] == 4  # arr, th', matey, yo-ho-ho
    assert not bench.style_score("The sun is 93 million miles away.")["starts_arr"]
    summary = bench.style_summary(["Arr! Aye. Yo-ho-ho!", "Hello there."])
    assert summary["format"] == 0.5 and summary["answers"] == 2


def test_evidence_sentence(tmp_path):
    from qlora_ui.evidence import quantization_evidence

    missing = quantization_evidence(tmp_path / "none.json")
    assert "docs/quality.md" in missing and "%" not in missing
    f = tmp_path / "quality.json"
    f.write_text(json.dumps({"config": {"max_steps": 150}, "table": [
        {"key": "lora16", "ratio": 1.0}, {"key": "nf4_dq", "ratio": 1.0123}, {"key": "fp4", "ratio": 1.05}]}))
    assert "within 1.2% of 16-bit LoRA" in quantization_evidence(f)
    f.write_text(json.dumps({"config": {"max_steps": 40}, "table": [
        {"key": "lora16", "ratio": 1.0}, {"key": "nf4_dq", "ratio": 1.08},
        {"key": "best_nf4", "ratio": 1.031, "best": "nf4_loftq"}]}))
    assert quantization_evidence(f).startswith("NF4 kept eval loss within 8.0% of 16-bit LoRA here after 40 steps "
                                               "on the bundled model; with LoRA init loftq it was +3.1%")
    f.write_text(json.dumps({"table": [{"key": "nf4_dq", "ratio": 0.995}]}))
    assert "0.5% lower" in quantization_evidence(f)
    f.write_text("{not json")
    assert quantization_evidence(f) == missing


def test_eval_forward_leaves_4bit_lora_gradients_intact(tiny_model_dir):
    """The bench's eval curves need this: on AVX512-BF16 CPUs a no-grad eval forward used to repack the 4-bit
    weights for a kernel without backward, and every later gradient stopped at the 4-bit layers."""
    import torch

    from qlora_ui.config import RunConfig
    from qlora_ui.modeling import load_for_training

    cfg = RunConfig().updated(base_model=str(tiny_model_dir), lora_dropout=0.0)
    model = load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))

    def lora_b_grads():
        model.zero_grad(set_to_none=True)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n}

    before = lora_b_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what Trainer.evaluate does
    after = lora_b_grads()
    for n, g in before.items():
        assert float((after[n] - g).norm()) <= 0.05 * float(g.norm()), n


def test_loftq_error_table_on_the_tiny_model(bench, tiny_cfg):
    e = bench.loftq_error(tiny_cfg.model.base_model, tiny_cfg)
    assert e["n_layers"] == 14 and set(e["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}
    for t, v in e["by_type"].items():
        assert 0 < v["loftq"] < v["nf4_dq"], t
    text = bench.loftq_table(e)
    assert "mean of all" in text and len(text.splitlines()) == 2 + 8
