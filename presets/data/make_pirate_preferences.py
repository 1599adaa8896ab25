"""Build presets/data/pirate-preferences.jsonl: the bundled preference example for DPO / ORPO.

The same chatterbot-corpus pairs as presets/data/pirate_chat.jsonl (make_pirate_chat.py: same filter, same seeded
order), as TRL's standard preference rows: `prompt` = the question, `chosen` = the pirate rewrite of the answer,
`rejected` = the plain original answer from the corpus. A model tuned on it prefers the pirate voice over the plain
one. Run: python presets/data/make_pirate_preferences.py
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def _pirate_module():
    # make_pirate_chat.py is a script beside this one, not a package module: load it by path for piratify().
    spec = importlib.util.spec_from_file_location("make_pirate_chat", HERE / "make_pirate_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    piratify = _pirate_module().piratify
    spec = importlib.util.find_spec("chatterbot_corpus")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    pairs = []
    for f in sorted(root.glob("*.yml")):  # the same selection as make_pirate_chat.py
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        for conv in doc.get("conversations") or []:
            if len(conv) >= 2 and all(isinstance(x, str) for x in conv[:2]):
                q, a = conv[0].strip(), conv[1].strip()
                if 2 <= len(q) <= 200 and 2 <= len(a) <= 300:
                    pairs.append((f.stem, q, a))
    rng = random.Random(0)
    rng.shuffle(pairs)
    seen, rows = set(), []
    for topic, q, a in pairs:
        if q.lower() in seen:
            continue
        seen.add(q.lower())
        chosen, rejected = piratify(a), a
        if chosen.strip() == rejected.strip():
            continue
        rows.append({"prompt": q, "chosen": chosen, "rejected": rejected, "topic": topic})
    out = HERE / "pirate-preferences.jsonl"
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)  # write, then rename: an interrupted build never leaves a half file
    print(f"wrote {len(rows)} preference pairs to {out}")


if __name__ == "__main__":
    main()
