"""Build presets/data/pirate-preferences.jsonl: the bundled preference example for DPO / ORPO.

The same chatterbot-corpus pairs as presets/data/pirate_chat.jsonl (make_pirate_chat.py: same filter, same seeded
order), as TRL's standard preference rows: `prompt` = the question, `chosen` = the pirate rewrite of the answer,
`rejected` = the plain original answer from the corpus. A model tuned on it prefers the pirate voice over the plain
one. Run: python presets/data/make_pirate_preferences.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pirate_module():
    # make_pirate_chat.py is a script beside this one, not a package module: load it by path.
    spec = importlib.util.spec_from_file_location("make_pirate_chat", HERE / "make_pirate_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    pirate = _pirate_module()
    rows = []
    for topic, q, a in pirate.corpus_pairs():  # the same pairs, in the same order, as pirate_chat.jsonl
        chosen, rejected = pirate.piratify(a), a
        if chosen.strip() != rejected.strip():
            rows.append({"prompt": q, "chosen": chosen, "rejected": rejected, "topic": topic})
    out = HERE / "pirate-preferences.jsonl"
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)  # write, then rename: an interrupted build never leaves a half file
    print(f"wrote {len(rows)} preference pairs to {out}")


if __name__ == "__main__":
    main()
