"""A user's own JSONL as an lm-evaluation-harness task: lm-eval builds the requests and scores them, this module only
checks the file and describes it to lm-eval as an inline task config.

One kind of row per file:
  multiple choice   {"question": "...", "choices": ["...", "..."], "answer": 1}   answer: index (0 = first) or letter
                    -> loglikelihood of each choice: acc, acc_norm, brier_score (lm-eval's `multiple_choice`)
  prompt/reference  {"prompt": "...", "reference": "..."}
                    -> greedy generation until a blank line: exact_match, rougeL (lm-eval's `generate_until`)
Other keys are ignored. Every line is checked before a model loads: a broken file names its lines and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError

MAX_TASK_BYTES = 50 * 1024 * 1024
MAX_PROBLEMS = 5  # lines named in one message; the rest are counted
MC_PROMPT = "Question: {question}\nAnswer:"
CHOICE_FIX = "Write it as {\"question\": \"...\", \"choices\": [\"...\", \"...\"], \"answer\": 0}"
GEN_FIX = "Write it as {\"prompt\": \"...\", \"reference\": \"...\"}"
TASK_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class LocalTask:
    path: Path
    kind: Literal["choice", "generate"]
    rows: tuple[dict, ...]  # normalised: {question, choices, answer: int} or {prompt, reference}
    sha256: str

    @property
    def name(self) -> str:
        """The task's name in lm-eval's results and in ours: the file's name."""
        return self.path.name

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics averaged over rows (a multiple-choice task adds lm-eval's brier_score)."""
        return ("acc", "acc_norm") if self.kind == "choice" else ("exact_match", "rougeL")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": "file", "path": str(self.path), "kind": self.kind,
                "rows": len(self.rows), "sha256": self.sha256}


def looks_like_file(spec: str) -> bool:
    """A task given as a path (else it is an lm-eval task name: those have no slashes or .jsonl)."""
    return spec.lower().endswith(TASK_SUFFIXES) or "/" in spec or "\\" in spec


def _answer_index(answer: Any, n: int) -> int | None:
    if isinstance(answer, bool):  # JSON true/false is an int to Python; never an index here
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < n else None
    if isinstance(answer, str):
        a = answer.strip()
        if a.isdigit():
            return int(a) if int(a) < n else None
        if len(a) == 1 and a.isalpha():
            i = ord(a.upper()) - ord("A")
            return i if i < n else None
    return None


def _check_choice_row(row: dict) -> tuple[dict | None, str | None]:
    q, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
    if not isinstance(q, str) or not q.strip():
        return None, f"'question' must be non-empty text. {CHOICE_FIX}."
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(x, str) and x.strip() for x in choices)):
        return None, f"'choices' must be a list of at least two non-empty texts. {CHOICE_FIX}."
    i = _answer_index(answer, len(choices))
    if i is None:
        letters = ", ".join(chr(ord("A") + k) for k in range(len(choices)))
        return None, (f"'answer' is {json.dumps(answer)[:40]}; give the right choice's index (0 to "
                      f"{len(choices) - 1}) or its letter ({letters}).")
    return {"question": q, "choices": list(choices), "answer": i}, None


def _check_generate_row(row: dict) -> tuple[dict | None, str | None]:
    p, ref = row.get("prompt"), row.get("reference")
    if not isinstance(p, str) or not p.strip():
        return None, f"'prompt' must be non-empty text. {GEN_FIX}."
    if not isinstance(ref, str) or not ref.strip():
        return None, f"'reference' must be non-empty text (the expected answer). {GEN_FIX}."
    return {"prompt": p, "reference": ref}, None


def _kind_of(row: dict) -> Literal["choice", "generate"] | None:
    if "choices" in row or "question" in row:
        return "choice"
    if "prompt" in row or "reference" in row:
        return "generate"
    return None


def read_task_file(path: str | Path) -> LocalTask:
    """Read and check a task file; a problem raises one DataError naming its lines and the fix."""
    p = Path(path).expanduser()
    shown = p.name
    if not p.is_file():
        raise DataError(f"Task file '{path}' does not exist. Give the path of a .jsonl file, or an lm-eval task "
                        "name such as 'arc_easy'.")
    if p.stat().st_size > MAX_TASK_BYTES:
        raise DataError(f"{shown}: {p.stat().st_size / 1e6:.0f} MB is more than a task file may be "
                        f"({MAX_TASK_BYTES // 2**20} MB). Keep the rows you want to score (a few hundred is plenty).")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{shown}: byte {e.start} is not UTF-8 text. Save the file as UTF-8.") from None
    problems: list[str] = []
    n_bad, rows, kind, kind_line = 0, [], None, 0
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        why = None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row, why = None, f"not valid JSON ({e.msg} at column {e.colno}). One JSON object per line."
        if why is None and not isinstance(row, dict):
            why = f"a {type(row).__name__}, not a JSON object. {CHOICE_FIX}, or {GEN_FIX}."
        if why is None:
            k = _kind_of(row)
            if k is None:
                why = (f"no 'question'/'choices'/'answer' (multiple choice) and no 'prompt'/'reference' "
                       f"(generation); it has {', '.join(sorted(row)[:6]) or 'no keys'}. {CHOICE_FIX}.")
            elif kind is None:
                kind, kind_line = k, i
            elif k != kind:
                why = (f"a {'multiple-choice' if k == 'choice' else 'prompt/reference'} row in a file whose line "
                       f"{kind_line} is {'multiple-choice' if kind == 'choice' else 'prompt/reference'}. "
                       "Keep one kind of row per file.")
            if why is None:
                norm, why = (_check_choice_row if kind == "choice" else _check_generate_row)(row)
                if norm is not None:
                    rows.append(norm)
        if why is not None:
            n_bad += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(f"line {i}: {why}")
    if problems:
        more = f" (and {n_bad - len(problems)} more lines)" if n_bad > len(problems) else ""
        raise DataError(f"{shown} cannot be used as a task{more}: " + " ".join(problems) + " Nothing was run.")
    if not rows:
        raise DataError(f"{shown} has no rows. {CHOICE_FIX} (one per line), or {GEN_FIX}.")
    return LocalTask(p.resolve(), kind, tuple(rows), hashlib.sha256(raw).hexdigest())


# ---- the lm-eval task config ----

def _normalise(s: str) -> str:
    return " ".join(s.split())


def _rouge_l(reference: str, prediction: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


def score_generation(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's process_results for prompt/reference rows: exact match after collapsing whitespace (a reply that
    differs only in spacing is the same answer), and ROUGE-L F1 for partial credit."""
    pred = results[0] if results else ""
    ref = doc["reference"]
    return {"exact_match": float(_normalise(pred) == _normalise(ref)), "rougeL": _rouge_l(ref, pred)}


def _max_gen_tokens(rows: tuple[dict, ...]) -> int:
    # No tokenizer here: English runs ~4 characters a token, so half the longest reference's characters leaves
    # room, and a cap keeps a runaway generation from holding a CPU for minutes.
    longest = max(len(r["reference"]) for r in rows)
    return max(16, min(256, longest // 2 + 8))


def task_config(task: LocalTask) -> dict[str, Any]:
    """The inline task config lm-eval's TaskManager.load takes (a dict with 'task'): the rows come from memory
    (custom_dataset), so nothing is downloaded and nothing goes into the datasets cache."""
    rows = [dict(r) for r in task.rows]

    def dataset(**_: Any):
        import datasets

        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    metric_list = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in task.metrics]
    if task.kind == "choice":
        # Brier score (lm-eval's own): how much probability the model gives the right reply. It moves with any
        # change in the model, where accuracy on a few rows can stay put.
        metric_list.append({"metric": "brier_score", "aggregation": "brier_score", "higher_is_better": False})
    common = {"task": task.name, "custom_dataset": dataset, "test_split": "test",
              # Few-shot examples come from the same rows; lm-eval's sampler leaves out the row being asked.
              "fewshot_split": "test", "metric_list": metric_list, "metadata": {"version": 1, "sha256": task.sha256}}
    if task.kind == "choice":
        return common | {"output_type": "multiple_choice",
                         "doc_to_text": lambda d: MC_PROMPT.format(question=d["question"]),
                         "doc_to_choice": lambda d: list(d["choices"]),
                         "doc_to_target": lambda d: int(d["answer"])}
    return common | {"output_type": "generate_until",
                     "doc_to_text": lambda d: d["prompt"],
                     "doc_to_target": lambda d: d["reference"],
                     "process_results": score_generation,
                     "generation_kwargs": {"until": ["\n\n"], "do_sample": False,
                                           "max_gen_toks": _max_gen_tokens(task.rows)}}
