"""UI handlers without a browser: form → config, errors as gr.Error, one job per app, confined paths."""

from __future__ import annotations

import json
import time

import gradio as gr
import pytest

from qlora_ui.config import RunConfig
from qlora_ui.studio import Studio
from qlora_ui.ui.tabs import model_data, runs, train
from tests.fault_helpers import DATA, FORM, ByName, form_input, make_cfg

C = ByName()  # the tabs' components, by name


def values_for(cfg: RunConfig) -> dict:
    return form_input(cfg)


@pytest.fixture()
def studio(tmp_path, tiny_model_dir):
    return Studio(tmp_path / "runs", model_roots=[tiny_model_dir])


# The quick start on a bundled test file, long enough to still be running when a handler looks.
LONG = dict(max_steps=200, batch_size=2, eval_fraction=0.0, gradient_checkpointing=False, optimizer="adamw_torch",
            save_steps=50)


def tiny(tiny_model_dir, **kw) -> RunConfig:
    return make_cfg(tiny_model_dir, DATA / "alpaca.json", preset="cpu-quickstart", defaults=LONG, **kw)


def test_form_values_round_trip_to_the_same_config(tiny_model_dir):
    cfg = tiny(tiny_model_dir, column_map={"q": "instruction"})
    again = model_data.config_from(FORM, values_for(cfg))
    assert again == cfg.updated(runs_dir=again.runs_dir)


def test_bad_form_values_raise_one_gr_error_naming_each(tiny_model_dir):
    vals = values_for(tiny(tiny_model_dir))
    vals[FORM["lora_r"]] = 0
    vals[FORM["learning_rate"]] = 5.0
    vals[FORM["batch_size"]] = None
    with pytest.raises(gr.Error) as e:
        model_data.config_from(FORM, vals)
    msg = str(e.value.message)
    # Named as the form labels them, with the key (the CLI flag / preset name) beside the label.
    assert "LoRA rank (lora_r)" in msg and "Learning rate (learning_rate)" in msg and "Batch size" in msg
    vals = values_for(tiny(tiny_model_dir))
    vals[FORM["column_map"]] = "question"
    with pytest.raises(gr.Error, match=r"Column map \(column_map\)"):
        model_data.config_from(FORM, vals)


def test_inspect_reports_a_bad_file_in_place(studio, tiny_model_dir, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"instruction": "a", "output": ')
    vals = values_for(tiny(tiny_model_dir, data_path=str(bad)))
    out = model_data.inspect_data(studio, FORM, C, vals)
    summary, df, fig = out["data_summary"], out["data_preview"], out["data_hist"]
    assert summary.startswith("**Could not use this file.**") and "JSON" in summary
    assert df is None and fig is None


def test_inspect_shows_format_histogram_and_masked_example(studio, tiny_model_dir):
    vals = values_for(tiny(tiny_model_dir))
    out = model_data.inspect_data(studio, FORM, C, vals)
    summary, df, fig, example = out["data_summary"], out["data_preview"], out["data_hist"], out["data_example"]
    assert "alpaca" in summary and len(df) > 0 and fig is not None
    assert "qs-trained" in example and "qs-masked" in example


def is_skip(value) -> bool:
    return value == gr.skip()


def test_one_training_per_app_and_poll_reattaches(studio, tiny_model_dir):
    vals = values_for(tiny(tiny_model_dir))
    train.start_training(studio, FORM, vals)
    with pytest.raises(gr.Error, match="already in progress"):
        train.start_training(studio, FORM, vals)
    deadline = time.time() + 120
    while studio.job.step < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert studio.job.step >= 2, "training did not reach step 2 in 120 s"
    out = train.poll_training(studio, C, None)
    prog, fig, log, stop = out["progress"], out["plot"], out["log"], out["stop"]
    assert 'data-state="running"' in prog and "training" in log and stop["interactive"] is True
    assert not is_skip(fig) and len(fig.data[0].x) >= 1
    run = studio.job.run
    with pytest.raises(gr.Error, match="training right now"):
        runs.delete_run(studio, run.name)
    train.stop_training(studio)
    assert studio.job.wait(60) == "stopped"
    # A second session (fresh state) reattaches and draws the whole curve: one point per loss row on disk.
    out2 = train.poll_training(studio, C, None)
    prog2, fig2, seen2, stop2 = out2["progress"], out2["plot"], out2["seen"], out2["stop"]
    losses = [r["step"] for r in run.read_metrics() if "loss" in r]
    assert list(fig2.data[0].x) == losses and len(losses) >= 2
    assert 'data-state="stopped"' in prog2 and stop2["interactive"] is False
    # Polling again with the state it returned, with nothing new on disk, skips every redraw.
    # (a skip leaves every output as it is, the session's state included)
    assert is_skip(train.poll_training(studio, C, seen2))
    assert run.has_adapter()
    df = runs.runs_table(studio, C, C["resume_run"])["table"]
    assert run.name in set(df["name"]) and "stopped" in set(df["status"])
    out = runs.run_details(studio, C, run.name)
    cmd, dl = out["command"], out["download"]
    assert cmd.startswith(".venv/bin/python -m qlora_ui train") and dl["value"].endswith(".zip")
    runs.delete_run(studio, run.name)
    assert not run.path.exists()


def test_start_up_phases_show_on_the_progress_line_with_step_0_of_n(studio, tiny_model_dir):
    """Issue 24, newcomer item 5: LoftQ set-up ran minutes under "loading model · step 0/?". Every start-up phase
    (loading and quantizing, LoftQ layer i/N, tokenizing) is the progress line's message in turn, and the step
    count names Max steps from the start."""
    import re

    phases: list[str] = []
    cfg = tiny(tiny_model_dir, max_steps=3, lora_init="loftq", lora_r=4, lora_alpha=8)
    train.start_training(studio, FORM, values_for(cfg))
    job = studio.job
    first = train.poll_training(studio, C, None)["progress"]
    # Each phase as the Train tab shows it: poll while the job starts (a phase lasts well over the poll interval
    # on a loaded machine, and the run log below keeps every one in case a poll misses some).
    deadline = time.time() + 300
    while job.alive and time.time() < deadline:
        out = train.poll_training(studio, C, None)
        msg = re.search(r'class="qs-msg">([^<]*)<', out["progress"]) if not is_skip(out) else None
        if msg and (not phases or phases[-1] != msg.group(1)):
            phases.append(msg.group(1))
        time.sleep(0.1)
    assert job.wait(60) == "finished", job.error_message
    # While the model still loads, the count is "0/3", not "0/?".
    assert re.search(r"step <b>\d+/3</b>", first), first
    said = job.run.log_path.read_text()
    first_layer = re.search(r"LoftQ layer 1/(\d+)", said)
    assert first_layer, said[-2000:]
    n = int(first_layer.group(1))
    order = ["loading model and quantizing it to 4-bit NF4", "LoftQ: reading the 16-bit weights",
             *(f"LoftQ layer {i}/{n} " for i in range(1, n + 1)), "reading and tokenizing the dataset", "training"]
    at = [said.find(p) for p in order]
    assert all(a >= 0 for a in at) and at == sorted(at), list(zip(order, at))
    # The progress line itself showed the phases (more than loading and training), not only the log.
    assert any(p.startswith("LoftQ") or "tokenizing" in p for p in phases), phases


def test_run_names_cannot_escape_the_runs_dir(studio, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.yaml").write_text("name: x\n")
    from qlora_ui.errors import RunError
    from qlora_ui.runs import open_run

    # `outside` is a valid run folder: these are refused for where they point, not for lacking a config.
    # The Studio keeps only a name's last part (so it looks inside the runs folder, where there is no such run);
    # the engine's open_run, given the runs folder, refuses the escape by name.
    for name in ["../elsewhere", str(outside), f"{studio.runs_dir}/../elsewhere"]:
        with pytest.raises(RunError, match=r"is not a run folder"):
            studio.open(name)
        with pytest.raises(RunError, match=r"is not a run inside"):
            open_run(name if name != "../elsewhere" else f"{studio.runs_dir}/../elsewhere", studio.runs_dir)
    assert open_run(outside).path == outside.resolve()  # it is a run: only where it lies keeps it out


def test_typed_model_paths_are_confined_to_model_roots(studio, tmp_path):
    from qlora_ui.config import ConfigError

    with pytest.raises(ConfigError, match="outside the folders"):
        studio.check_model_path(str(tmp_path))
    with pytest.raises(ConfigError):
        studio.check_model_path("/etc")


@pytest.mark.parametrize("shared", [False, True])
def test_run_folder_is_shown_in_full_on_a_local_app_and_cut_on_a_shared_one(tmp_path, tiny_model_dir, shared):
    """Issue 24, newcomer item 9: a runs folder outside the app's folder showed as ".../<run>" even on loopback,
    which can be neither copied nor opened. A local app shows the absolute path; a shared one still hides the
    host's layout from strangers; inside the app's folder the path stays relative (runnable from there)."""
    from pathlib import Path

    from qlora_ui.runs import create_run

    studio = Studio(tmp_path / "runs", model_roots=[tiny_model_dir], shared=shared)
    assert not studio.runs_dir.is_relative_to(Path.cwd())  # the case the issue hit: --runs-dir elsewhere
    run = create_run(tiny(tiny_model_dir, runs_dir=str(studio.runs_dir), name="capitals"))
    details = runs.run_details(studio, C, run.name)["details"]
    folder = details.split("Folder: ", 1)[1].split(" · ", 1)[0].replace("\\", "")
    if shared:
        assert folder == f".../{run.path.name}" and str(tmp_path) not in details, details
    else:
        assert folder == str(run.path.resolve()) and Path(folder).is_dir(), details
    inside = Path.cwd() / "runs" / "x"
    assert studio.shown_path(inside) == str(Path("runs") / "x")


def test_presets_fill_the_form_and_save_as_preset(tmp_path, tiny_model_dir):
    import shutil

    from qlora_ui import config

    presets = tmp_path / "presets"
    shutil.copytree(config.PRESETS_DIR, presets, ignore=shutil.ignore_patterns("data"))
    studio = Studio(tmp_path / "runs", presets_dir=presets)
    vals = train.apply_preset(studio, FORM, "qlora-paper")
    assert vals[FORM["lora_r"]] == 64 and vals[FORM["lora_alpha"]] == 16
    cfg_vals = values_for(tiny(tiny_model_dir, lora_r=12))
    upd = train.save_as_preset(studio, FORM, "mine", cfg_vals)
    # Saved apart from the bundled presets, listed and loaded like them.
    assert "mine" in upd["choices"] and config.load_yaml(presets / "user" / "mine.yaml").lora.lora_r == 12
    assert train.apply_preset(studio, FORM, "mine")[FORM["lora_r"]] == 12
    for bad in ["../evil", "qlora-paper", ".hidden"]:
        with pytest.raises(gr.Error, match="preset name"):
            train.save_as_preset(studio, FORM, bad, cfg_vals)
    assert not (tmp_path / "evil.yaml").exists() and not list(presets.rglob(".*"))
    assert config.load_yaml(presets / "qlora-paper.yaml").lora.lora_r == 64


def test_metrics_file_torn_line_does_not_break_polling(studio, tiny_model_dir):
    from qlora_ui.runs import create_run

    cfg = tiny(tiny_model_dir, runs_dir=str(studio.runs_dir))
    run = create_run(cfg)
    run.append_metrics({"step": 1, "loss": 2.0})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 2, "lo')
    assert [r["step"] for r in run.read_metrics()] == [1]
    fig = runs.overlay(studio, [run.name])
    assert len(fig.data) == 1
    assert json.loads(run.status_path.read_text())["state"] == "created"


def test_after_a_restart_the_form_shows_the_interrupted_run_and_a_loading_run_hides_the_old_curve(studio,
                                                                                                  tiny_model_dir):
    import types

    from qlora_ui.runs import create_run

    cut = create_run(tiny(tiny_model_dir, max_steps=30, name="cut").updated(runs_dir=str(studio.runs_dir)))
    cut.write_status("running", "training", step=3)
    st = json.loads(cut.status_path.read_text())
    st["pid_started"] = 1.0  # the app that trained it is gone
    cut.status_path.write_text(json.dumps(st))
    assert cut.read_status()["state"] == "interrupted"
    out = train.restore_page(studio, FORM, C, "tabs")
    # The form shows what Resume continues: the run's 30 steps, not the preset's 60.
    assert out[FORM["max_steps"]] == 30 and 'data-state="interrupted"' in out["progress"]

    # A new run still loading (no loss rows yet) clears the chart this session drew for another run.
    fresh = create_run(tiny(tiny_model_dir, max_steps=4, name="fresh").updated(runs_dir=str(studio.runs_dir)))
    fresh.write_status("running", "loading model")
    studio.job = types.SimpleNamespace(run=fresh, state="running", phase="loading model", step=0, max_steps=4,
                                       error_message=None)
    out = train.poll_training(studio, C, (cut.name, 12, "finished", "", 12, 0.0))
    assert "plot" in out and out["plot"] is None
    # ...once: the next tick with nothing new leaves it alone.
    assert out["seen"][4] == 0 and is_skip(train.poll_training(studio, C, out["seen"]))


def test_the_progress_route_extends_the_drawn_chart_to_the_whole_figure(studio, tiny_model_dir):
    """The page's script extends the chart it shows with progress_json's points (JS in ui/app.py): the extended
    traces must be the whole figure's, trace by trace, for an SFT and for a preference run."""
    import types

    from qlora_ui.plots import training_figure
    from qlora_ui.runs import create_run

    run = create_run(tiny(tiny_model_dir, max_steps=30, name="grow").updated(runs_dir=str(studio.runs_dir)))
    studio.job = types.SimpleNamespace(run=run, state="running", phase="training", step=0, max_steps=30,
                                       error_message=None)
    sft = [{"step": s, "loss": 3 - s / 10, "lr": 1e-4, "grad_norm": 1 + s, "tokens_per_s": 100 + s} for s in
           range(1, 9)]
    sft.insert(5, {"step": 5, "eval_loss": 2.5})
    pref = [{**r, "reward_chosen": s / 3, "reward_rejected": -s, "reward_margin": s, "reward_accuracy": 0.5}
            for s, r in enumerate(x for x in sft if "loss" in x)]
    pref.insert(4, {"step": 4, "eval_loss": 2.6, "eval_reward_accuracy": 0.75})
    for rows in (sft, pref):
        run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for since in (1, 3, 5, len(rows)):
            drawn = training_figure(rows[:since], title=run.name)
            assert drawn.layout.meta["rows"] == since and drawn.layout.meta["title"] == run.name
            got = train.progress_json(studio, drawn=run.name, since=since)
            assert got["curves"]["rows"] == len(rows)
            whole = training_figure(rows, title=run.name)
            assert len(got["curves"]["points"]) == len(drawn.data) == len(whole.data)
            for old, (x, y), full in zip(drawn.data, got["curves"]["points"], whole.data):
                assert list(old.x or ()) + x == list(full.x) and list(old.y or ()) + y == list(full.y), full.name
        # Nothing to extend: another run's chart, no chart, or more rows than the run has (a changed file).
        for drawn_as, since in (("other", 2), (run.name, None), (run.name, 0), (run.name, len(rows) + 1)):
            assert "curves" not in train.progress_json(studio, drawn=drawn_as, since=since)
    # A chart drawn before a run's first reward row has no reward traces: the page redraws it whole.
    run.metrics_path.write_text(json.dumps(sft[0]) + "\n" + json.dumps(pref[1]) + "\n")
    assert "curves" not in train.progress_json(studio, drawn=run.name, since=1)


def test_each_way_to_pick_data_inspects_it_once(tmp_path):
    """An upload, a file picked from the server list or the upload button, a Hub id entered, a column map entered,
    a changed setting: each starts exactly one inspection, counting every step of its event chain. The file box's
    upload once started two (one listener for every trigger, and the chain that first clears a typed Hub id): twice
    the work on a big file, and two results racing to the data panel."""
    from qlora_ui.ui.app import build_page

    page = build_page(Studio(tmp_path / "runs"))
    deps = page.demo.get_config_file()["dependencies"]
    then = {}
    for d in deps:
        if d["trigger_after"] is not None:
            then.setdefault(d["trigger_after"], []).append(d["id"])

    def inspections(component, event: str) -> int:
        todo = [d["id"] for d in deps if (component._id, event) in map(tuple, d["targets"])]
        assert todo, (component, event)
        n = 0
        while todo:
            i = todo.pop()
            n += page.demo.fns[i].fn.__name__ == "inspect"
            todo += then.get(i, [])
        return n

    md, form = page.model_data, page.form
    assert inspections(form["data_path"], "upload") == 1
    assert inspections(form["data_path"], "clear") == 1
    assert inspections(md["data_upload"], "upload") == 1
    assert inspections(md["data_server"], "change") == 1
    assert inspections(form.source_box, "submit") == 1
    assert inspections(form["column_map"], "submit") == 1
    assert inspections(form["max_length"], "change") == 1
