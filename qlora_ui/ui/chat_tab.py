"""Chat tab: streaming chat with a run's adapter (or the base), and base-vs-adapter side by side."""

from __future__ import annotations

from typing import Any

import gradio as gr

BASE_ONLY = "Base model only"
TRANSFORMERS = "transformers (4-bit + adapter)"
LLAMA_CPP = "llama.cpp (exported GGUF)"
NO_GGUF = "no GGUF yet: export the run in the Runs tab"


def build_chat_tab() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        c["run"] = gr.Dropdown(label="Run", choices=[BASE_ONLY], value=BASE_ONLY, scale=2,
                               info="A run with an adapter, or the bundled base model.", elem_id="chat-run")
        c["checkpoint"] = gr.Dropdown(label="Adapter", choices=[], scale=2,
                                      info="The final adapter or a checkpoint's.")
        c["refresh"] = gr.Button("↻ Refresh runs", scale=1)
    c["backend"] = gr.Radio([TRANSFORMERS, LLAMA_CPP], value=TRANSFORMERS, label="Backend", elem_id="chat-backend",
                            info="llama.cpp answers from the run's exported GGUF (Runs tab, Export): faster on a CPU.")
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            c["system"] = gr.Textbox(label="System prompt", placeholder="(the template's default)", scale=3)
            c["seed"] = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=2**31 - 1, scale=1)
        with gr.Row():
            c["temperature"] = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                                         info="0 = greedy (same answer every time)")
            c["top_p"] = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
            c["max_new_tokens"] = gr.Slider(8, 1024, value=96, step=8, label="Max new tokens",
                                          elem_id="max-new-tokens")
    c["chatbot"] = gr.Chatbot(label="Chat", height=380, elem_id="chatbot")
    with gr.Row():
        c["msg"] = gr.Textbox(label="Message", placeholder="Ask something…", scale=5, elem_id="chat-msg")
        c["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="send-btn")
        c["compare"] = gr.Button("Compare with base", scale=1, elem_id="compare-btn")
        c["clear"] = gr.Button("Clear", scale=1)
    with gr.Row(visible=True, elem_id="cmp-row"):
        c["cmp_base"] = gr.Textbox(label="Base model", lines=6, interactive=False, elem_id="cmp-base")
        c["cmp_adapter"] = gr.Textbox(label="With adapter", lines=6, interactive=False, elem_id="cmp-adapter")
    c["history"] = gr.State([])  # per session: the conversation as role/content messages
    c["picked"] = gr.State(False)  # per session: the user chose a run, so the newest run is no longer followed
    # A run finishing while the page is open becomes the chat's run (opening the tab also does).
    c["follow"] = gr.Timer(5.0)
    return c
