"""Purging stale files from Gradio's upload cache (`--upload-max-age`).

Gradio keeps every upload (and every file it copies out for a download) until the process ends, and then too:
a shared app running for weeks filled its disk. Gradio's own `Blocks(delete_cache=...)` is not used because it
cannot spare a file a run still needs, and it deletes every file at shutdown, so an interrupted run trained on a
big upload could not resume after a restart. Here the files in use are kept (`Studio.files_in_use`): a run's
dataset used where it lies (too big to copy into the run folder) and the running job's own file. Small datasets
are copied into their run folder when the run starts, so purging their upload breaks nothing.
Only files this app put in Gradio's cache are touched (the cache folder may be shared with other Gradio apps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

log = logging.getLogger(__name__)


def purge_every(max_age_s: float) -> float:
    """How often to look: a quarter of the age (a file lives at most 1.25x its age), between 1 s and 10 minutes."""
    return min(600.0, max(1.0, max_age_s / 4))


def purge_uploads(blocks: gr.Blocks, max_age_s: float, keep: set[str], now: float | None = None) -> list[str]:
    """Remove this app's cached files older than `max_age_s` (by their last write or metadata change, so a file
    Gradio hands out again, which it touches, counts as new) unless their resolved path is in `keep`. Returns the
    paths removed."""
    now = time.time() if now is None else now
    # Files baked into the page's config (a component's initial value, like the preset's example dataset): Gradio
    # marks them to keep, since every page load names them.
    keep = keep | {str(Path(f).resolve()) for b in blocks.blocks.values() for f in getattr(b, "keep_in_cache", ())}
    removed = []
    for files in blocks.temp_file_sets:
        for f in list(files):
            try:
                st = os.lstat(f)
            except FileNotFoundError:
                files.discard(f)
                continue
            if now - max(st.st_mtime, st.st_ctime) <= max_age_s or str(Path(f).resolve()) in keep:
                continue
            try:
                os.remove(f)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not remove the stale upload %s: %s", f, e)
                continue
            files.discard(f)
            removed.append(f)
            with contextlib.suppress(OSError):
                os.rmdir(Path(f).parent)  # Gradio's per-file hash folder, once empty
    if removed:
        log.info("removed %d upload(s) older than %.0f s from Gradio's cache", len(removed), max_age_s)
    return removed


@contextlib.asynccontextmanager
async def purging(blocks: gr.Blocks, max_age_s: float, in_use: Callable[[], set[str]]):
    """While the server runs: purge every `purge_every(max_age_s)` seconds; at shutdown, every file of this app
    not in use (the next start could not find them again: nothing records them)."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(purge_every(max_age_s))
            try:
                await asyncio.to_thread(lambda: purge_uploads(blocks, max_age_s, in_use()))
            except Exception:  # a failed pass must not end the loop for the app's lifetime
                log.exception("purging stale uploads failed")

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            purge_uploads(blocks, -1.0, in_use())
