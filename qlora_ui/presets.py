"""Configs as YAML files, and the preset store: the bundled recipes in presets/ and the ones users save.

A preset is a YAML file in the shape of config.to_dict, plus optional keys that describe the recipe rather than the
run (config.PRESET_KEYS: `target_gpu_gb`, the GPU size it is made for).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from .config import PRESET_KEYS, RunConfig, _short, from_dict, to_dict
from .errors import ConfigError
from .paths import PRESETS_DIR

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


# ---- YAML ----

def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def _parse(text: str) -> dict | None:
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"the YAML does not parse: {e}"]) from None
    if d is not None and not isinstance(d, dict):
        raise ConfigError(["the YAML must be a mapping of settings"])
    return d


def from_yaml(text: str, base: RunConfig | None = None) -> RunConfig:
    return from_dict(_parse(text), base)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg), encoding="utf-8")


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    return from_yaml(Path(path).read_text(encoding="utf-8"), base)


# ---- presets ----

def user_presets_dir(presets_dir: Path = PRESETS_DIR, owner: str | None = None) -> Path:
    """Presets saved from the app live apart from the bundled ones, so a save can never replace a recipe
    that every other user of a shared app loads. Behind a login (`owner`: the signed-in user) each user has a
    folder of their own: nobody else lists, loads or replaces what they saved. Without a login, one folder."""
    d = presets_dir / "user"
    if owner is None:
        return d
    # User names may hold any character ('/', '..'): a readable part plus a digest, which alone tells users apart.
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", owner)[:32]
    return d / "by-user" / f"{readable}-{hashlib.sha256(owner.encode()).hexdigest()[:16]}"


def list_presets(presets_dir: Path = PRESETS_DIR, owner: str | None = None) -> list[str]:
    names = {p.stem for d in (presets_dir, user_presets_dir(presets_dir, owner)) for p in d.glob("*.yaml")}
    return sorted(n for n in names if not n.startswith("."))


def preset_path(name: str, presets_dir: Path = PRESETS_DIR, owner: str | None = None) -> Path:
    """The file of a preset (bundled first, then the user's), or a ConfigError listing the available ones."""
    ok = re.fullmatch(_NAME, name or "")
    path = presets_dir / f"{name}.yaml"
    if ok and not path.is_file():
        path = user_presets_dir(presets_dir, owner) / f"{name}.yaml"
    if not ok or not path.is_file():
        raise ConfigError([f"preset '{_short(name)}' not found; available: "
                           f"{', '.join(list_presets(presets_dir, owner))}"])
    return path


def load_preset(name: str, presets_dir: Path = PRESETS_DIR, owner: str | None = None) -> RunConfig:
    cfg = load_yaml(preset_path(name, presets_dir, owner))
    # Relative data paths in presets are relative to the repo, so presets work from any cwd.
    if cfg.data.data_path and not cfg.data.data_path.startswith("hf://") and not Path(cfg.data.data_path).is_absolute():
        cfg.data.data_path = str((presets_dir.parent / cfg.data.data_path).resolve())
    return cfg


def preset_keys(name: str, presets_dir: Path = PRESETS_DIR) -> dict:
    """The recipe keys of a preset (config.PRESET_KEYS), checked as loading it checks them."""
    d = _parse(preset_path(name, presets_dir).read_text(encoding="utf-8")) or {}
    found = {k: d[k] for k in PRESET_KEYS if k in d}
    problems = [f"{k}: {p}" for k, v in found.items() if (p := PRESET_KEYS[k](v))]
    if problems:
        raise ConfigError(problems)
    return found


def preset_target_gb(preset: str | None, presets_dir: Path = PRESETS_DIR) -> float | None:
    """The GPU size a preset is made for (its `target_gpu_gb` key), or None: no such key, no such preset."""
    if not preset:
        return None
    try:
        gb = preset_keys(preset, presets_dir).get("target_gpu_gb")
    except ConfigError:
        return None
    return float(gb) if gb is not None else None


MAX_USER_PRESETS = 200  # a shared link's visitors cannot fill the disk or the preset list


def _lookalike_key(name: str) -> str:
    return name.lower().rstrip("._-")


def save_preset(cfg: RunConfig, name: str, presets_dir: Path = PRESETS_DIR, owner: str | None = None) -> Path:
    """Save into the user presets (`owner`'s own behind a login, see user_presets_dir); bundled presets are
    read-only for everyone."""
    if not re.fullmatch(_NAME, name or ""):
        raise ConfigError([f"preset name '{_short(name)}': use 1-64 letters, digits, '.', '_' or '-', starting with "
                           "a letter or digit"])
    if (presets_dir / f"{name}.yaml").is_file():
        raise ConfigError([f"preset name '{name}' is a bundled preset and cannot be replaced; pick another name"])
    out = user_presets_dir(presets_dir, owner)
    # Lookalikes ('CPU-QUICKSTART', 'cpu-quickstart.') would pass for another preset in the list every user of a
    # shared app picks from; the same name (same case) replaces a user preset.
    key = _lookalike_key(name)
    for existing in list_presets(presets_dir, owner):
        if existing != name and _lookalike_key(existing) == key:
            raise ConfigError([f"preset name '{name}' looks like the preset '{existing}'; pick a name that differs "
                               "by more than case or trailing punctuation"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    if not path.is_file() and sum(1 for _ in out.glob("*.yaml")) >= MAX_USER_PRESETS:
        raise ConfigError([f"preset name '{name}': {'you already have' if owner else 'this app already holds'} "
                           f"{MAX_USER_PRESETS} saved presets; "
                           f"replace one of yours (save under its name) or remove some from {out.name}/"])
    tmp = path.with_suffix(".yaml.tmp")
    save_yaml(cfg, tmp)
    tmp.replace(path)  # write, then rename: a half-written preset is never listed
    return path
