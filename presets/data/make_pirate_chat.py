"""Build presets/data/pirate_chat.jsonl: the bundled quick-start dataset.

Questions and answers come from chatterbot-corpus (BSD-3, English). Each answer is rewritten in a pirate
voice ("Arr! ... Yo-ho-ho!") - a style SmolLM2-135M-Instruct does not have - so that a few minutes of
QLoRA on a CPU make a difference anyone can see in the Chat tab. Run: python presets/data/make_pirate_chat.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

SWAPS = [
    (r"\byou are\b", "ye be"), (r"\byou're\b", "ye be"), (r"\byour\b", "yer"), (r"\byou\b", "ye"),
    (r"\bmy\b", "me"), (r"\bi am\b", "I be"), (r"\bi'm\b", "I be"), (r"\bis\b", "be"), (r"\bare\b", "be"),
    (r"\bhello\b", "ahoy"), (r"\bhi\b", "ahoy"), (r"\bfriend\b", "matey"), (r"\bfriends\b", "hearties"),
    (r"\byes\b", "aye"), (r"\bthe\b", "th'"), (r"\bmoney\b", "doubloons"), (r"\bcomputer\b", "ship's brain"),
    (r"\bthink\b", "reckon"), (r"\bstop\b", "avast"), (r"\bof\b", "o'"),
]


def piratify(text: str) -> str:
    out = text.strip()
    for pat, rep in SWAPS:
        out = re.sub(pat, lambda m, r=rep: r.capitalize() if m.group(0)[0].isupper() else r, out,
                     flags=re.IGNORECASE)
    out = out.rstrip(".!") + "."
    out = out[0].upper() + out[1:]
    return f"Arr! {out} Yo-ho-ho!"


def corpus_pairs() -> list[tuple[str, str, str]]:
    """(topic, question, answer) from chatterbot-corpus's English files: short pairs, in a seeded order, each
    question once. make_pirate_preferences.py builds its rows from the same pairs."""
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    pairs = []
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        for conv in doc.get("conversations") or []:
            if len(conv) >= 2 and all(isinstance(x, str) for x in conv[:2]):
                q, a = conv[0].strip(), conv[1].strip()
                if 2 <= len(q) <= 200 and 2 <= len(a) <= 300:
                    pairs.append((f.stem, q, a))
    random.Random(0).shuffle(pairs)
    seen, out = set(), []
    for topic, q, a in pairs:
        if q.lower() not in seen:
            seen.add(q.lower())
            out.append((topic, q, a))
    return out


def main() -> None:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": piratify(a)}],
             "topic": topic} for topic, q, a in corpus_pairs()]
    out = Path(__file__).with_name("pirate_chat.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} conversations to {out}")


if __name__ == "__main__":
    main()
