"""Build presets/data/eval/pirate-style.jsonl: the example benchmark task (multiple choice) for the Evaluate tab.

Does the model answer in the pirate voice it was taught? 30 questions written for this project (none of them in the
training data, presets/data/pirate_chat.jsonl: checked below), each with three replies: the right answer in plain
English, the right answer in the pirate voice of the training data (the same `piratify` rewrite), and another
question's answer in the pirate voice. The gold reply is the pirate one that answers the question, so a base model
that prefers plain English scores low, a pirate-trained adapter that has also lost track of content picks the
wrong pirate reply, and one that learned the style and kept the content scores high. The gold reply sits first,
second and third equally often; the other two are shuffled with a fixed seed.

Run: python presets/data/eval/make_pirate_style.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # make_pirate_chat.py: the training data's own rewrite

from make_pirate_chat import piratify  # noqa: E402

QA = [
    ("What do bees make?", "Bees make honey."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do you use to write on paper?", "You can write with a pen or a pencil."),
    ("Where do fish live?", "Fish live in water."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What do plants need to grow?", "Plants need water, light and soil."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What animal says moo?", "A cow says moo."),
    ("What do you wear on your feet?", "You wear shoes on your feet."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet do we live on?", "We live on the planet Earth."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("What shape is a wheel?", "A wheel is round."),
    ("When do owls usually hunt?", "Owls usually hunt at night."),
    ("What can you use to cut paper?", "You can cut paper with scissors."),
    ("What gives us light during the day?", "The sun gives us light during the day."),
    ("Where do you keep milk cold?", "You keep milk cold in the fridge."),
    ("What do you call the top of a mountain?", "The top of a mountain is called the peak."),
    ("Why do people use umbrellas?", "People use umbrellas to stay dry in the rain."),
    ("What is the main thing a library lends?", "A library lends books."),
    ("What do you call a very large group of ships?", "A large group of ships is called a fleet."),
    ("What do birds build to lay their eggs in?", "Birds build nests to lay their eggs in."),
    ("How do you greet someone in the morning?", "You can say good morning."),
    ("What tool shows which way is north?", "A compass shows which way is north."),
    ("What falls from clouds when it rains?", "Water falls from the clouds when it rains."),
    ("What do you call the person who steers a ship?", "The person who steers a ship is the helmsman."),
    ("Which meal do people eat in the morning?", "People eat breakfast in the morning."),
    ("What is sand mostly found on?", "Sand is mostly found on beaches and in deserts."),
]


def main() -> None:
    trained = set()
    for line in (HERE.parent / "pirate_chat.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        trained.add(row["messages"][0]["content"].strip().lower())
    leaked = [q for q, _ in QA if q.strip().lower() in trained]
    assert not leaked, f"in the training data: {leaked}"
    rng = random.Random(26)
    rows = []
    for i, (q, a) in enumerate(QA):
        other = QA[(i + 7) % len(QA)][1]  # another question's answer: style right, content wrong
        gold = piratify(a)
        choices = [a, piratify(other)]
        rng.shuffle(choices)
        choices.insert(i % 3, gold)  # the gold reply in each place equally often: no position bias to exploit
        rows.append({"question": q, "choices": choices, "answer": i % 3})
    out = HERE / "pirate-style.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
