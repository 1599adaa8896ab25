"""Evaluate tab, arena section: blind battles (A/B in random order, the names shown only after the vote), the
leaderboard (the paper's Elo with its interval, win rates, votes per pair) for people and for a judge model side by
side. The engine is qlora_ui/evaluate/ (arena.py, elo.py, judge.py); this file holds components, handlers, wiring.

Who is voting: the signed-in user, else the browser session (gr.Request), as the Chat tab counts requests; the
battle on screen is per session (gr.State).
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import plotly.graph_objects as go

from ...chat import MAX_MESSAGE_CHARS, GenerationSettings
from ...errors import ArenaError
from ...evaluate.arena import Battle, contestants, file_prompts, held_out_prompts, typed_prompts
from ...evaluate.elo import Leaderboard
from ...studio import Studio
from ..feedback import USER_ERRORS, md_text, user_error

TYPED, HELD_OUT, FILE = "Typed", "Held-out rows of a run", "A prompt file"
BOARD_COLUMNS = ["rank", "model", "Elo", "low (2.5%)", "high (97.5%)", "games"]
NO_BATTLE = "Press **New battle** (or **Next unrated battle**): two answers appear as A and B, their models hidden."


def build() -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown("### Arena\nTwo models answer the same prompt with the same settings and seed; you see them as **A** "
                "and **B** in a random order and learn which was which only after voting. Votes become Elo ratings "
                "as in the QLoRA paper (start 1000, K 32, ties half a win, mean over 10,000 random orderings with a "
                "95% interval).")
    with gr.Row():
        c["contestants"] = gr.Dropdown(label="Contestants", multiselect=True, choices=[], scale=4,
                                       info="Two or more: base models, runs' adapters, exported GGUFs.",
                                       elem_id="arena-contestants")
        c["refresh"] = gr.Button("↻ Refresh", scale=1, elem_id="arena-refresh")
    with gr.Row():
        c["source"] = gr.Radio([TYPED, HELD_OUT, FILE], value=TYPED, label="Prompts from", scale=2,
                               elem_id="arena-source")
        c["prompt_run"] = gr.Dropdown(label="Run (its held-out rows)", choices=[], scale=2, visible=False,
                                      elem_id="arena-prompt-run")
    c["typed"] = gr.Textbox(label="Prompts (one per line; each battle picks one)", lines=2, max_lines=8,
                            max_length=MAX_MESSAGE_CHARS * 4, elem_id="arena-typed")
    c["file"] = gr.File(label="Prompt file (.txt one per line, or .jsonl with a 'prompt' field)",
                        file_types=[".txt", ".jsonl", ".json"], visible=False, elem_id="arena-file")
    with gr.Accordion("Generation settings (the same for both answers)", open=False):
        with gr.Row():
            c["temperature"] = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
            c["max_new_tokens"] = gr.Slider(8, 512, value=64, step=8, label="Max new tokens")
            c["seed"] = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=2**31 - 1)
    with gr.Row():
        c["new"] = gr.Button("New battle", variant="primary", elem_id="arena-new")
        c["next"] = gr.Button("Next unrated battle", elem_id="arena-next")
    c["prompt"] = gr.Markdown(NO_BATTLE, elem_id="arena-prompt")
    with gr.Row():
        c["answer_a"] = gr.Textbox(label="A", lines=6, interactive=False, elem_id="arena-a")
        c["answer_b"] = gr.Textbox(label="B", lines=6, interactive=False, elem_id="arena-b")
    with gr.Row():
        c["vote_a"] = gr.Button("A is better", elem_id="arena-vote-a")
        c["vote_tie"] = gr.Button("Tie", elem_id="arena-vote-tie")
        c["vote_b"] = gr.Button("B is better", elem_id="arena-vote-b")
    c["reveal"] = gr.Markdown(elem_id="arena-reveal")
    c["battle"] = gr.State("")  # per session: the id of the battle on screen

    gr.Markdown("#### Leaderboard")
    c["refresh_board"] = gr.Button("↻ Refresh leaderboard", elem_id="arena-refresh-board")
    c["agreement"] = gr.Markdown(elem_id="arena-agreement")
    with gr.Row():
        c["board"] = gr.Dataframe(headers=BOARD_COLUMNS, label="People's votes", interactive=False,
                                  elem_id="arena-board")
        c["judge_board"] = gr.Dataframe(headers=BOARD_COLUMNS, label="Judge's votes", interactive=False,
                                        elem_id="arena-judge-board")
    c["plot"] = gr.Plot(label="Elo with its 95% interval", elem_id="arena-plot")
    with gr.Row():
        c["win_rate"] = gr.Dataframe(label="Win rate of the row's model against the column's (people; ties half)",
                                     interactive=False, elem_id="arena-win-rate")
        c["pairs"] = gr.Dataframe(label="Votes per pair (people)", interactive=False, elem_id="arena-pairs")

    with gr.Accordion("Judge model (OpenAI-compatible endpoint)", open=False, elem_id="arena-judge"):
        gr.Markdown("Rates every stored battle twice, once in each order; a verdict that flips with the order counts "
                    "as a tie (the paper's control for the judge's bias toward the first answer). Its votes are kept "
                    "apart from people's.")
        with gr.Row():
            c["judge_url"] = gr.Textbox(label="Base URL", placeholder="https://api.openai.com/v1", max_length=2048,
                                        elem_id="arena-judge-url")
            c["judge_key"] = gr.Textbox(label="API key", type="password", max_length=4096, elem_id="arena-judge-key")
            c["judge_model"] = gr.Textbox(label="Judge model", placeholder="(the first the endpoint lists)",
                                          max_length=256, elem_id="arena-judge-model")
        c["judge_run"] = gr.Button("Judge the stored battles", elem_id="arena-judge-run")
        c["judge_status"] = gr.Markdown(elem_id="arena-judge-status")
    return c


# ---- handlers: dict in, dict out ----

def who(request: gr.Request | None) -> str | None:
    """The rater: a signed-in user (a second tab is the same person), else the browser session."""
    return getattr(request, "username", None) or getattr(request, "session_hash", None)


def contestant_choices(studio: Studio, c: dict, current: list | None = None) -> dict:
    names = [t.id for t in contestants(studio)]
    runs = [r.name for r in studio.runs()]
    keep = [n for n in (current or []) if n in names]
    return {c["contestants"]: gr.update(choices=names, value=keep),
            c["prompt_run"]: gr.update(choices=runs, value=runs[0] if runs else None)}


def _prompts(studio: Studio, source: str, typed: str, run_name: str | None, file) -> list[list[dict]]:
    if source == HELD_OUT:
        if not run_name:
            raise ArenaError("Pick the run whose held-out rows to ask (Run, beside Prompts from).")
        return studio.arena.cached(("held_out", run_name), lambda: held_out_prompts(studio, run_name))
    if source == FILE:
        path = getattr(file, "name", file)
        if not path:
            raise ArenaError("Choose a prompt file first (.txt with one prompt per line, or .jsonl).")
        return file_prompts(path)
    prompts = typed_prompts(typed)
    if not prompts:
        raise ArenaError("Type a prompt first (one per line), or pick another prompt source.")
    return prompts


def shown(c: dict, battle: Battle | None) -> dict:
    """A battle on screen, names hidden; no battle: the empty state."""
    if battle is None:
        return {c["battle"]: "", c["prompt"]: NO_BATTLE, c["answer_a"]: "", c["answer_b"]: "", c["reveal"]: ""}
    return {c["battle"]: battle.id, c["prompt"]: f"**Prompt:** {md_text(battle.prompt)}",
            c["answer_a"]: battle.answer_a, c["answer_b"]: battle.answer_b,
            c["reveal"]: "Which answer is better? The models are named once you vote."}


def new_battle(studio: Studio, c: dict, values: dict) -> dict:
    try:
        prompts = _prompts(studio, values[c["source"]], values[c["typed"]], values[c["prompt_run"]],
                           values[c["file"]])
        settings = GenerationSettings(temperature=float(values[c["temperature"]] or 0),
                                      max_new_tokens=int(studio.cap_new_tokens(values[c["max_new_tokens"]])),
                                      seed=int(values[c["seed"]] or 0))
        battle = studio.arena.new_battle(studio, values[c["contestants"]] or [], prompts, settings)
    except USER_ERRORS as e:
        raise user_error(e) from None
    return shown(c, battle)


def next_battle(studio: Studio, c: dict, session: str | None) -> dict:
    try:
        battle = studio.arena.next_unvoted(session)
    except USER_ERRORS as e:
        raise user_error(e) from None
    if battle is None:
        gr.Info("No unrated battles left for you: press New battle for another.")
        return shown(c, None)
    return shown(c, battle)


def vote(studio: Studio, c: dict, battle_id: str, choice: str, session: str | None) -> dict:
    """Record the vote, then name the models and refresh the leaderboard."""
    try:
        row = studio.arena.vote(battle_id, choice, session)
    except USER_ERRORS as e:
        raise user_error(e) from None
    said = {"model_a": "A", "model_b": "B", "tie": "a tie"}[row["winner"]]
    reveal = (f'<div class="qs-msg" id="arena-revealed">A was <b>{html.escape(row["model_a"])}</b> · B was '
              f'<b>{html.escape(row["model_b"])}</b> · you voted {said}.</div>')
    return {c["reveal"]: reveal} | leaderboard(studio, c)


def _board_rows(board: Leaderboard | None) -> list[list]:
    return board.rows() if board is not None else []


def _matrix(board: Leaderboard | None, key: str):
    import pandas as pd

    if board is None:
        return pd.DataFrame()
    data = getattr(board, key)
    rows = []
    for m in board.models:
        cells = data[m]
        if key == "win_rate":
            rows.append([m] + ["" if m == o or cells[o] is None else f"{100 * cells[o]:.0f}%" for o in board.models])
        else:
            rows.append([m] + ["" if m == o else str(cells[o]) for o in board.models])
    return pd.DataFrame(rows, columns=["model"] + board.models)


def elo_figure(boards: dict[str, Leaderboard | None]) -> go.Figure:
    """Each source's Elo as a point with its 95% interval, models in the people's order."""
    fig = go.Figure()
    order = next((b.models for b in boards.values() if b is not None), [])
    for colour, (name, board) in zip(("#2563eb", "#ea580c"), boards.items()):
        if board is None:
            continue
        models = [m for m in order if m in board.elo] + [m for m in board.models if m not in order]
        fig.add_trace(go.Scatter(
            x=models, y=[board.elo[m] for m in models], mode="markers", name=name, marker=dict(size=10, color=colour),
            error_y=dict(type="data", symmetric=False, array=[board.high[m] - board.elo[m] for m in models],
                         arrayminus=[board.elo[m] - board.low[m] for m in models])))
    fig.add_hline(y=1000, line_dash="dot", line_color="#9ca3af")
    fig.update_layout(height=360, margin=dict(l=40, r=20, t=30, b=60), yaxis_title="Elo", template="plotly_white",
                      legend=dict(orientation="h", y=1.1, x=0))
    return fig


def leaderboard(studio: Studio, c: dict) -> dict:
    try:
        people, judge = studio.arena.leaderboard("human"), studio.arena.leaderboard("judge")
    except USER_ERRORS as e:
        raise user_error(e) from None
    rate, n = studio.arena.agreement()
    counts = f"{sum(people.games.values()) // 2 if people else 0} people's votes, " \
             f"{sum(judge.games.values()) // 2 if judge else 0} judge's votes"
    agree = f" · judge agrees with people on {100 * rate:.0f}% of {n} shared battles' votes" if rate is not None else ""
    return {c["board"]: _board_rows(people), c["judge_board"]: _board_rows(judge),
            # No votes yet: no chart (empty axes from -1 to 6 read as a broken plot).
            c["plot"]: elo_figure({"people": people, "judge": judge}) if people or judge else None,
            c["win_rate"]: _matrix(people, "win_rate"),
            c["pairs"]: _matrix(people, "pair_votes"), c["agreement"]: counts + agree}


def run_judge(studio: Studio, c: dict, values: dict, progress=None) -> dict:
    from ...evaluate.judge import Judge
    from ...evaluate.judge import run_judge as judge_battles

    if getattr(studio, "api_access", "open") != "open":  # set where app.py mounts /v1: "open" only on loopback
        # The server would send requests to any address a visitor types (other services on its network included).
        raise gr.Error("The judge runs only in an app reachable from this machine alone. On the server, run: "
                       "python -m qlora_ui arena judge --runs-dir RUNS --url URL --key KEY",
                       title="Cannot do that")
    try:
        judge = Judge(values[c["judge_url"]], values[c["judge_key"]], values[c["judge_model"]])
        done = judge_battles(studio.arena, judge,
                             progress=(lambda i, n: progress((i, n), desc="judging battles")) if progress else None)
    except USER_ERRORS as e:
        raise user_error(e) from None
    status = (f"Judge **{md_text(done.model)}**: {done.judged} battles judged now ({done.ties_from_flips} ties from a "
              f"verdict that flipped with the order), {done.skipped} judged before, {done.unparsed} without a verdict.")
    return {c["judge_status"]: status} | leaderboard(studio, c)


# ---- wiring ----

def wire(studio: Studio, c: dict[str, Any]) -> None:
    board_out = [c[k] for k in ("board", "judge_board", "plot", "win_rate", "pairs", "agreement")]
    battle_out = [c[k] for k in ("battle", "prompt", "answer_a", "answer_b", "reveal")]
    c["refresh"].click(lambda cur: contestant_choices(studio, c, cur), c["contestants"],
                       [c["contestants"], c["prompt_run"]], api_name=False)
    # Only the chosen prompt source's input is shown.
    c["source"].change(lambda s: {c["typed"]: gr.update(visible=s == TYPED), c["prompt_run"]: gr.update(
        visible=s == HELD_OUT), c["file"]: gr.update(visible=s == FILE)}, c["source"],
        [c["typed"], c["prompt_run"], c["file"]], api_name=False, show_progress="hidden")
    asks = {c[k] for k in ("contestants", "source", "typed", "prompt_run", "file", "temperature", "max_new_tokens",
                           "seed")}
    # The two answers go through the chat's batch server: the same concurrency group as the Chat tab.
    # The answers queue in the chat's batch server, which has its own limits: several battles may wait there.
    c["new"].click(lambda values: new_battle(studio, c, values), asks, battle_out, api_name="arena_battle",
                   concurrency_limit=8)

    def next_one(request: gr.Request):
        return next_battle(studio, c, who(request))

    c["next"].click(next_one, None, battle_out, api_name=False)

    def voter(choice: str):
        def cast(battle_id: str, request: gr.Request):
            return vote(studio, c, battle_id, choice, who(request))

        return cast

    for key, choice in (("vote_a", "A"), ("vote_b", "B"), ("vote_tie", "tie")):
        c[key].click(voter(choice), c["battle"], [c["reveal"], *board_out], api_name=f"arena_vote_{choice.lower()}")
    c["refresh_board"].click(lambda: leaderboard(studio, c), None, board_out, api_name=False)
    judge_in = {c["judge_url"], c["judge_key"], c["judge_model"]}

    def judge(values: dict, progress=gr.Progress()):  # noqa: B008 - gradio's way to ask for a progress bar
        return run_judge(studio, c, values, progress)

    c["judge_run"].click(judge, judge_in, [c["judge_status"], *board_out], api_name=False)


def page_load(studio: Studio, c: dict[str, Any], demo: gr.Blocks) -> None:
    demo.load(lambda: contestant_choices(studio, c), None, [c["contestants"], c["prompt_run"]], api_name=False)
    demo.load(lambda: leaderboard(studio, c), None,
              [c[k] for k in ("board", "judge_board", "plot", "win_rate", "pairs", "agreement")], api_name=False)
