"""One-sentence summaries of the committed benchmark results, for the UI to link to (no Gradio here)."""

from __future__ import annotations

import json
from pathlib import Path

QUALITY_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "quality" / "quality.json"
_WHERE = "bench/quality.py, docs/quality.md"


def quantization_evidence(path: str | Path = QUALITY_RESULTS) -> str:
    """"NF4 kept eval loss within X% of 16-bit LoRA here (...)", from bench/quality.py's full run.

    A neutral pointer when the results file is missing or unreadable (e.g. an installed package without the repo).
    """
    p = Path(path)
    if not p.is_file() and p == QUALITY_RESULTS:
        p = QUALITY_RESULTS.parent / "quick" / QUALITY_RESULTS.name  # only the --quick run is committed
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        ratio = float(next(r["ratio"] for r in data["table"] if r["key"] == "nf4_dq"))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return f"How NF4 QLoRA compares with 16-bit LoRA on the bundled model: see {_WHERE}."
    pct = 100 * (ratio - 1)
    steps = (data.get("config") or {}).get("max_steps")
    on = f" after {steps} steps on the bundled model" if steps else ""
    if pct <= 0:
        return f"NF4 matched 16-bit LoRA here: its eval loss was {-pct:.1f}% lower{on} ({_WHERE})."
    best = next((r for r in data["table"] if r.get("key") == "best_nf4" and r.get("best") != "nf4_dq"), None)
    option = ""
    if best is not None and OPTION_NAMES.get(best.get("best")):
        option = (f"; with {OPTION_NAMES[best['best']]} it was {100 * (float(best['ratio']) - 1):+.1f}%")
    return f"NF4 kept eval loss within {pct:.1f}% of 16-bit LoRA here{on}{option} ({_WHERE})."


# The quality bench's NF4 variants that are a switch in the form, as the form names them.
OPTION_NAMES = {"nf4_loftq": "LoRA init loftq", "nf4_dora": "DoRA", "nf4_fp32": "compute dtype fp32",
                "nf4": "double quant off"}
