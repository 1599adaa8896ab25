"""The form is made from the config: a new config field reaches the page, the API and the CLI with no other edit,
and the API keeps the order clients pass values in."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import gradio as gr
import pytest

from qlora_ui import config
from qlora_ui.config import ConfigError, RunConfig, TrainConfig, fld
from qlora_ui.ui.form import API_ORDER, Form


@dataclass
class TrainPlus(TrainConfig):
    warmup_hold: int = fld(0, "Steps to hold the peak learning rate after warmup.", min=0, max=500, step=1)


@dataclass
class RunPlus(RunConfig):
    training: TrainPlus = field(default_factory=TrainPlus)


@pytest.fixture()
def config_with_a_new_field(monkeypatch):
    """What adding `warmup_hold` to TrainConfig in config.py does: the config's field index (which the CLI flags,
    presets and validation read) is rebuilt by config's own code, from the new classes."""
    monkeypatch.setitem(config.SECTIONS, "training", TrainPlus)
    monkeypatch.setattr(config, "RunConfig", RunPlus)
    for key, entry in config._field_index().items():
        monkeypatch.setitem(config.FIELD_INDEX, key, entry)
    monkeypatch.setitem(config._TYPES, "warmup_hold", int)


def test_a_new_config_field_reaches_the_form_the_train_tab_and_the_cli(config_with_a_new_field, tmp_path):
    from qlora_ui.cli_flags import add_cli_flags, apply_cli_flags
    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import train

    # The form: one component, with the label, help and bounds from the field's metadata ...
    with gr.Blocks():
        form = Form(RunPlus())
        train.build(Studio(tmp_path / "runs"), form, None)  # ... placed by the Train tab (Advanced) unasked
    widget = form["warmup_hold"]
    assert isinstance(widget, gr.Slider) and (widget.minimum, widget.maximum) == (0, 500)
    assert widget.label == "Warmup hold" and "hold the peak" in widget.info
    assert widget.parent is not None  # rendered in the page
    # ... and behind every listed field in the API, so no client's positions move.
    assert form.keys[:len(API_ORDER)] == list(API_ORDER) and form.keys[-1] == "warmup_hold"
    values = form.updates(RunPlus()) | form.values({"warmup_hold": 12})
    assert form.to_config(values, check=False).training.warmup_hold == 12
    with pytest.raises(ConfigError, match=r"warmup_hold: 900 is outside the allowed range 0\.\.500"):
        form.to_config(values | form.values({"warmup_hold": 900}))
    assert form.updates(form.to_config(values))[widget] == 12

    # The CLI: a flag with the same help, parsed into the same config.
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    assert "--warmup-hold" in parser.format_help()
    cfg = apply_cli_flags(RunPlus(), parser.parse_args(["--warmup-hold", "7"]))
    assert cfg.training.warmup_hold == 7


def test_the_api_takes_the_form_in_the_order_clients_have_always_used(tmp_path):
    from qlora_ui.studio import Studio
    from qlora_ui.ui.app import build_page

    page = build_page(Studio(tmp_path / "runs"))
    labels = {k: c.label for k, c in page.form.components.items()}
    api = {name: [p["label"] for p in ep["parameters"]]
           for name, ep in page.demo.get_api_info()["named_endpoints"].items()}
    form_labels = [labels[k] for k in API_ORDER]
    assert page.form.keys == list(API_ORDER)  # no field beyond the listed ones today
    # The dataset source box (a Hub id or folder, typed beside the file box) comes after every field.
    form_labels.append(page.form.source_box.label)
    for name in ("/start_training", "/inspect_data"):
        assert api[name] == form_labels, name
    assert api["/save_preset"] == ["New preset name", *form_labels]
    ask = ["Run", "Adapter", "System prompt", "Temperature", "Top-p", "Max new tokens", "Seed", "Message"]
    assert api["/chat"] == api["/compare_with_base"] == ask
    assert api["/export_run"] == ["Run", "Format", "GGUF type"]
    for name in ("/run_details", "/delete_run"):
        assert api[name] == ["Run"]
    for name in ("/resume_training", "/retry_smaller"):
        assert api[name] == ["Run to resume"]
    assert api["/load_preset"] == ["Preset"] and api["/list_runs"] == api["/stop_training"] == []
