"""A script the page runs before any of Gradio's own, put into the served HTML by a small ASGI middleware.

Gradio's `head=` is no place for it: Gradio 6 adds that text to the page from its own script, after its modules
have loaded, and some of them keep `window.requestAnimationFrame` as it was when they loaded."""

from __future__ import annotations

import re

from ..webguard import edited_response

# Gradio 6.31's status tracker counts a pending event's elapsed time in a requestAnimationFrame loop that ends only
# when its status leaves "pending"; a tracker unmounted while pending (the page's own loading one) loops forever.
# An idle page drew 60 frames a second, 5-7% of a CPU core with no event running, taken from training when the
# browser shares the machine (bench/app_overhead.py). The tracker shows tenths of a second, so its loop runs at
# 10 Hz on a plain timer instead, which draws no frame unless its text really changed. Everything else keeps
# real animation frames. `__qsTrackerTicks` counts the calls it slowed, `__qsFrames` the others (a test checks that
# an idle page asks for few frames: were Gradio's chunk renamed, the loop would be back at 60 a second).
EARLY_SCRIPT = """<script>
(() => {
  const frame = window.requestAnimationFrame.bind(window);
  window.__qsTrackerTicks = 0;
  window.__qsFrames = 0;
  window.requestAnimationFrame = function (cb) {
    if ((new Error().stack || '').includes('/statustracker-')) {
      window.__qsTrackerTicks++;
      return setTimeout(() => cb(performance.now()), 100);
    }
    window.__qsFrames++;
    return frame(cb);
  };
})();
</script>"""

_HEAD = re.compile(rb"<head[^>]*>", re.I)


class EarlyScript:
    """ASGI middleware: the page (GET of `paths`, an HTML answer) gets `script` first thing in its <head>."""

    def __init__(self, app, script: str = EARLY_SCRIPT, paths: frozenset[str] = frozenset({""})):
        self.app = app
        self.script = script.encode()
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET" or \
                scope.get("path", "").rstrip("/") not in self.paths:
            await self.app(scope, receive, send)
            return
        await edited_response(self.app, scope, receive, send, self._with_script)

    def _with_script(self, body: bytes, headers: dict) -> bytes:
        if headers.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in headers:
            return _HEAD.sub(lambda m: m.group(0) + self.script, body, count=1)
        return body


def install_early_script(app) -> None:
    """Add EarlyScript to the app Gradio built (from the app's lifespan start, as install_same_origin_guard)."""
    app.middleware_stack = None
    app.add_middleware(EarlyScript)
