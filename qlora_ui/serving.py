"""Chat requests served together: the waiting requests share forward passes, each streamed to its own reader.

One worker thread owns the chat model. Requests wait in a queue; whenever the model is free the worker takes up to
`max_batch` of them, left-pads their prompts into one batch and decodes them step by step, each row with its own
sampling settings, seed, token limit and stop condition. A row that finishes or whose reader went away leaves the
batch at the next step (its KV cache rows are dropped), so it stops using compute. Requests that arrive while a
batch decodes join it at the next step (prefilled on their own, their KV cache rows appended) while there is room;
the others are told their place in line.

Adapters: rows for different adapters of one base share a batch through peft's mixed-adapter forward
(`adapter_names=[...]`, "__base__" for the base), except DoRA adapters, which peft cannot mix: then the batch holds
the oldest request's adapter only and the others wait for the next batch.

Why not `generate()`: one `generate` call has one temperature, top-p, seed and length for the whole batch, and
transformers 5's continuous-batching `generate_batch` does not run on bitsandbytes 4-bit layers on the CPU.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

GATHER_S = 0.05
IDLE_S = 2.0
BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


from .errors import ChatBusy  # noqa: E402,F401 - the error family's; re-exported


@dataclass
class Request:
    ids: list[int]
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    adapter: str | None  # the engine's adapter name, None = the base
    session: str | None = None
    threads: int | None = None
    key: Any = None  # which loaded base the adapter name belongs to
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.time)
    tokens: int = 0  # generated so far: the API's usage count and finish_reason


class BatchServer:
    """The queue and the decode loop. `engine` provides .model, .tokenizer, .lock, .key and .dora (adapter names
    that use DoRA)."""

    def __init__(self, engine, max_batch: int = 16, max_waiting: int = 64):
        self.engine = engine
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._waiting: deque[Request] = deque()
        self._active_sessions: set[str] = set()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        # A worker still inside torch when the interpreter shuts down aborts the process ("terminate called
        # without an active exception", seen with the CLI chat): at exit, let it finish first.
        ref = weakref.ref(self)
        atexit.register(lambda: (server := ref()) is not None and server.close())
        self.batches_served = 0
        self.largest_batch = 0

    # ---- the reader's side ----

    def submit(self, req: Request) -> Request:
        with self._cond:
            if req.session is not None and req.session in self._active_sessions:
                raise ChatBusy("A reply to your last message is still being written. Wait for it to finish (or "
                               "close it) before sending the next one.")
            if len(self._waiting) >= self.max_waiting:
                raise ChatBusy(f"The chat is busy: {len(self._waiting)} requests are already waiting, the most this "
                               "app takes. Try again in a moment.")
            if req.session is not None:
                self._active_sessions.add(req.session)
            self._waiting.append(req)
            self._ensure_worker()
            self._tell_positions()
            self._cond.notify_all()
        return req

    def release(self, req: Request) -> None:
        """The reader is done with `req` (finished, failed, or went away): free its session and its row."""
        req.cancelled.set()
        with self._cond:
            if req.session is not None:
                self._active_sessions.discard(req.session)
            if req in self._waiting:
                self._waiting.remove(req)
                self._tell_positions()

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    # ---- the worker ----

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._closed = False
            self._worker = threading.Thread(target=self._loop, daemon=True, name="chat-batches")
            self._worker.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests and wait for the worker to finish its batch (readers of it get their replies)."""
        with self._cond:
            self._closed = True
            worker = self._worker
            self._cond.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def _tell_positions(self) -> None:
        for i, r in enumerate(self._waiting):
            r.out.put(("position", i + 1))

    def _take_batch(self) -> list[Request]:
        """Up to max_batch waiting requests for the current base, oldest first; see the module doc for adapters."""
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return []
                self._cond.wait(timeout=IDLE_S)  # then the worker ends; the next request starts another
                if not self._waiting:
                    return []
            # Requests sent together (a room asking at once, Compare's pair) arrive a few ms apart: give the oldest
            # that long so they share the batch instead of the first being served alone.
            deadline = self._waiting[0].created + GATHER_S
            while len(self._waiting) < self.max_batch and (left := deadline - time.time()) > 0:
                self._cond.wait(timeout=left)
            for r in [r for r in self._waiting if r.cancelled.is_set()]:
                self._waiting.remove(r)
            key = self.engine.key
            stale = [r for r in self._waiting if r.key != key]
            for r in stale:
                self._waiting.remove(r)
                r.out.put(("error", ChatBusy("The chat model was switched while your message waited. Send it "
                                             "again.")))
            if not self._waiting:
                return []
            dora = getattr(self.engine, "dora", set())
            first = self._waiting[0]
            mixable = not any(r.adapter in dora for r in self._waiting)
            batch = [r for r in self._waiting if mixable or r.adapter == first.adapter][: self.max_batch]
            for r in batch:
                self._waiting.remove(r)
            self._tell_positions()
            return batch

    def _take_joiners(self, rows: list[Request]) -> list[Request]:
        """Waiting requests that can join the running batch now (room left, same base, mixable adapters)."""
        room = self.max_batch - len(rows)
        with self._cond:
            if room <= 0 or not self._waiting:
                return []
            dora = getattr(self.engine, "dora", set())
            current = {r.adapter for r in rows}
            ok = [r for r in self._waiting if r.key == self.engine.key and not r.cancelled.is_set() and (
                not rows or (not (current | {r.adapter}) & dora) or current == {r.adapter})]
            taken = ok[:room]
            for r in taken:
                self._waiting.remove(r)
            if taken:
                self._tell_positions()
                self.largest_batch = max(self.largest_batch, len(rows) + len(taken))
            return taken

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                with self._cond:
                    if not self._waiting:
                        self._worker = None
                        return
                continue
            try:
                self._serve(batch)
            except BaseException as e:  # noqa: BLE001 - every reader gets the error; the worker goes on
                log.exception("chat batch failed")
                for r in batch:
                    r.out.put(("error", e))

    def _serve(self, batch: list[Request]) -> None:
        import torch

        from .modeling import mark_generated

        eng = self.engine
        threads = [r.threads for r in batch if r.threads]
        before = torch.get_num_threads()
        lower_priority(bool(threads))
        if threads:
            # Beside a running training the chat gets the threads left to it (see Studio.chat_threads).
            torch.set_num_threads(min(threads))
        try:
            with eng.lock, torch.no_grad():
                self.batches_served += 1
                self.largest_batch = max(self.largest_batch, len(batch))
                mark_generated(eng.model)
                decode(eng.model, eng.tokenizer, batch, take_more=self._take_joiners)
        finally:
            if threads:
                torch.set_num_threads(before)


def lower_priority(on: bool) -> None:
    """Nice this thread (Linux: a thread id is a process id to setpriority) while a training runs, so the chat
    uses only CPU time the trainer leaves: on 2 cores a chatting room otherwise took ~78% of the training's
    throughput (bench/load.py). Going back to 0 needs privileges; without them the thread stays niced, which
    costs nothing when nothing else wants the CPU."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19 if on else 0)
    except (OSError, AttributeError):
        pass


def _stop_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    return {i for i in ids if i is not None}


def _pick(logits, r: Request, gen) -> int:
    """The next token of one row: greedy at temperature 0, else temperature + top-p sampling from the row's own
    generator (so a seed gives the same reply alone or in a batch)."""
    import torch

    if r.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / r.temperature, dim=-1)
    if r.top_p < 1.0:
        probs = _nucleus(probs, r.top_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


NUCLEUS_FIRST_K = 256


def _nucleus(probs, top_p: float):
    """`probs` with only the smallest set of most likely tokens whose mass reaches top_p kept (the rest zero).

    The nucleus is a prefix of the probabilities sorted in descending order, so it is found among the top k, k
    growing 4x until the prefix's last token falls outside it: sorting the whole vocabulary (49,152 on the bundled
    model) cost ~10% of a battle's decode. Its running sum is the full sort's (the same values in the same order).
    Equal probabilities at the nucleus' edge (common: logits come in bf16) are kept lowest token id first, as a
    stable sort orders them; `topk` orders ties arbitrarily, and so did the unstable full sort used before."""
    import torch

    n = probs.numel()
    k = min(n, NUCLEUS_FIRST_K)
    while True:
        top = probs.topk(k).values
        keep = top.cumsum(-1) - top < top_p  # the smallest set whose mass reaches top_p
        if not bool(keep[-1]) or k == n:
            break
        k = min(n, k * 4)
    size = max(1, int(keep.sum()))  # top_p <= 0 keeps the likeliest token (the full sort kept none: NaN draw)
    edge = top[size - 1]
    above = probs > edge
    out = torch.where(above, probs, torch.zeros_like(probs))
    ties = (probs == edge).nonzero().squeeze(1)[: size - int(above.sum())]
    out[ties] = edge
    return out


def _prefill(model, tokenizer, batch: list[Request], forward):
    """Left-pad the prompts into one batch and run them: (logits of each row's last position, attention mask,
    each row's last position id, the KV cache)."""
    import torch
    from transformers import DynamicCache

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r.ids) for r in batch)
    dev = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in batch], device=dev)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in batch], device=dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = forward(ids, mask, pos, cache, [r.adapter or BASE for r in batch])
    return logits, mask, pos[:, -1], cache


def _joinable(cache) -> bool:
    """Rows can join a running batch only through plain full-attention cache layers (not sliding windows)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _merge(cache, mask, other, other_mask):
    """Append `other`'s rows to `cache`: both are left-padded to the longer cache length (masked out)."""
    import torch
    import torch.nn.functional as F

    t = max(mask.shape[1], other_mask.shape[1])

    def left(x, n):  # pad dim -2 (sequence) of a [B, H, T, D] tensor, or dim 1 of a [B, T] mask, on the left
        return F.pad(x, (0, 0, n, 0)) if x.dim() == 4 else F.pad(x, (n, 0))

    for a, b in zip(cache.layers, other.layers):
        na, nb = t - a.keys.shape[-2], t - b.keys.shape[-2]
        a.keys = torch.cat([left(a.keys, na), left(b.keys, nb)], dim=0)
        a.values = torch.cat([left(a.values, na), left(b.values, nb)], dim=0)
    return torch.cat([left(mask, t - mask.shape[1]), left(other_mask, t - other_mask.shape[1])], dim=0)


def decode(model, tokenizer, batch: list[Request], take_more=None) -> None:
    """Prefill the left-padded prompts together, then one token per row per step until every row stopped.

    `take_more(rows)` (if given) is asked before each step for requests that may join the running batch; they are
    prefilled on their own and their KV cache rows appended, so a newcomer's first token does not wait for the
    longest reply in the batch."""
    import torch

    peft_model = hasattr(model, "disable_adapter")
    dev = next(model.parameters()).device
    stops = _stop_ids(model, tokenizer)

    def forward(x, m, p, cache, names):
        kw = dict(input_ids=x, attention_mask=m, position_ids=p, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
        if peft_model:
            if all(n == BASE for n in names):
                with model.disable_adapter():
                    return model(**kw).logits[:, -1, :].float()
            if len(set(names)) == 1:
                model.set_adapter(names[0])
                return model(**kw).logits[:, -1, :].float()
            kw["adapter_names"] = names
        return model(**kw).logits[:, -1, :].float()

    rows = list(batch)
    logits, mask, last_pos, cache = _prefill(model, tokenizer, rows, forward)
    gens = [torch.Generator().manual_seed(int(r.seed)) for r in rows]
    made: list[list[int]] = [[] for _ in rows]

    def pick_all(rows_, logits_, gens_, made_) -> tuple[list[int], list[int]]:
        """Each row's next token, streamed; returns (indexes of the rows that go on, their tokens)."""
        keep, nxt = [], []
        for i, r in enumerate(rows_):
            tok = _pick(logits_[i].cpu(), r, gens_[i])
            done = tok in stops
            if not done:
                made_[i].append(tok)
                r.tokens = len(made_[i])
                r.out.put(("text", tokenizer.decode(made_[i], skip_special_tokens=True)))
            if done or len(made_[i]) >= r.max_new_tokens or r.cancelled.is_set():
                if not done and len(made_[i]) < r.max_new_tokens:  # the server's own word (tests/test_security.py)
                    log.info("chat row left the batch: its reader went away after %d tokens", len(made_[i]))
                r.out.put(("done", tokenizer.decode(made_[i], skip_special_tokens=True)))
            else:
                keep.append(i)
                nxt.append(tok)
        return keep, nxt

    keep, nxt = pick_all(rows, logits, gens, made)
    while True:
        if len(keep) < len(rows):  # finished or abandoned rows leave the batch and its cache
            if not keep:
                rows, gens, made = [], [], []  # a joiner below must not inherit a finished row's tokens
            else:
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask, last_pos = mask[idx], last_pos[idx]
                rows, gens, made = ([seq[i] for i in keep] for seq in (rows, gens, made))
        joiners = take_more(rows) if (take_more is not None and (not rows or _joinable(cache))) else []
        if joiners:
            j_logits, j_mask, j_last, j_cache = _prefill(model, tokenizer, joiners, forward)
            j_gens = [torch.Generator().manual_seed(int(r.seed)) for r in joiners]
            j_made: list[list[int]] = [[] for _ in joiners]
            j_keep, j_nxt = pick_all(joiners, j_logits, j_gens, j_made)
            if j_keep:
                idx = torch.tensor(j_keep, device=dev)
                j_cache.batch_select_indices(idx)
                j_mask, j_last = j_mask[idx], j_last[idx]
                joiners, j_gens, j_made = ([seq[i] for i in j_keep] for seq in (joiners, j_gens, j_made))
                if rows:
                    mask = _merge(cache, mask, j_cache, j_mask)
                    last_pos = torch.cat([last_pos, j_last])
                else:
                    cache, mask, last_pos = j_cache, j_mask, j_last
                rows, gens, made, nxt = rows + joiners, gens + j_gens, made + j_made, nxt + j_nxt
        if not rows:
            return
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=dev)], dim=1)
        last_pos = last_pos + 1
        logits = forward(torch.tensor(nxt, device=dev)[:, None], mask, last_pos[:, None], cache,
                         [r.adapter or BASE for r in rows])
        keep, nxt = pick_all(rows, logits, gens, made)
