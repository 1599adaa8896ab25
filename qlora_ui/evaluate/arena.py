"""A blind arena: two contestants answer the same prompt with the same settings and seed, shown as "A" and "B" in a
random order; a rater picks A, B or tie and only then learns which model was which.

Contestants are the model ids the /v1 API answers to (api/models.py): the base models, every run's latest adapter
(through the app's batch server, the Chat tab's engine) and a run's exported GGUFs (through the llama.cpp child
process). Prompts come from the runs' held-out rows (the same seeded split training made), a file, or typed text.

Everything lives in `<runs_dir>/arena/`, the truth a restart reloads:
  battles.jsonl      one battle per line: its prompt, the two answers and who gave them, the settings
  votes.jsonl        human votes in the LMSYS battle format (model_a, model_b, winner) plus battle, prompt hash,
                     rater session (hashed), time and source "human"
  judge_votes.jsonl  the judge's votes (judge.py), the same format with source "judge": kept apart from people's

Several sessions (a shared link's visitors) vote on the same battle, each vote kept; one session votes once per
battle. No gradio here: the Evaluate tab (ui/tabs/arena.py) and the CLI call in.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..chat import GenerationSettings
from ..errors import ArenaError, UserError
from .elo import PERMUTATIONS, Leaderboard, compute, games_of, parse_vote

log = logging.getLogger(__name__)

CHOICES = {"A": "model_a", "B": "model_b", "tie": "tie"}
MAX_PROMPTS = 1000  # prompts taken from one file or one run's held-out rows
MAX_PROMPT_FILE_BYTES = 10 * 1024 * 1024
PROMPT_KEYS = ("prompt", "instruction", "question", "input", "text")


@dataclass
class Battle:
    id: str
    messages: list[dict]  # what both contestants were asked (system/earlier turns included)
    prompt_hash: str
    model_a: str  # shown as "A"
    model_b: str  # shown as "B"
    answer_a: str
    answer_b: str
    settings: dict = field(default_factory=dict)
    created: float = 0.0

    @property
    def prompt(self) -> str:
        """The last user message: what the rater reads above the two answers."""
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"), "")


def prompt_hash(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def rater_id(session: str | None) -> str:
    """A session as votes.jsonl records it: hashed, since a Gradio session hash is a live credential for that tab."""
    if not session:
        raise ArenaError("This vote has no browser session to tie it to. Reload the page and vote again.")
    return hashlib.sha256(session.encode()).hexdigest()[:16]


# ---- prompts ----

def typed_prompts(text: str) -> list[list[dict]]:
    """One prompt per non-empty line of typed text."""
    return [[{"role": "user", "content": line.strip()}] for line in (text or "").splitlines() if line.strip()]


def file_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts from a file: .txt (one per line), or .jsonl/.json rows with a prompt/instruction/question field or an
    OpenAI `messages` list (the last assistant turn, if any, is dropped: that is the answer)."""
    path = Path(path)
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise ArenaError(f"{path.name}: {path.stat().st_size:,} bytes is more than a prompt file may be "
                         f"({MAX_PROMPT_FILE_BYTES:,}). Keep up to {MAX_PROMPTS} prompts in it.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ArenaError(f"{path.name}: not UTF-8 text. Save it as UTF-8.") from None
    if path.suffix.lower() == ".txt":
        out = typed_prompts(text)
    else:
        try:
            rows = json.loads(text) if path.suffix.lower() == ".json" else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise ArenaError(f"{path.name}: not valid JSON ({e}). Use one JSON object per line, each with a "
                             "'prompt' field, or a .txt file with one prompt per line.") from None
        out = []
        for i, row in enumerate(rows if isinstance(rows, list) else [rows], 1):
            msgs = _row_messages(row)
            if msgs is None:
                raise ArenaError(f"{path.name} row {i}: no prompt found. Give each row a "
                                 f"{'/'.join(PROMPT_KEYS)} field or an OpenAI 'messages' list.")
            out.append(msgs)
    if not out:
        raise ArenaError(f"{path.name}: no prompts in it. Put one prompt per line (.txt) or per JSON row.")
    return out[:MAX_PROMPTS]


def _row_messages(row) -> list[dict] | None:
    if isinstance(row, str) and row.strip():
        return [{"role": "user", "content": row.strip()}]
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("messages"), list):
        return _ask_part(row["messages"])
    for k in PROMPT_KEYS:
        if isinstance(row.get(k), str) and row[k].strip():
            return [{"role": "user", "content": row[k].strip()}]
    return None


def _ask_part(conversation: list[dict]) -> list[dict] | None:
    """A conversation up to its last user turn: the question the contestants answer."""
    msgs = [{"role": m.get("role"), "content": m.get("content")} for m in conversation if isinstance(m, dict)]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "user" and isinstance(m["content"], str)), default=None)
    return msgs[: last + 1] if last is not None else None


def held_out_prompts(studio, run_name: str, limit: int = MAX_PROMPTS) -> list[list[dict]]:
    """The run's held-out (eval) rows as prompts: the same seeded split its training made, rebuilt from the run's
    dataset (prepared data is cached by fingerprint, so this is quick after training)."""
    from ..data import prepare_dataset

    run = studio.open(run_name)
    cfg = run.config()
    try:
        tokenizer = studio.tokenizer_for(cfg.model.base_model)
        prepared = prepare_dataset(cfg.data, tokenizer, seed=cfg.training.seed)
    except (UserError, OSError) as e:
        raise ArenaError(f"{run.name}: its held-out rows cannot be rebuilt from its dataset ({e}). Use a prompt file "
                         "or typed prompts.") from None
    n_eval = prepared.report.n_eval
    if not n_eval:
        raise ArenaError(f"{run.name} held no rows out (eval_fraction 0). Use a prompt file or typed prompts.")
    # The same permutation prepare_dataset applied: its first n_eval positions are the eval rows.
    order = list(range(len(prepared.conversations)))
    random.Random(cfg.training.seed).shuffle(order)
    out = [p for i in order[:n_eval] if (p := _ask_part(prepared.conversations[i]))]
    return out[:limit]


# ---- contestants and answers ----

def contestants(studio) -> list:
    """Every model id the arena can put in a battle (api.models.Target: bases, runs' adapters, exported GGUFs)."""
    from ..api.models import Models

    return Models(studio).all()


def _targets(studio, names: list[str]) -> dict:
    found = {t.id: t for t in contestants(studio)}
    missing = [n for n in names if n not in found]
    if missing:
        raise ArenaError(f"{', '.join(missing)}: not a contestant here (a base model, a run with a saved adapter, or "
                         "a run's exported GGUF). Refresh the list and pick again.")
    return {n: found[n] for n in names}


def _same_base(t1, t2) -> bool:
    from ..modeling import resolve_model_path

    def key(t):
        q = t.cfg.quantization
        return (str(resolve_model_path(t.cfg.model)), q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype)

    return t1.gguf is None and t2.gguf is None and key(t1) == key(t2)


def _answer(studio, target, messages: list[dict], settings: GenerationSettings) -> str:
    from ..native.client import BackendStopped

    if target.gguf is not None:
        try:
            studio.gguf_chat.load(target.gguf)
            return studio.gguf_chat.reply(messages, settings)
        except BackendStopped as e:
            raise ArenaError(f"{target.id}: llama.cpp stopped ({e}). Pick the run itself (its adapter) instead of "
                             "its GGUF.") from None
    studio.check_model(target.cfg.model)
    name = studio.chat.load(target.cfg, target.adapter)
    return studio.chat.reply(messages, settings, name)


def answer_pair(studio, t1, t2, messages: list[dict], settings: GenerationSettings) -> tuple[str, str]:
    """Both answers with the same settings and seed. Two contestants on one loaded base are queued together, so the
    batch server answers them in one batch (as the Chat tab's Compare); otherwise one after the other."""
    if not _same_base(t1, t2):
        return _answer(studio, t1, messages, settings), _answer(studio, t2, messages, settings)
    studio.check_model(t1.cfg.model)
    names = [studio.chat.load(t.cfg, t.adapter) for t in (t1, t2)]
    threads = studio.chat_threads()
    streams = [studio.chat.stream(messages, settings, n, threads=threads) for n in names]
    try:
        # A stream queues its request on its first step: both are queued before either is served.
        firsts = [next(s, "") for s in streams]
        texts = []
        for s, text in zip(streams, firsts):
            for text in s:  # noqa: B007 - the last item is the whole reply
                pass
            texts.append(text.strip())
        return texts[0], texts[1]
    finally:
        for s in streams:
            s.close()


# ---- the arena on disk ----

class Arena:
    """`<runs_dir>/arena/`: battles, human votes and judge votes. App-wide (one on the Studio): the lock makes
    "not voted yet in this session -> append the vote" one step for every session of the app."""

    def __init__(self, runs_dir: str | Path):
        self.dir = Path(runs_dir) / "arena"
        self.battles_path = self.dir / "battles.jsonl"
        self.votes_path = self.dir / "votes.jsonl"
        self.judge_path = self.dir / "judge_votes.jsonl"
        self._lock = threading.Lock()
        self._cache: dict[tuple, list] = {}  # held-out prompts per run: rebuilding them tokenizes the dataset

    def cached(self, key: tuple, make) -> list:
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = make()
        with self._lock:
            self._cache[key] = value
        return value

    # ---- files ----

    def _append(self, path: Path, row: dict) -> None:
        """One JSON line, appended whole: the lock orders this app's writers, flock another process's (the CLI's
        judge), and one write() of one line never interleaves with another's."""
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with open(path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(line)
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _rows(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    # A line cut by a crash mid-write: the rest of the file still counts.
                    log.warning("%s line %d is not JSON; skipped", path.name, i)
        return out

    # ---- battles ----

    def new_battle(self, studio, names: list[str], prompts: list[list[dict]], settings: GenerationSettings,
                   rng: random.Random | None = None) -> Battle:
        """A battle between two of `names` (a random pair) on one of `prompts` (at random), shown in random order."""
        rng = rng or random.Random()
        names = list(dict.fromkeys(n for n in names if n))
        if len(names) < 2:
            raise ArenaError("Pick at least two contestants (a base model, runs, or exported GGUFs).")
        if not prompts:
            raise ArenaError("No prompt to ask: type one, pick a prompt file, or a run with held-out rows.")
        a, b = rng.sample(names, 2)  # also the blind order: which one is shown as "A"
        targets = _targets(studio, [a, b])
        messages = rng.choice(prompts)
        answer_a, answer_b = answer_pair(studio, targets[a], targets[b], messages, settings)
        battle = Battle(id=uuid.uuid4().hex[:12], messages=messages, prompt_hash=prompt_hash(messages), model_a=a,
                        model_b=b, answer_a=answer_a, answer_b=answer_b, settings=asdict(settings), created=time.time())
        with self._lock:
            self._append(self.battles_path, asdict(battle))
        return battle

    def battles(self) -> list[Battle]:
        fields = set(Battle.__dataclass_fields__)
        return [Battle(**{k: v for k, v in r.items() if k in fields}) for r in self._rows(self.battles_path)
                if fields <= set(r) | {"settings", "created"}]

    def battle(self, battle_id: str) -> Battle:
        for b in self.battles():
            if b.id == battle_id:
                return b
        raise ArenaError("That battle is not in this app's arena (its runs folder changed?). Start a new battle.")

    def next_unvoted(self, session: str | None) -> Battle | None:
        """The oldest stored battle this session has not voted on: how a shared link's visitors rate the same
        battles."""
        rater = rater_id(session)
        done = {v.get("battle") for v in self._rows(self.votes_path) if v.get("session") == rater}
        return next((b for b in self.battles() if b.id not in done), None)

    # ---- votes ----

    def vote(self, battle_id: str, choice: str, session: str | None) -> dict:
        """Record one session's verdict on a battle ("A", "B" or "tie"); a second vote by the same session on the
        same battle is refused. Returns the vote (which reveals the models)."""
        if choice not in CHOICES:
            raise ArenaError(f"'{choice}' is not a vote: pick A, B or tie.")
        if not battle_id:
            raise ArenaError("No battle to vote on yet: press New battle (or Next unrated battle) first.")
        rater = rater_id(session)
        battle = self.battle(battle_id)
        with self._lock:
            if any(v.get("battle") == battle_id and v.get("session") == rater for v in self._rows(self.votes_path)):
                raise ArenaError("You have already voted on this battle (one vote per battle per session). Press New "
                                 "battle or Next unrated battle for another.")
            row = {"model_a": battle.model_a, "model_b": battle.model_b, "winner": CHOICES[choice],
                   "battle": battle.id, "prompt_hash": battle.prompt_hash, "session": rater, "tstamp": time.time(),
                   "source": "human"}
            self._append(self.votes_path, row)
        return row

    def votes(self, source: str = "human") -> list[dict]:
        path = self.judge_path if source == "judge" else self.votes_path
        out = []
        for i, r in enumerate(self._rows(path), 1):
            try:
                out.append(parse_vote(json.dumps(r), f"{path.name} line {i}"))
            except UserError as e:
                log.warning("%s; skipped", e)
        return out

    def add_judge_vote(self, row: dict) -> None:
        with self._lock:
            self._append(self.judge_path, row)

    # ---- results ----

    def leaderboard(self, source: str = "human", permutations: int = PERMUTATIONS, seed: int = 0) -> Leaderboard | None:
        votes = self.votes(source)
        return compute(games_of(votes), permutations, seed) if votes else None

    def agreement(self) -> tuple[float | None, int]:
        """(share of human votes the judge agrees with, how many were compared): each human vote on a battle the
        judge rated, against the judge's verdict on it (A, B or tie)."""
        judged = {v.get("battle"): v["winner"] for v in self.votes("judge")}
        pairs = [(v["winner"], judged[v.get("battle")]) for v in self.votes("human") if v.get("battle") in judged]
        if not pairs:
            return None, 0
        return sum(h == j for h, j in pairs) / len(pairs), len(pairs)
