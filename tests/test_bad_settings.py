"""Bad form values and bad model folders: one readable message naming the setting and what to do.

Each case runs three ways: the CLI in a subprocess (exit 2, one `error:` paragraph, no traceback, no run folder),
the handler the Start button calls (a `gr.Error`, no run folder, the app not busy), and, in one slow test, a
running app driven through its HTTP API with gradio_client (refused, and the app keeps serving).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from qlora_ui.studio import Studio
from qlora_ui.ui.tabs import model_data, train
from tests.fault_helpers import (
    BAD,
    FORM,
    ByName,
    bad_model_folders,
    cli,
    fast_cfg,
    form,
    form_input,
    run_dirs,
    wait_for,
    write_rows,
)

# (id, values as a user types them, words the answer must contain)
SETTINGS = [
    ("rank_0", {"lora_r": 0}, ("lora_r", "1..256")),
    ("rank_negative", {"lora_r": -8}, ("lora_r", "1..256")),
    ("rank_fraction", {"lora_r": 2.5}, ("lora_r", "whole number")),
    ("rank_absurd", {"lora_r": 100_000}, ("lora_r", "1..256")),
    ("alpha_0", {"lora_alpha": 0}, ("lora_alpha", "1..512")),
    ("dropout_over", {"lora_dropout": 0.9}, ("lora_dropout", "0..0.5")),
    ("lr_negative", {"learning_rate": -1}, ("learning_rate", "1e-07..0.01")),
    ("lr_zero", {"learning_rate": 0}, ("learning_rate", "1e-07..0.01")),
    ("lr_absurd", {"learning_rate": 5}, ("learning_rate", "1e-07..0.01")),
    ("lr_text", {"learning_rate": "fast"}, ("learning_rate", "not a number")),
    ("lr_nan", {"learning_rate": "nan"}, ("learning_rate", "finite")),
    ("lr_inf", {"learning_rate": "inf"}, ("learning_rate", "finite")),
    ("batch_0", {"batch_size": 0}, ("batch_size", "1..512")),
    ("grad_accum_0", {"grad_accum": 0}, ("grad_accum", "1..512")),
    ("max_steps_negative", {"max_steps": -5}, ("max_steps", "0..")),
    ("epochs_0", {"epochs": 0}, ("epochs", "0.01..100")),
    ("max_length_below_min", {"max_length": 8}, ("max_length", "16..32768")),
    ("eval_fraction_over", {"eval_fraction": 0.9}, ("eval_fraction", "0..0.5")),
    ("save_steps_0", {"save_steps": 0}, ("save_steps", "1..")),
    ("warmup_over", {"warmup_ratio": 2}, ("warmup_ratio", "0..0.5")),
    ("quant_type_unknown", {"quant_type": "int3"}, ("quant_type", "nf4")),
    ("optimizer_unknown", {"optimizer": "sgd"}, ("optimizer", "adamw")),
    ("fp16_without_4bit", {"compute_dtype": "fp16", "load_in_4bit": False}, ("fp16", "bf16")),
    ("name_escape", {"name": "../../etc/evil"}, ("name", "letters")),
    ("target_modules_junk", {"target_modules": "q_proj; rm -rf /"}, ("target_modules", "q_proj,v_proj")),
    ("three_at_once", {"lora_r": 0, "learning_rate": -1, "lora_alpha": 0}, ("lora_r", "learning_rate", "lora_alpha")),
]

# (id, model folder kind from bad_model_folders or a hub id, words)
MODELS = [
    ("model_missing", "missing", ("does not exist", "folder with config.json")),
    ("model_is_a_file", "a_file", ("is a file", "folder that holds config.json")),
    ("model_pickle_only", "pickle_only", ("pickle", "safetensors", "allow_pickle")),
    ("model_remote_code", "remote_code", ("auto_map", "trust_remote_code")),
    ("model_no_config", "no_config", ("no config.json", "pick the folder")),
    ("model_no_weights", "no_weights", ("no weights", "copy the model's weight files")),
    ("model_hub_id_offline", "someorg/some-model", ("offline", "bundled model")),
]

ALL = [(cid, values, words) for cid, values, words in SETTINGS] + [
    (cid, {"base_model": kind}, words) for cid, kind, words in MODELS]
INPUTS_TRIED = len(ALL) + 2  # + max_length under the template's length, + batch larger than the data


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("bad-settings")
    models = bad_model_folders(tmp / "models", tiny_model_dir)
    return tmp, models, write_rows(tmp / "train.jsonl")


def resolve(values: dict, models: dict[str, Path]) -> dict:
    out = dict(values)
    if "base_model" in out:
        out["base_model"] = str(models.get(out["base_model"], out["base_model"]))
    return out


def has_words(text: str, words: tuple[str, ...]) -> bool:
    return all(w.lower() in text.lower() for w in words)


@pytest.mark.parametrize("cid,values,words", ALL, ids=[c[0] for c in ALL])
def test_cli_answers_with_one_message_and_exit_2(env, cid, values, words, tmp_path):
    tmp, models, data = env
    values = resolve(values, models)
    flags = []
    for k, v in {"base_model": models["tiny"], **values}.items():
        flags += ["--" + k.replace("_", "-"), v]
    runs = tmp_path / "runs"
    out = cli("train", "--preset", "cpu-quickstart", "--data", data, "--runs-dir", runs, "--quiet", *flags, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error:") and "Traceback" not in out.stderr, out.stderr
    assert has_words(out.stderr, words), out.stderr
    assert run_dirs(runs) == []  # refused before a run folder exists


@pytest.fixture(scope="module")
def studio(env):
    tmp, models, _ = env
    return Studio(tmp / "ui-runs", model_roots=[tmp / "models"])


@pytest.mark.parametrize("cid,values,words", ALL, ids=[c[0] for c in ALL])
def test_form_answers_with_one_message(studio, env, cid, values, words):
    tmp, models, data = env
    vals = form_input(fast_cfg(models["tiny"], data), **resolve(values, models))
    with pytest.raises(gr.Error) as e:
        train.start_training(studio, FORM, vals)
    msg = str(e.value.message)
    assert has_words(msg, words), msg
    assert "Traceback" not in msg
    assert not studio.busy() and run_dirs(studio.runs_dir) == []


def test_max_length_under_the_template_is_shown_before_start(studio, env):
    """The Model & Data panel answers as soon as max_length changes, before anyone presses Start."""
    tmp, models, data = env
    vals = form_input(fast_cfg(models["tiny"], data, max_length=16))
    summary = model_data.inspect_data(studio, FORM, ByName(), vals)["data_summary"]
    assert has_words(summary, ("0 kept", "max_length 16", "overhead", "raise max_length")), summary


@pytest.mark.slow
def test_cli_max_length_under_the_template_and_batch_larger_than_the_data(env, tmp_path):
    tmp, models, data = env
    runs = tmp_path / "runs"
    common = ["train", "--preset", "cpu-quickstart", "--model", models["tiny"], "--runs-dir", runs, "--quiet",
              "--optimizer", "adamw_torch", "--eval-fraction", 0, "--gradient-checkpointing", "false"]
    out = cli(*common, "--data", data, "--max-length", 16)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert has_words(out.stderr, ("max_length 16", "overhead", "raise max_length")), out.stderr
    assert out.stderr.count("overhead") == 1  # one message, not the same one twice

    # Batch larger than the data is a warning, not a refusal: a small file with a preset's batch still trains.
    small = write_rows(tmp_path / "three.jsonl", 3)
    out = cli(*common, "--data", small, "--batch-size", 8, "--max-steps", 2, "--save-steps", 2)
    assert out.returncode == 0, out.stderr
    assert "batch_size 8 is larger than the 3 training rows" in out.stderr and "Lower batch_size" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_running_app_refuses_every_bad_value_and_keeps_serving(env, tiny_model_dir):
    """Through the HTTP API, as a script or a browser would: each bad value is refused, nothing starts."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from tests.fault_helpers import start_app

    tmp, _, data = env
    app_tmp = tmp / "app"
    app_tmp.mkdir()
    models = bad_model_folders(app_tmp / "models", tiny_model_dir)
    proc, url = start_app(app_tmp, tiny_model_dir)
    runs = app_tmp / "runs"
    try:
        client = Client(url, verbose=False)
        for cid, values, words in ALL:
            vals = form(fast_cfg(models["tiny"], data), **resolve(values, models),
                        data_path=handle_file(str(data)))
            with pytest.raises(AppError) as e:
                client.predict(*vals, api_name="/start_training")
            msg = str(e.value)
            # Our message names the setting; a slider or dropdown out of its range is refused by Gradio's own
            # check first (a browser cannot send those: sliders clamp, dropdowns only offer their choices).
            assert has_words(msg, words) or "minimum value" in msg or "maximum value" in msg \
                or "not in the list of choices" in msg, (cid, msg)
            assert "Traceback" not in msg
        assert run_dirs(runs) == []

        # A partly valid file: how many rows were kept, and why the rest were dropped.
        vals = form(fast_cfg(models["tiny"], data), data_path=handle_file(str(BAD / "broken_line.jsonl")))
        summary = client.predict(*vals, api_name="/inspect_data")[0]
        assert "4 kept" in summary and "malformed" in summary and "line 3" in summary, summary

        # max_length under the template's own length: said in the data panel, and a started run fails saying so.
        vals = form(fast_cfg(models["tiny"], data, max_length=16), data_path=handle_file(str(data)))
        summary = client.predict(*vals, api_name="/inspect_data")[0]
        assert has_words(summary, ("max_length 16", "overhead")), summary
        client.predict(*vals, api_name="/start_training")
        run = wait_for(lambda: run_dirs(runs), 30, "the run folder")[0]
        table = wait_for(lambda: (t := client.predict(api_name="/list_runs")[0]) and
                         any(r[2] == "failed" for r in t["data"]) and t, 60, "the run to fail")
        assert table["data"][0][0] == run.name
        details = client.predict(run.name, api_name="/run_details")[0]
        assert has_words(details, ("failed", "max_length 16", "overhead")), details

        # Batch larger than the data: trains, and the run's log (the Train tab's log box) says what to do.
        small = write_rows(app_tmp / "three.jsonl", 3)
        vals = form(fast_cfg(models["tiny"], small, batch_size=8, max_steps=2, save_steps=2, name="small"),
                    data_path=handle_file(str(small)))
        client.predict(*vals, api_name="/start_training")
        small_run = wait_for(lambda: [p for p in run_dirs(runs) if p.name.endswith("-small")], 30, "run")[0]
        wait_for(lambda: '"finished"' in (small_run / "status.json").read_text(), 90, "the small run to finish")
        assert "batch_size 8 is larger than the 3 training rows" in (small_run / "train.log").read_text()
        assert proc.poll() is None  # still serving
        names = [r[0] for r in client.predict(api_name="/list_runs")[0]["data"]]
        assert set(names) == {run.name, small_run.name}
    finally:
        proc.terminate()
        proc.wait(30)
