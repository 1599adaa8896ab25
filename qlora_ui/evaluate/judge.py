"""The automatic rater: a judge model behind any OpenAI-compatible chat endpoint (OpenAI's, a local server's, this
app's own /v1) rates the arena's stored battles.

The QLoRA paper found its judge (GPT-4) biased toward the answer shown first, and controlled that by asking twice,
once in each order. So here: each battle is judged with its answers as shown (A first) and swapped (B first); a model
wins only when both orders pick it, and a verdict that flips with the order (or a tie in either) counts as a tie.
Judge votes go to `arena/judge_votes.jsonl` (source "judge"), apart from people's votes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ArenaError
from .arena import Arena, Battle

log = logging.getLogger(__name__)

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
# A pairwise prompt adapted from Vicuna's GPT-4 review prompt (the judge setup the paper builds on), asking for a
# bracketed verdict at the end so that it parses without guessing.
TEMPLATE = """[Question]
{question}

[The Start of Assistant 1's Answer]
{first}
[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{second}
[The End of Assistant 2's Answer]

[System]
We would like to request your feedback on the performance of two AI assistants in response to the user question \
displayed above.
Please rate the helpfulness, relevance, accuracy and level of detail of their responses. Avoid any bias from the \
order in which the responses were presented or from their length. First give a short explanation, then on the last \
line output your final verdict strictly in this format: "[[1]]" if Assistant 1 is better, "[[2]]" if Assistant 2 is \
better, "[[tie]]" for a tie."""
VERDICT = re.compile(r"\[\[\s*(1|2|tie)\s*\]\]", re.IGNORECASE)
SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)[\s,]+(\d+(?:\.\d+)?)\s*$", re.MULTILINE)  # Vicuna's "8 7" first line
MAX_TOKENS = 512


@dataclass
class JudgeResult:
    judged: int = 0  # battles given a verdict now
    skipped: int = 0  # already judged by this judge model before
    unparsed: int = 0  # battles where the judge's reply held no verdict in one order or both (not voted)
    ties_from_flips: int = 0  # the two orders disagreed: counted as a tie
    model: str = ""


def parse_verdict(text: str) -> str | None:
    """"first", "second", "tie", or None when the reply holds no verdict."""
    found = VERDICT.findall(text or "")
    if found:
        v = found[-1].lower()
        return {"1": "first", "2": "second"}.get(v, "tie")
    m = SCORES.search(text or "")
    if m:
        s1, s2 = float(m.group(1)), float(m.group(2))
        return "first" if s1 > s2 else "second" if s2 > s1 else "tie"
    return None


class Judge:
    """One endpoint and judge model. `client` is an openai.OpenAI (tests may pass their own)."""

    def __init__(self, url: str, key: str = "", model: str = "", timeout: float = 120.0, client=None):
        url = (url or "").strip()
        if client is None:
            if not url.startswith(("http://", "https://")):
                raise ArenaError(f"Judge URL '{url[:200]}' is not an http(s) URL. Give the endpoint's base URL, e.g. "
                                 "https://api.openai.com/v1 or this app's own http://127.0.0.1:7860/v1.")
            import openai

            client = openai.OpenAI(base_url=url, api_key=key or "none", timeout=timeout, max_retries=1)
        self.client, self.url = client, url
        self.model = (model or "").strip() or self._first_model()

    def _call(self, fn: Callable, what: str):
        import openai

        try:
            return fn()
        except openai.AuthenticationError:
            raise ArenaError(f"The judge endpoint {self.url} refused the key. Check the API key.") from None
        except openai.NotFoundError as e:
            raise ArenaError(f"The judge endpoint {self.url} has no {what} ({e.message[:200]}). Check the URL (it "
                             "usually ends in /v1) and the model name.") from None
        except openai.APIConnectionError:
            raise ArenaError(f"Cannot reach the judge endpoint {self.url}. Check the URL and that the server "
                             "runs.") from None
        except openai.APIStatusError as e:
            raise ArenaError(f"The judge endpoint {self.url} answered {e.status_code}: {e.message[:300]}") from None

    def _first_model(self) -> str:
        models = self._call(lambda: [m.id for m in self.client.models.list()], "model list")
        if not models:
            raise ArenaError(f"The judge endpoint {self.url} lists no models. Give the judge model's name.")
        return models[0]

    def ask(self, question: str, first: str, second: str) -> tuple[str | None, str]:
        """(verdict "first"/"second"/"tie"/None, the judge's reply) for one order."""
        prompt = TEMPLATE.format(question=question, first=first, second=second)
        reply = self._call(lambda: self.client.chat.completions.create(
            model=self.model, temperature=0, max_tokens=MAX_TOKENS,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]),
            f"model '{self.model}'")
        text = (reply.choices[0].message.content or "") if reply.choices else ""
        return parse_verdict(text), text

    def rate(self, battle: Battle) -> tuple[str | None, bool]:
        """(winner as model_a/model_b/tie or None if unparsed, whether the orders disagreed) for one battle,
        judged in both orders."""
        shown, _ = self.ask(battle.prompt, battle.answer_a, battle.answer_b)
        swapped, _ = self.ask(battle.prompt, battle.answer_b, battle.answer_a)
        if shown is None or swapped is None:
            return None, False
        as_shown = {"first": "model_a", "second": "model_b", "tie": "tie"}[shown]
        as_swapped = {"first": "model_b", "second": "model_a", "tie": "tie"}[swapped]
        if as_shown == as_swapped:
            return as_shown, False
        return "tie", as_shown != "tie" and as_swapped != "tie"


def run_judge(arena: Arena, judge: Judge, limit: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> JudgeResult:
    """Judge every stored battle this judge model has not judged yet (at most `limit`), appending its votes."""
    result = JudgeResult(model=judge.model)
    rater = f"judge:{judge.model}"
    done = {v.get("battle") for v in arena._rows(arena.judge_path) if v.get("session") == rater}
    todo = [b for b in arena.battles() if b.id not in done]
    result.skipped = len(arena.battles()) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    for i, battle in enumerate(todo):
        if progress:
            progress(i, len(todo))
        winner, flipped = judge.rate(battle)
        if winner is None:
            result.unparsed += 1
            log.warning("judge %s gave no verdict on battle %s; not voted", judge.model, battle.id)
            continue
        result.ties_from_flips += flipped
        arena.add_judge_vote({"model_a": battle.model_a, "model_b": battle.model_b, "winner": winner,
                              "battle": battle.id, "prompt_hash": battle.prompt_hash, "session": rater,
                              "tstamp": time.time(), "source": "judge", "judge": judge.model,
                              "order_flip": bool(flipped)})
        result.judged += 1
    if progress:
        progress(len(todo), len(todo))
    return result
