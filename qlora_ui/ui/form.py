"""The form: one component per field of the run config, made from the dataclass's metadata (help, limits,
choices), so a new config field shows up here, in the CLI and in presets with no list to extend.

Numbers are sliders or bounded number boxes, never free text. Handlers get the values as `{component: value}`
(an event whose `inputs` is a set of components) and turn them into a config with `to_config`, which collects
every problem into one error; `updates(cfg)` goes the other way. The dataset file box is the one field whose
widget value differs from the config's: its special cases live here (`_from_widget`, `_to_widget`).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import gradio as gr

from ..config import ConfigError, RunConfig, coerce, validate_fields

# Visible names that tests and external clients rely on: keep them stable.
LABELS = {
    "base_model": "Base model",
    "data_path": "Dataset file",
    "data_config": "Subset (config)",
    "data_revision": "Dataset revision",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "lora_init": "LoRA init",
    "use_dora": "DoRA",
    "use_rslora": "rsLoRA",
    "max_steps": "Max steps",
}

# Settings the page does not offer: where runs go is the operator's --runs-dir, and a hub revision is a CLI
# matter (the bundled and local models have none).
NOT_IN_FORM = ("runs_dir", "revision")

# The order API clients (gradio_client scripts, the benches) pass the form's values in, as it has always been.
# A field added to the config later comes after these, so no old client's positions shift.
API_ORDER = (
    "name", "base_model", "trust_remote_code", "allow_pickle",
    "load_in_4bit", "quant_type", "double_quant", "compute_dtype",
    "data_path", "data_format", "column_map", "max_length", "eval_fraction", "train_on_source", "system_prompt",
    "max_rows",
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_init", "use_dora", "use_rslora",
    "max_steps", "epochs", "batch_size", "grad_accum", "learning_rate", "processes",
    "lr_scheduler", "warmup_ratio", "optimizer", "weight_decay", "max_grad_norm", "gradient_checkpointing",
    "group_by_length", "seed", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "padding_free",
    "labelled_head", "mixed_precision", "accelerate_config", "quant_storage",
    "data_config", "data_split", "data_revision",
    "init_adapter", "method", "beta", "fused_lora", "checkpoint_cache_mb",
)

# A field's own widget: a maker called as make(value=..., render=False), or options for the generated one.
Widget = Callable[..., gr.components.Component] | dict[str, Any]


def label_for(key: str) -> str:
    return LABELS.get(key, key.replace("_", " ").capitalize())


def config_fields(cls: type) -> dict[str, tuple[str | None, dataclasses.Field, Any]]:
    """Every leaf field of a run config class (or a subclass): key -> (section or None, field, resolved type)."""
    out: dict[str, tuple[str | None, dataclasses.Field, Any]] = {}
    top = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.default_factory)]
    hints = typing.get_type_hints(cls) if top else {}
    for f in dataclasses.fields(cls):
        section = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        if section is None:
            out[f.name] = (None, f, hints[f.name])
            continue
        sec_hints = typing.get_type_hints(section)
        for g in dataclasses.fields(section):
            out[g.name] = (f.name, g, sec_hints[g.name])
    return out


def _optional_base(t: Any) -> Any:
    if get_origin(t) is not None and type(None) in get_args(t):
        return next(a for a in get_args(t) if a is not type(None))
    return t


def component_for(key: str, f: dataclasses.Field, t: Any, value: Any, **overrides: Any) -> gr.components.Component:
    """The widget for one config field, bounded by its metadata."""
    meta = f.metadata
    kw: dict[str, Any] = dict(label=label_for(key), info=meta["help"], value=value)
    kw.update(overrides)
    base = _optional_base(t)
    if get_origin(t) is Literal:
        return gr.Dropdown(choices=list(get_args(t)), **kw)
    if base is bool:
        return gr.Checkbox(**kw)
    if base in (int, float):
        lo, hi, step = meta.get("min"), meta.get("max"), meta.get("step")
        if meta.get("log") or hi is None or (hi - lo) / (step or 1) > 100_000:
            # No minimum/maximum on the widget: Gradio would refuse a typed -1 with "Value -1 is less than
            # minimum value 1e-07", naming no field; our validation names the field and lists every problem.
            kw["info"] = f"{kw['info']} Range {lo:g}..{hi:g}." if lo is not None and hi is not None else kw["info"]
            return gr.Number(step=step, precision=0 if base is int else None, **kw)
        return gr.Slider(minimum=lo, maximum=hi, step=step or (1 if base is int else 0.01), **kw)
    if get_origin(base) is dict or base is dict:
        kw.setdefault("placeholder", "question=instruction, answer=output")
    return gr.Textbox(**kw)


def _served(path: str) -> bool:
    """Gradio only hands out files from the app's folder or the temp folder."""
    p = Path(path).resolve()
    return any(r == p or r in p.parents for r in (Path.cwd(), Path(tempfile.gettempdir()).resolve()))


class Form:
    """The config's fields as components, made unrendered; each tab renders the ones it lays out (`render`) and
    the rest of a section it owns (`rest`), so a new field appears without a tab edit."""

    def __init__(self, initial: RunConfig | None = None, widgets: dict[str, Widget] | None = None):
        self.initial = initial if initial is not None else RunConfig()
        self.cls = type(self.initial)
        self.fields = {k: v for k, v in config_fields(self.cls).items() if k not in NOT_IN_FORM}
        order = [k for k in API_ORDER if k in self.fields] + [k for k in self.fields if k not in API_ORDER]
        # Made in API order: an event whose inputs are a set of components gets them sorted by creation, which
        # is then the order API clients pass them in.
        self.components: dict[str, gr.components.Component] = {}
        for k in order:
            value = self._to_widget(k, self.get(self.initial, k))
            own = (widgets or {}).get(k, {})
            _, f, t = self.fields[k]
            self.components[k] = (own(value=value, render=False) if callable(own) else
                                  component_for(k, f, t, value, render=False, **own))
        self.keys = list(self.components)  # API order
        # The dataset's second widget, beside the file box: a Hub id or a server folder, typed. Whichever is filled
        # is the config's data_path (the typed one wins). Made after the fields: API clients' positions stay.
        self.source_box = gr.Textbox(
            label="Or a Hub dataset / dataset folder", value=self._source_text(self.get(self.initial, "data_path")),
            placeholder="hf://owner/name (e.g. timdettmers/openassistant-guanaco), or a folder under --data-root",
            info="Press Enter: its splits are listed and its first rows previewed before the download.",
            max_lines=1, max_length=1024, elem_id="dataset-hub", render=False) if "data_path" in self.fields else None
        self.key_of = {c: k for k, c in self.components.items()}
        self._rendered: set[str] = set()

    # ---- layout ----
    def __getitem__(self, key: str) -> gr.components.Component:
        return self.components[key]

    def render(self, *keys: str) -> list[gr.components.Component]:
        """Place these fields here, in the caller's layout."""
        out = []
        for k in keys:
            if k in self.components and k not in self._rendered:
                self.components[k].render()
                self._rendered.add(k)
                out.append(self.components[k])
        return out

    def section_keys(self, section: str | None) -> list[str]:
        return [k for k, (s, _, _) in self.fields.items() if s == section]

    def rest(self, *sections: str | None, per_row: int = 3) -> list[gr.components.Component]:
        """Every field of these sections not placed yet, in rows."""
        keys = [k for s in sections for k in self.section_keys(s) if k not in self._rendered]
        out = []
        for i in range(0, len(keys), per_row):
            with gr.Row():
                out += self.render(*keys[i:i + per_row])
        return out

    @property
    def inputs(self) -> set[gr.components.Component]:
        """As an event's inputs: the handler gets one `{component: value}` dict."""
        return set(self.components.values()) | ({self.source_box} if self.source_box is not None else set())

    @property
    def outputs(self) -> list[gr.components.Component]:
        """As an event's outputs, in API order (a handler returns a dict keyed by component)."""
        return list(self.components.values()) + ([self.source_box] if self.source_box is not None else [])

    def changes(self, *keys: str) -> list:
        return [self.components[k].change for k in keys]

    # ---- values ----
    def get(self, cfg: RunConfig, key: str) -> Any:
        section = self.fields[key][0]
        return getattr(cfg if section is None else getattr(cfg, section), key)

    def to_config(self, values: dict, *, check: bool = True) -> RunConfig:
        """Form values -> config. Every bad value is reported in one ConfigError; with `check`, then the
        config's own cross-field checks."""
        cfg = self.cls()
        problems = []
        for comp, key in self.key_of.items():
            if comp not in values:
                continue  # a field this event does not send keeps its default
            v = self._from_widget(key, values[comp])
            if v is None and self.fields[key][1].default is not None:
                problems.append(f"{label_for(key)}: a value is required")
                continue
            section, f, _ = self.fields[key]
            try:
                v = coerce(f, v)
            except ValueError as e:
                problems.append(f"{key}: {e}")
                continue
            setattr(cfg if section is None else getattr(cfg, section), key, v)
        typed = self.source_value(values.get(self.source_box)) if self.source_box in values else ""
        if typed.startswith("hf://") or typed and Path(typed).expanduser().is_dir():
            cfg.data.data_path = typed  # a folder is confined to --data-root by the Studio
        elif typed:
            # A typed file path would read any file on the server: files come through the upload (or the list).
            problems.append(f"{self.source_box.label}: '{typed[:80]}' is neither a Hub dataset (owner/name) nor a "
                            "dataset folder on the server. Upload a file with the button instead.")
        problems += validate_fields(cfg)  # range problems too, so one message lists everything
        if problems:
            raise ConfigError(problems)
        return cfg.validate() if check else cfg

    def updates(self, cfg: RunConfig, *, keep_file: bool = False) -> dict[gr.components.Component, Any]:
        """{component: value} showing `cfg`. With `keep_file`, the file box keeps what it shows when `cfg` names no
        dataset, or one the page cannot serve (a preset's, or a running job's, outside the app and temp folders)."""
        out = {c: self._to_widget(k, self.get(cfg, k)) for k, c in self.components.items()}
        path = self.get(cfg, "data_path") if "data_path" in self.components else None
        if self.source_box is not None:
            out[self.source_box] = self._source_text(path)
            if out[self.source_box]:
                out[self.components["data_path"]] = None  # a Hub id or folder is not a file the box can show
                return out
        if keep_file and (not path or not _served(path)):
            out.pop(self.components["data_path"], None)
        return out

    def values(self, items: dict[str, Any]) -> dict[gr.components.Component, Any]:
        """{key: value} -> {component: value} (for scripts and tests)."""
        return {self.components[k]: v for k, v in items.items()}

    # ---- the one field whose widget value is not the config's ----
    @staticmethod
    def source_value(text: Any) -> str:
        """The dataset source box's text as data_path: 'owner/name' or hf://owner/name -> hf://owner/name; a
        path stays a path (the Studio confines it to --data-root)."""
        s = str(text or "").strip()
        if not s or s.startswith("hf://"):
            return s
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", s) and not Path(s).exists():
            return "hf://" + s
        return s

    @staticmethod
    def _source_text(path: Any) -> str:
        s = str(path or "")
        return s if s.startswith("hf://") or (s and Path(s).is_dir()) else ""

    @staticmethod
    def _from_widget(key: str, v: Any) -> Any:
        if key == "data_path":
            if v is None:
                return ""  # an empty file box: no dataset yet
            if isinstance(v, dict):  # FileData as a raw API request sends it
                v = v.get("path") or ""
            if not isinstance(v, str):
                v = getattr(v, "name", None) or getattr(v, "path", None) or str(v)
        return v

    @staticmethod
    def _to_widget(key: str, v: Any) -> Any:
        if isinstance(v, dict):
            return ", ".join(f"{a}={b}" for a, b in v.items())
        if key == "data_path" and not v:
            return None
        return v
