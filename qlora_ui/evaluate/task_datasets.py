"""Which Hub datasets an lm-eval task name reads, so that an app started with --allowed-datasets applies the same
policy to the Evaluate tab as to training data (studio.check_data): loading a task downloads its dataset, so a
visitor of a shared app could otherwise fill the disk with any dataset of the Hub by typing a task name.

Read from lm-eval's task index alone (the YAML configs, nothing built): building a task downloads its data, so the
check must come before TaskManager.load. Local JSONL tasks (the shipped example, uploads) read no dataset and are
not checked here; the command line is not restricted (only the app passes patterns).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

# dataset_path values that are datasets' generic loaders: the data itself is named by dataset_kwargs.data_files.
FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
HUB_FILE = "hf://datasets/"
# Keys a group may set for its members that change what they read.
DATA_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs")


class _Reads:
    """What a name was found to read: Hub repos, and reasons a part of it cannot be checked."""

    def __init__(self):
        self.repos: set[str] = set()
        self.unknown: list[str] = []


def _files(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _files(v)]
    if isinstance(data_files, (list, tuple)):
        return [f for v in data_files for f in _files(v)]
    return []


def _leaf(name: str, cfg: dict, out: _Reads) -> None:
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or not path.strip():
        out.unknown.append(f"'{name}' names no dataset_path")
        return
    if path not in FILE_BUILDERS:
        out.repos.add(path.strip())
        return
    files = _files((cfg.get("dataset_kwargs") or {}).get("data_files"))
    if not files:
        out.unknown.append(f"'{name}' reads {path} files it does not name")
    for f in files:
        if f.startswith(HUB_FILE):  # hf://datasets/owner/name/file.jsonl: a file of that Hub dataset
            out.repos.add("/".join(f[len(HUB_FILE):].split("/")[:2]).partition("@")[0])
        else:  # a URL or a path on this machine: neither is a Hub id a pattern can allow
            out.unknown.append(f"'{name}' reads {f[:120]}")


def _walk(index: dict, name: str, overrides: dict, out: _Reads, seen: set[str]) -> None:
    entry = index.get(name)
    if entry is None:
        out.unknown.append(f"'{name}' is not in lm-eval's index")
        return
    if name in seen:  # a tag or group met twice (tags overlap): its datasets are counted already
        return
    seen.add(name)
    kind = entry.kind.name
    cfg = dict(entry.cfg or {})
    if kind == "TAG":
        for t in sorted(entry.tags):
            _walk(index, t, overrides, out, seen)
    elif kind == "GROUP":
        _members(index, name, cfg.get("task") or [], {**{k: cfg[k] for k in DATA_KEYS if k in cfg}, **overrides},
                 out, seen)
    elif kind == "TASK":
        _leaf(name, {**cfg, **overrides}, out)
    else:  # PY_TASK: a Python class sets its dataset, which only importing and building it would show
        out.unknown.append(f"'{name}' is defined in Python, so the dataset it reads cannot be checked")


def _members(index: dict, group: str, members: list, overrides: dict, out: _Reads, seen: set[str]) -> None:
    for m in members if isinstance(members, list) else [members]:
        if isinstance(m, str):
            _walk(index, m, overrides, out, seen)
        elif isinstance(m, dict) and "group" in m and m["group"] not in index:  # a subgroup defined inline
            _members(index, m["group"], m.get("task") or [], {**overrides, **{k: m[k] for k in DATA_KEYS if k in m}},
                     out, seen)
        elif isinstance(m, dict) and isinstance(m.get("task"), str):
            own = {k: m[k] for k in DATA_KEYS if k in m}
            if m["task"] in index:  # an indexed task with overrides
                _walk(index, m["task"], {**overrides, **own}, out, set(seen))
            else:  # a task defined inline in the group
                _leaf(m["task"], {**m, **overrides, **own}, out)
        else:
            out.unknown.append(f"a member of '{group}' cannot be read")


def datasets_read(task_index: dict, name: str) -> tuple[set[str], list[str]]:
    """(Hub dataset ids that the lm-eval task, group or tag `name` reads, the parts that cannot be checked)."""
    out = _Reads()
    _walk(task_index, name, {}, out, set())
    return out.repos, out.unknown


def refused_tasks(task_index: dict, names: list[str], allowed: list[str] | None) -> list[str]:
    """One problem per named task that reads a dataset outside `allowed` (fnmatch patterns of Hub ids, as
    --allowed-datasets; None = any, [] = none). Names not in the index are left to the caller's own message."""
    if allowed is None:
        return []
    shown = ", ".join(allowed) or "none on this shared app"
    problems = []
    for n in names:
        if n not in task_index:
            continue
        repos, unknown = datasets_read(task_index, n)
        outside = sorted(r for r in repos if not any(fnmatchcase(r, p) for p in allowed))
        why = []
        if outside:
            many = len(outside) > 3
            listed = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if many else "")
            why.append(f"it reads the Hub dataset{'s' if len(outside) > 1 else ''} {listed}")
        if unknown:
            why.append("; ".join(unknown[:2]) + (f" (and {len(unknown) - 2} more)" if len(unknown) > 2 else ""))
        if why:
            problems.append(f"tasks: '{n}' is not one this app may run: {'; '.join(why)} (allowed datasets: "
                            f"{shown}). Use the example task or upload your own JSONL task instead; whoever runs the "
                            "app sets the Hub ids with --allowed-datasets.")
    return problems
