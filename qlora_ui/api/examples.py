"""What the Chat tab shows for calling /v1 from other apps: the address as the browser reached it, and a copyable
curl line and `openai` snippet. Plain strings: no FastAPI, no model.
"""

from __future__ import annotations

import json


def base_url(host: str | None, scheme: str = "http") -> str:
    """The /v1 address as the browser reached the app (its Host header: the share link's host behind it)."""
    return f"{scheme}://{host or '127.0.0.1:7860'}/v1"


def client_examples(url: str, model: str, api_access: str = "open") -> dict[str, str]:
    """A curl line and an `openai` snippet for `model` at `url`, copyable as they are."""
    key = "$QLORA_API_KEY" if api_access != "open" else "none"
    auth = " -H \"Authorization: Bearer $QLORA_API_KEY\"" if api_access != "open" else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 64})
    curl = f"curl -s {url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
    key_py = 'os.environ["QLORA_API_KEY"]' if api_access != "open" else '"none"'
    python = "\n".join([
        *(["import os", ""] if api_access != "open" else []),
        "from openai import OpenAI",
        "",
        f"client = OpenAI(base_url={json.dumps(url)}, api_key={key_py})",
        f"reply = client.chat.completions.create(model={json.dumps(model)}, max_tokens=64,",
        '                                       messages=[{"role": "user", "content": "Hi!"}])',
        "print(reply.choices[0].message.content)",
    ])
    return {"curl": curl, "python": python, "key": key}
