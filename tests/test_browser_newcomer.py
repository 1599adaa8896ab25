"""Issue 24, newcomer items 5 and 9 in Chromium: after Start, the progress line names the start-up phase and
"step 0/N" before the first step; the run's folder is shown relative to where the app was started (copyable,
runnable from there). The shared side of item 9 (only the last part behind a login) is checked over HTTP in
test_security.py's test_run_folder_shows_only_its_last_part_behind_a_login."""

from __future__ import annotations

import json
import time

import pytest

from tests.fault_helpers import VIEWPORT, launch_app, run_dirs, use_tiny_model

pytestmark = pytest.mark.slow


def start_app_in(folder, *flags: str):
    """`python app.py` started from `folder` (a person's own folder, not the repository), as `cd there && python
    .../app.py`: paths inside it are shown relative to it."""
    return launch_app(folder, *flags, cwd=folder)


def test_start_up_phase_and_step_0_of_n_show_then_the_folder_relative_to_the_start(browser, tmp_path,
                                                                                  tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    # Enough rows that reading and tokenizing them outlasts the page's 3 s poll even on a quiet machine (the
    # tiny model loads in well under one poll); the data panel reads only the first 10,000.
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"instruction": f"Say the word number {i}.", "output": f"Arr! {i} it be."})
                            + "\n" for i in range(20_000)))
    proc, url = start_app_in(tmp_path, "--runs-dir", "runs", "--model-root", "models")
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        page.wait_for_selector("#data-summary:has-text('Format')", timeout=90_000)
        use_tiny_model(page, tmp_path / "models")
        page.locator("#dataset-file button[aria-label='Clear']").click()  # the preset's example file goes
        page.set_input_files("#dataset-file input[type=file]", str(many))
        page.wait_for_selector("#data-summary:has-text('Format: alpaca')", timeout=90_000)
        # No held-out rows: evaluating thousands of them would take longer than the whole rest of the test.
        page.get_by_role("button", name="Column mapping and options").click()
        share = page.get_by_label("Eval fraction").first  # the number box (a slider shares the label)
        share.fill("0")
        share.press("Tab")
        page.get_by_role("tab", name="Train").click()
        steps = page.get_by_label("Max steps")
        steps.fill("3")
        steps.press("Tab")
        # Every text the progress line shows, however briefly (a phase may last one poll).
        page.evaluate("""() => {
          window.__seen = [];
          const el = document.querySelector('#train-progress');
          const note = () => window.__seen.push(el.innerText);
          new MutationObserver(note).observe(el, {subtree: true, childList: true, characterData: true});
        }""")
        page.get_by_role("button", name="Start training").click()
        page.wait_for_selector("#train-progress [data-state=finished]", timeout=120_000)
        seen = page.evaluate("window.__seen")
        starting = [t for t in seen if "step 0/3" in t]
        phases = ("loading model", "reading and tokenizing the dataset")
        assert any(p in t for t in starting for p in phases), seen
        assert not any("0/?" in t for t in seen if "running" in t), seen  # Max steps is known from the start
        run = run_dirs(tmp_path / "runs")[-1]
        assert json.loads((run / "status.json").read_text())["state"] == "finished"

        # Item 9: the Runs tab shows the folder as typed from where the app started, not cut to ".../<run>".
        page.reload()  # the Runs tab picks the newest run on opening the page
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_selector(f"#run-details:has-text('{run.name}')", timeout=30_000)
        details = page.locator("#run-details").inner_text()
        folder = details.split("Folder: ", 1)[1].split(" · ", 1)[0].split("\n", 1)[0].strip()
        assert folder == f"runs/{run.name}" and (tmp_path / folder).is_dir(), details
        assert "..." not in folder and "…" not in folder
    finally:
        proc.terminate()
        proc.wait(30)


def test_after_a_resume_the_interrupted_note_goes(browser, tmp_path, tiny_model_dir):
    """Issue 24, newcomer 7, second half: after an app restart the note beside Resume said "interrupted … Resume
    continues from checkpoint-5", and still said so after the resumed run had finished."""
    import signal

    from gradio_client import Client, handle_file

    from tests.fault_helpers import fast_cfg, form, start_app, wait_for, write_rows

    data = write_rows(tmp_path / "rows.jsonl")
    proc, url = start_app(tmp_path, tiny_model_dir)
    try:
        # A run that the app's death interrupts after its first checkpoint (started through the API: quicker).
        vals = form(fast_cfg(tmp_path / "models" / "tiny", data, max_steps=120, save_steps=5, name="cut"),
                    data_path=handle_file(str(data)))
        Client(url, verbose=False).predict(*vals, api_name="/start_training")
        run = wait_for(lambda: next(iter(run_dirs(tmp_path / "runs")), None), 60, "the run folder")
        wait_for(lambda: (run / "checkpoints" / "checkpoint-5").is_dir(), 120, "the first checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc, url = start_app(tmp_path, tiny_model_dir)

        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        # The page's own start-up work first: a resume started while the page-load inspection still imported
        # transformers failed twice here with "cannot import name 'set_seed' from 'transformers'" (two threads in
        # its lazy import at once; not this test's subject).
        page.wait_for_selector("#data-summary:has-text('Format')", timeout=90_000)
        page.get_by_role("tab", name="Train").click()
        page.wait_for_function(f"document.querySelector('#resume-run input').value === '{run.name}'",
                               timeout=60_000)
        note = page.get_by_text("Resume continues from")
        note.wait_for(timeout=30_000)
        assert "interrupted" in note.inner_text()
        page.get_by_role("button", name="Resume", exact=True).click()
        page.wait_for_selector("#train-progress [data-state=finished]", timeout=180_000)
        time.sleep(1)  # past any last update of the page
        assert page.get_by_text("Resume continues from").count() == 0, page.locator("body").inner_text()[:2000]
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
    finally:
        proc.terminate()
        proc.wait(30)
