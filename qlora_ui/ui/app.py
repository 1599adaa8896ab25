"""Builds the Gradio app: one builder per tab, wired to the handlers with the shared form."""

from __future__ import annotations

from functools import partial

import gradio as gr

from ..studio import Studio
from . import handlers as h
from .chat_tab import build_chat_tab
from .export_panel import build_export_panel, wire_export_panel
from .model_data_tab import DATA_KEYS, MODEL_KEYS, QUANT_KEYS, build_model_data_tab
from .runs_tab import build_runs_tab
from .train_tab import ADVANCED_TRAIN_KEYS, LORA_KEYS, MAIN_TRAIN_KEYS, build_train_tab, global_batch_text

CSS = """
.qs-trained { background: #bbf7d0; color: #14532d; border-radius: 3px; }
.qs-masked { background: #e5e7eb; color: #4b5563; border-radius: 3px; }
.qs-example { white-space: pre-wrap; font-size: 13px; line-height: 1.5; padding: 8px; max-height: 300px;
              overflow: auto; }
.qs-legend span { padding: 2px 6px; margin-right: 8px; font-size: 12px; }
.qs-progress { padding: 8px 4px; }
.qs-bar { height: 12px; background: #e5e7eb; border-radius: 6px; overflow: hidden; margin-top: 6px; }
.qs-bar > div { height: 100%; transition: width .5s; }
.qs-pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; max-width: 100%; }
.qs-badge { display: inline-block; padding: 1px 8px; border-radius: 4px; font-weight: 600; font-size: 12px;
            color: #fff; letter-spacing: .03em; }
.qs-ok { background: #16a34a; } .qs-warn { background: #b45309; } .qs-bad { background: #dc2626; }
#runs-table th, #runs-table th * { word-break: normal !important; overflow-wrap: normal !important; }
/* Phones: nothing may be wider than the screen; plot toolbars hide (they covered axis labels). */
@media (max-width: 640px) {
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
  .qs-pre, .qs-example { font-size: 12px; }
  .modebar-container { display: none !important; }
  #train-actions > * { min-width: 45% !important; }
  .qs-progress-head { font-size: 13px; }
}
.qs-msg { white-space: pre-wrap; margin-top: 6px; font-size: 13px; }
"""

FORM_KEYS = (["name"] + MODEL_KEYS + QUANT_KEYS + DATA_KEYS + LORA_KEYS + MAIN_TRAIN_KEYS + ADVANCED_TRAIN_KEYS)


def build_app(studio: Studio, preset: str | None = "cpu-quickstart") -> gr.Blocks:
    from ..config import RunConfig, list_presets, load_preset

    # The form opens on a preset (the quick start by default), so Start works with no typing at all.
    preset = preset if preset in list_presets(studio.presets_dir) else None
    initial = load_preset(preset, studio.presets_dir) if preset else RunConfig()
    with gr.Blocks(title="QLoRA Studio") as demo:
        gr.Markdown("# QLoRA Studio\nFine-tune a 4-bit base model with LoRA adapters — on this machine.")
        with gr.Tabs() as tabs:
            with gr.Tab("Model & Data", id="model-data"):
                md = build_model_data_tab(studio, initial)
            with gr.Tab("Train", id="train"):
                tr = build_train_tab(studio, initial, preset)
            with gr.Tab("Chat", id="chat") as chat_tab:
                ch = build_chat_tab()
            with gr.Tab("Runs", id="runs"):
                rn = build_runs_tab()
                ex = build_export_panel()

        form = {**{k: md[k] for k in MODEL_KEYS + QUANT_KEYS + DATA_KEYS},
                **{k: tr[k] for k in ["name"] + LORA_KEYS + MAIN_TRAIN_KEYS + ADVANCED_TRAIN_KEYS}}
        keys = FORM_KEYS
        inputs = [form[k] for k in keys]

        # Model & Data: re-inspect the dataset whenever something that changes the preview changes.
        inspect_out = [md["data_summary"], md["data_preview"], md["data_hist"], md["data_example"], md["quant_info"]]
        # One listener for every trigger, run one at a time with the latest values: a slow inspection
        # started by an earlier change can never overwrite the result of a later upload.
        triggers = [form["data_path"].upload, form["data_path"].clear, form["column_map"].blur,
                    form["column_map"].submit] + [
            form[k].change for k in ["data_format", "max_length", "train_on_source", "system_prompt", "base_model",
                                     "max_rows", *QUANT_KEYS]]
        gr.on(triggers, partial(h.inspect_data_live, studio, keys), inputs, inspect_out, show_progress="minimal",
              concurrency_limit=1, concurrency_id="inspect", trigger_mode="always_last", api_name="inspect_data")
        # The upload button and the --data-root list fill the file box; its change re-inspects, like an upload.
        md["data_upload"].upload(lambda f: f, md["data_upload"], form["data_path"], api_name=False).then(
            partial(h.inspect_data_live, studio, keys), inputs, inspect_out, show_progress="minimal",
            concurrency_limit=1, concurrency_id="inspect", trigger_mode="always_last", api_name=False).then(
            h.name_from_upload, form["data_path"], form["name"], api_name=False)
        md["data_server"].change(partial(h.use_server_file, studio), md["data_server"], form["data_path"],
                                 api_name=False).then(
            partial(h.inspect_data_live, studio, keys), inputs, inspect_out, show_progress="minimal",
            concurrency_limit=1, concurrency_id="inspect", trigger_mode="always_last", api_name=False).then(
            h.name_from_upload, form["data_path"], form["name"], api_name=False)

        # Memory plan, refreshed when any setting that changes memory changes.
        from .memory_panel import update_memory_panel

        mem = tr["memory"]
        mem_out = [mem[k] for k in mem]

        def refresh_memory(preset, *values):
            try:
                cfg = h.cfg_from_values(list(keys), list(values))
                studio.check_model(cfg.model)  # the planner reads config.json: only from allowed places
            except h.ConfigError:
                return [gr.skip()] * len(mem_out)
            return update_memory_panel(cfg, preset)

        # One serialized listener (like the data inspection): the newest settings always win.
        mem_triggers = [tr["preset"].change] + [form[k].change for k in [
            "base_model", "lora_r", "batch_size", "processes", "max_length", "optimizer", "gradient_checkpointing",
            "quant_type", "double_quant", "load_in_4bit", "compute_dtype", "accelerate_config", "quant_storage"]]
        gr.on(mem_triggers, refresh_memory, [tr["preset"]] + inputs, mem_out, show_progress="hidden",
              concurrency_limit=1, trigger_mode="always_last", api_name=False)

        # Presets
        preset_targets = [form[k] for k in keys]
        tr["preset"].change(partial(h.apply_preset, studio, keys), tr["preset"], preset_targets, api_name="load_preset")
        tr["save_preset"].click(partial(h.save_as_preset, studio, keys), [tr["preset_name"]] + inputs, tr["preset"],
                                api_name="save_preset")

        # Training
        # Stable API names: scripts drive the app with gradio_client (see README).
        tr["start"].click(partial(h.start_training, studio, keys), inputs, tr["progress"], api_name="start_training")
        tr["stop"].click(partial(h.stop_training, studio), None, None, api_name="stop_training")
        tr["resume_run"].change(partial(h.resume_info, studio), tr["resume_run"], tr["resume_info"], api_name=False)
        tr["resume_run"].change(partial(h.retry_button, studio), tr["resume_run"], tr["retry_smaller"],
                                api_name=False)
        tr["retry_smaller"].click(partial(h.retry_smaller, studio), tr["resume_run"], tr["progress"],
                                  api_name="retry_smaller")
        batch_keys = ["batch_size", "grad_accum", "processes"]
        gr.on([form[k].change for k in batch_keys], global_batch_text, [form[k] for k in batch_keys],
              tr["global_batch"], show_progress="hidden", api_name=False)
        tr["resume"].click(partial(h.resume_training, studio), tr["resume_run"], tr["progress"],
                           api_name="resume_training")
        tr["timer"].tick(partial(h.poll_training, studio), tr["seen"],
                         [tr["progress"], tr["plot"], tr["log"], tr["seen"], tr["stop"]], show_progress="hidden",
                         api_name=False)
        form["data_path"].upload(h.name_from_upload, form["data_path"], form["name"], api_name=False)

        # Chat
        chat_settings = [ch["run"], ch["checkpoint"], ch["system"], ch["temperature"], ch["top_p"],
                         ch["max_new_tokens"], ch["seed"]]
        ch["refresh"].click(partial(h.chat_runs, studio), None, ch["run"], api_name=False)
        ch["run"].change(partial(h.adapter_options, studio), [ch["run"], ch["backend"]], ch["checkpoint"],
                         api_name=False)
        ch["backend"].change(partial(h.adapter_options, studio), [ch["run"], ch["backend"]], ch["checkpoint"],
                             api_name=False)
        # Chat follows the newest run with an adapter until the user picks a run themselves.
        ch["run"].input(lambda: True, None, ch["picked"], api_name=False)
        follow = dict(fn=partial(h.follow_run, studio), inputs=[ch["run"], ch["picked"]], outputs=ch["run"],
                      show_progress="hidden", api_name=False)
        chat_tab.select(**follow)
        ch["follow"].tick(**follow)
        # The backend needs no input of its own (the API keeps its inputs): the Adapter list then holds GGUF files.
        # Chat requests run concurrently up to what the batch server takes (it queues and batches them); the
        # browser session is passed on, so one session has one request at a time.
        # (Named parameters: Gradio passes the gr.Request only to a positional parameter annotated with it.)
        def send(run, adapter, system, temperature, top_p, max_new_tokens, seed, msg, history,
                 request: gr.Request):
            yield from h.send_message(studio, run, adapter, system, temperature, top_p, max_new_tokens, seed, msg,
                                      history, session=getattr(request, "session_hash", None))

        def compare(run, adapter, system, temperature, top_p, max_new_tokens, seed, msg, request: gr.Request):
            yield from h.compare_with_base(studio, run, adapter, system, temperature, top_p, max_new_tokens, seed,
                                           msg, session=getattr(request, "session_hash", None))

        chat_limit = dict(concurrency_limit=studio.chat.server.max_waiting + studio.chat.server.max_batch,
                          concurrency_id="chat")
        send_args = dict(fn=send, inputs=chat_settings + [ch["msg"], ch["history"]],
                         outputs=[ch["chatbot"], ch["msg"], ch["history"]], **chat_limit)
        ch["send"].click(**send_args, api_name="chat")
        ch["msg"].submit(**send_args, api_name=False)
        # The answers sit below the chat: bring them into view, or the button seems to do nothing.
        ch["compare"].click(compare, chat_settings + [ch["msg"]], [ch["cmp_base"], ch["cmp_adapter"]],
                            api_name="compare_with_base", **chat_limit,
                            js="(...args) => { document.querySelector('#cmp-row')?.scrollIntoView("
                               "{behavior: 'smooth', block: 'center'}); return args; }")
        ch["clear"].click(lambda: ([], [], "", ""), None, [ch["chatbot"], ch["history"], ch["cmp_base"],
                                                          ch["cmp_adapter"]], api_name=False)

        # Runs
        table_out = [rn["table"], rn["selected"], rn["run"], tr["resume_run"]]
        rn["refresh"].click(partial(h.runs_table, studio), None, table_out, api_name="list_runs")
        rn["selected"].change(partial(h.overlay, studio), rn["selected"], rn["overlay"], api_name=False)
        rn["run"].change(partial(h.run_details, studio), rn["run"], [rn["details"], rn["command"], rn["download"]],
                         api_name="run_details")
        rn["resume"].click(partial(h.resume_training, studio), rn["run"], tr["progress"], api_name=False)
        rn["download"].click(partial(h.download_hint, studio), rn["run"], None, api_name=False)
        wire_export_panel(studio, ex, rn["run"])
        rn["delete"].click(partial(h.delete_run, studio), rn["run"], None, api_name="delete_run").then(
            partial(h.runs_table, studio), None, table_out, api_name=False)

        # On page load (and reload): fill the lists and the memory plan, reattach to a running job.
        demo.load(partial(h.runs_table, studio, preselect=True), None, table_out, api_name=False)
        demo.load(partial(h.restore_page, studio, keys), None, [tabs] + inputs + [tr["progress"]], api_name=False)
        demo.load(partial(h.chat_runs, studio), None, ch["run"], api_name=False)
        demo.load(refresh_memory, [tr["preset"]] + inputs, mem_out, api_name=False)
        demo.load(partial(h.inspect_data, studio, keys), inputs, inspect_out, api_name=False)
    return demo
