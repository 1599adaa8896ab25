"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions` over the batch server.

Mounted on the app's own server (same port, same share link: app.py, `mount`) or served alone (`python -m qlora_ui
serve`, `serve`). The package imports FastAPI, never gradio. Split by concern:

- requests.py: the limits, OpenAI's error shape (`ApiError`), the checks on a request's body, the stop-string `Cutter`;
- keys.py: the API keys (`read_api_keys`), their check on every request (`KeyCheck`), and `access`;
- models.py: the model ids (`Models`, `Target`): bases, runs with a saved adapter, exported GGUFs;
- routes.py: the app itself (`Api`, `build_api`, `mount`, `serve`): rows on the batch server, whole or streamed replies;
- examples.py: the Chat tab's address and copyable client snippets (`base_url`, `client_examples`).

The names other modules and the tests import are re-exported here, so `from qlora_ui.api import X` keeps working.
"""

from __future__ import annotations

from .examples import base_url, client_examples
from .keys import KeyCheck, access, read_api_keys
from .models import Models, Target, latest_adapter
from .requests import MAX_BODY_BYTES, ApiError, Cutter, busy
from .routes import Api, build_api, mount, serve

__all__ = ("MAX_BODY_BYTES", "Api", "ApiError", "Cutter", "KeyCheck", "Models", "Target", "access", "base_url",
           "build_api", "busy", "client_examples", "latest_adapter", "mount", "read_api_keys", "serve")
