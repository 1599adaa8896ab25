"""The Train tab's light progress channel: `GET qs/train-progress` answers the progress line, the log, the run's key
and the points newer rows add to the chart (`?run=&since=`, tabs/train.progress_json) as JSON, read by the page's
script (JS in ui/app.py) every few seconds instead of a Gradio event per tick.

It answers only what the page itself shows, behind the same login (Gradio's session cookie) and, as every route,
behind the same-origin guard (webguard.py)."""

from __future__ import annotations

import inspect

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..studio import Studio
from .tabs.train import progress_json


async def signed_in(gradio_app, request: Request) -> bool:
    """Gradio's own test (its `login_check` route): no login configured, the user an `auth_dependency` names (Gradio
    awaits one that is async), or the session cookie of a signed-in user."""
    if gradio_app.auth is None and gradio_app.auth_dependency is None:
        return True
    if gradio_app.auth_dependency is not None:
        user = gradio_app.auth_dependency(request)
        if inspect.isawaitable(user):
            user = await user
        return user is not None
    cid = gradio_app.cookie_id
    token = request.cookies.get(f"access-token-{cid}") or request.cookies.get(f"access-token-unsecure-{cid}")
    return gradio_app.tokens.get(token) is not None


def mount_progress(gradio_app, studio: Studio) -> None:
    """Put the route under /qs of the app Gradio built (from the app's lifespan start, as the /v1 API)."""
    sub = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @sub.get("/train-progress")
    async def train_progress(request: Request, run: str | None = None, since: int | None = None):
        if not await signed_in(gradio_app, request):
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        # Never cached: the page asks again in a few seconds and must see the newest line. The run folder is read
        # off the event loop (a long run's metrics file).
        body = await run_in_threadpool(progress_json, studio, run, since)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    gradio_app.mount("/qs", sub)
