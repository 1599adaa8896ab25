"""`python -m qlora_ui <command>`: train, runs, chat, export, serve, check-data, plan.

User errors (errors.UserError: bad settings, bad files, missing models, runs that cannot resume) print one readable
paragraph and exit with code 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import RunConfig, add_cli_flags, apply_cli_flags, list_presets, load_preset
from .decode_weights import FLAG_HELP, MODES
from .errors import UserError

USER_ERROR = 2


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return USER_ERROR


# ---- train ----

def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="Fine-tune with QLoRA (a preset plus any field as a flag).",
                       description="Train a LoRA adapter on a 4-bit base. Every config field is a flag, applied "
                                   "over the preset.")
    p.add_argument("--preset", default=None, help=f"Preset to start from: {', '.join(list_presets())}.")
    p.add_argument("--config", default=None, help="A config YAML (e.g. a run's config.yaml) to start from.")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="Continue a run from its last checkpoint (metrics continue at that step).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    add_cli_flags(p)
    p.set_defaults(func=train_main)


def build_config(args) -> RunConfig:
    from .config import load_yaml

    cfg = RunConfig()
    if args.preset:
        cfg = load_preset(args.preset)
    if args.config:
        cfg = load_yaml(args.config, base=cfg)
    return apply_cli_flags(cfg, args).validate(need_data=True)


def train_main(args) -> int:
    from .jobs import RESUME_OVERRIDES, create_job, resume_job
    from .launch import batch_sentence
    from .runs import open_run

    if args.resume:
        run = open_run(args.resume)
        if run.state == "running":
            return fail(f"run {run.name} is still running in another process (pid "
                        f"{run.read_status().get('pid')}). Stop it first.")
        # `--resume RUN --max-steps N` continues a run (a finished one too) to N steps in all; --processes,
        # --batch-size, --grad-accum resume it with another number of processes or a smaller batch.
        extend = getattr(args, "cfg__max_steps", None)
        overrides = {k: getattr(args, f"cfg__{k}", None) for k in RESUME_OVERRIDES}
        job = resume_job(run, extend_to=int(float(extend)) if extend is not None else None, overrides=overrides)
    else:
        job = create_job(build_config(args))
    print(f"run folder: {job.run.path}", file=sys.stderr)
    if job.cfg.training.processes > 1:
        print(f"{job.cfg.training.processes} processes through accelerate, {batch_sentence(job.cfg.training)}",
              file=sys.stderr)
    bar = None if args.quiet else _ProgressBar()
    if bar:
        job.listener = bar
    try:
        state = job.run_blocking()
    except KeyboardInterrupt:
        # Ctrl-C: the run is marked failed by the job; the last checkpoint stays resumable.
        return fail(f"interrupted; resume with: python -m qlora_ui train --resume {job.run.path}")
    finally:
        if bar:
            bar.close()
    if state == "failed":
        # The job has logged its message and hint to stderr once; the traceback went to train.log only.
        return USER_ERROR if isinstance(job.error, UserError) else 1
    print(f"{state}: adapter in {job.run.adapter_dir}", file=sys.stderr)
    return 0


class _ProgressBar:
    """tqdm bar with loss and ETA, fed by the job's metrics events."""

    def __init__(self):
        self.bar = None

    def __call__(self, event: str, row: dict) -> None:
        from tqdm.auto import tqdm

        if event == "status":
            if self.bar is None:
                print(f"[{row.get('message')}]", file=sys.stderr)
            return
        if event != "metrics":
            return
        if self.bar is None:
            self.bar = tqdm(total=row.get("max_steps"), desc="train", unit="step", dynamic_ncols=True)
        self.bar.n = row["step"]
        post = {}
        if row.get("loss") is not None:
            post["loss"] = f"{row['loss']:.4f}"
        if row.get("eval_loss") is not None:
            post["eval_loss"] = f"{row['eval_loss']:.4f}"
            self.bar.write(f"step {row['step']}: eval_loss {row['eval_loss']:.4f}")
        if row.get("tokens_per_s"):
            post["tok/s"] = f"{row['tokens_per_s']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- runs ----

def add_runs_parser(sub) -> None:
    p = sub.add_parser("runs", help="List run folders.")
    p.add_argument("--runs-dir", default="runs")
    p.set_defaults(func=runs_main)


def runs_main(args) -> int:
    from .runs import list_runs

    runs = list_runs(args.runs_dir)
    if not runs:
        print(f"no runs in {args.runs_dir}")
        return 0
    print(f"{'run':40} {'status':11} {'step':>9} {'loss':>8} {'eval':>8}  model")
    for r in runs:
        s = r.summary()
        step = f"{s['step']}/{s['max_steps'] or '?'}"
        loss = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-"
        ev = f"{s['eval_loss']:.4f}" if s["eval_loss"] is not None else "-"
        print(f"{s['name']:40} {s['status']:11} {step:>9} {loss:>8} {ev:>8}  {s['model']}")
    return 0


# ---- chat ----

def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="One-shot generation with a run's adapter (or the base).")
    p.add_argument("--run", default=None, help="Run folder whose adapter to use.")
    p.add_argument("--adapter", default=None, help="An adapter folder (default: the run's adapter/).")
    p.add_argument("--model", default=None, help="Base model when no run is given (default: bundled).")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default="")
    p.add_argument("--base-only", action="store_true", help="Switch the adapter off: the base model's answer.")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=chat_main)


def chat_main(args) -> int:
    from .chat import ChatEngine, GenerationSettings
    from .runs import open_run

    if args.run:
        run = open_run(args.run)
        cfg = run.config()
        adapter = Path(args.adapter) if args.adapter else run.adapter_dir
        if not args.base_only and not (adapter / "adapter_config.json").is_file():
            return fail(f"{adapter} holds no adapter yet (the run saves one when it stops or finishes). "
                        "Use --adapter CHECKPOINT_DIR or --base-only.")
    else:
        cfg = RunConfig()
        if args.model:
            cfg = cfg.updated(base_model=args.model)
        adapter = Path(args.adapter) if args.adapter else None
    engine = ChatEngine()
    name = engine.load(cfg, None if args.base_only else adapter)
    settings = GenerationSettings(system_prompt=args.system, temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(engine.reply([{"role": "user", "content": args.prompt}], settings, name))
    return 0


# ---- export ----

def add_export_parser(sub) -> None:
    from .export import DEFAULT_MERGE_INTO, FORMATS, GGUF_QUANTS, MERGE_INTO

    p = sub.add_parser("export", help="A run's adapter as a merged 16-bit model or a GGUF for llama.cpp / Ollama.",
                       description="Merge the run's adapter into 16-bit weights (--format merged), or convert that "
                                   "with llama.cpp's converter (--format gguf) and write an Ollama Modelfile beside "
                                   "it. Prints the path of what it wrote last.")
    p.add_argument("--run", required=True, help="Run folder.")
    p.add_argument("--format", choices=FORMATS, default="merged")
    p.add_argument("--quant", choices=GGUF_QUANTS, default="q8_0", help="GGUF type (with --format gguf).")
    p.add_argument("--out", default=None, help="Output folder (default: RUN/export/).")
    p.add_argument("--merge-into", choices=MERGE_INTO, default=DEFAULT_MERGE_INTO,
                   help="16-bit weights the adapter is merged into: the dequantized NF4 weights it was trained "
                        "against, or the original base (see docs/export.md).")
    p.set_defaults(func=export_main)


def export_main(args) -> int:
    from .export import export_run
    from .runs import open_run

    run = open_run(args.run)
    result = export_run(run, args.format, args.quant, args.out, args.merge_into,
                        progress=lambda f, m: print(f"[{100 * f:3.0f}%] {m}", file=sys.stderr))
    print(f"exported in {result.seconds:.1f} s", file=sys.stderr)
    print(result.path)
    return 0


# ---- serve ----

def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="The OpenAI-compatible API (/v1) alone, without the browser page.",
                       description="Serve runs' adapters and their base models through the OpenAI-compatible API "
                                   "(GET /v1/models, POST /v1/chat/completions, POST /v1/completions), from one "
                                   "loaded 4-bit base through the app's batch server. See docs/api.md.")
    p.add_argument("--run", action="append", default=None, metavar="RUN",
                   help="A run (folder name in --runs-dir, or its path) to serve; repeatable. Default: every run "
                        "with an adapter.")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, metavar="KEY", help="Key clients send as 'Authorization: Bearer "
                   "KEY'. Required with a non-local --host.")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="One key per line (chmod 600).")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="Another host name clients reach this server by (a reverse proxy's; repeatable).")
    p.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="Folder whose model subfolders runs may use as their base (repeatable). Default: any.")
    p.add_argument("--chat-max-new-tokens", type=int, default=None, metavar="N",
                   help="Longest reply in tokens (default 256 with a non-local --host, else 1024).")
    p.add_argument("--chat-max-waiting", type=int, default=32, metavar="N")
    p.add_argument("--chat-max-batch", type=int, default=16, metavar="N")
    p.add_argument("--chat-dequantize", choices=list(MODES), default="auto", help=FLAG_HELP)
    p.set_defaults(func=serve_main)


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_main(args) -> int:
    import socket

    from .api import Models, read_api_keys, serve
    from .studio import Studio

    try:
        keys = read_api_keys(args.api_key, args.api_key_file)
    except (ValueError, OSError) as e:
        return fail(str(e))
    exposed = not _loopback(args.host)
    if exposed and not keys:
        return fail(f"--host {args.host} makes the API reachable from other machines. Add --api-key KEY (or "
                    "--api-key-file), or keep the default --host 127.0.0.1.")
    studio = Studio(args.runs_dir, model_roots=args.model_root or None,
                    chat_max_new_tokens=args.chat_max_new_tokens or (256 if exposed else None),
                    chat_max_waiting=args.chat_max_waiting, chat_max_batch=args.chat_max_batch)
    studio.chat.dequantize = args.chat_dequantize  # read when the base loads, as in the app
    runs = [studio.open(r).name for r in args.run] if args.run else None
    targets = Models(studio, runs).all()
    adapters = [t for t in targets if t.adapter is not None]
    if runs and len(adapters) < len(runs):
        missing = sorted(set(runs) - {t.id for t in adapters})
        return fail(f"{', '.join(missing)}: no saved adapter yet (a run saves one at each checkpoint and when it "
                    "stops or finishes).")
    first = adapters[0] if adapters else targets[0]
    print(f"loading {first.id} ...", file=sys.stderr, flush=True)
    studio.check_model(first.cfg.model)
    studio.chat.load(first.cfg, first.adapter)  # the first request should not wait for the base to load
    print(f"chat base decodes from {studio.chat.decoding_from}", file=sys.stderr, flush=True)
    names = [args.host, *args.allowed_host] + ([socket.gethostname(), socket.getfqdn()] if exposed else [])
    print(f"OpenAI-compatible API on http://{args.host}:{args.port}/v1 serving: "
          f"{', '.join(t.id for t in targets)}", file=sys.stderr, flush=True)
    serve(studio, args.host, args.port, keys, exposed, names, runs)
    return 0


# ---- main ----

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qlora_ui", description="QLoRA Studio: 4-bit LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_runs_parser(sub)
    add_chat_parser(sub)
    add_export_parser(sub)
    add_serve_parser(sub)
    try:
        from .data import add_check_data_parser

        add_check_data_parser(sub)
    except ImportError:
        pass
    try:
        from .plan_cli import add_plan_parser

        add_plan_parser(sub)
    except ImportError:
        pass
    from .evaluate.cli import add_arena_parser  # arena elo / arena judge (issue 26)

    add_arena_parser(sub)
    from .evaluate.bench_cli import add_eval_parser  # eval: benchmarks through lm-eval (issue 26)

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # Library deprecation chatter hides the progress bar; real problems are logged by the engine.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # The engine logs INFO into each run's train.log; the terminal shows warnings and the progress bar.
    for h in logging.getLogger().handlers:
        h.setLevel(logging.WARNING)
    logging.getLogger("qlora_ui").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        return fail(str(e))
