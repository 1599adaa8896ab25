"""`python -m qlora_ui plan`: the memory planner (qlora_ui/memory.py, plan.py) from the command line."""

from __future__ import annotations

import argparse
import json
import math

from .cli_flags import add_cli_flags, apply_cli_flags
from .config import RunConfig, validate_fields
from .errors import ConfigError
from .memory import GB, METHODS, PARTS, STRATEGIES
from .plan import Plan, plan_for_config
from .presets import load_preset, preset_target_gb
from .shapes import ShapeError, known_shapes

# The config fields the estimate depends on (memory.PlanSettings.from_config), one flag each.
PLAN_FIELDS = ("base_model", "batch_size", "max_length", "lora_r", "optimizer", "gradient_checkpointing",
               "quant_type", "double_quant", "method")
PLAN_ALIASES = {"--batch": "batch_size", "--seq": "max_length", "--rank": "lora_r"}


def add_plan_parser(subparsers) -> None:
    """Register `plan` on the main CLI's subparsers."""
    p = subparsers.add_parser("plan", help="Estimate training memory per method and say whether it fits.",
                              description="Estimate the memory of full 16-bit fine-tuning, 16-bit LoRA and QLoRA "
                              "(with and without double quantization) from a model config alone, and whether the "
                              "chosen method fits this machine (or --device-gb). Flags override the preset, the "
                              "preset overrides the defaults.")
    p.add_argument("--preset", help="start from this preset (a preset with target_gpu_gb N also sets --device-gb N)")
    # The settings the estimate reads, from the config's own fields (`--batch-size` etc.); the short spellings
    # of earlier versions (`--batch`, `--seq`, `--rank`) stay as aliases.
    add_cli_flags(p, PLAN_FIELDS, aliases=PLAN_ALIASES, switches=True,
                  helps={"base_model": f"shape name ({', '.join(known_shapes())}), a hub id of one of them, "
                                       "'bundled', or a local folder with config.json"})
    p.add_argument("--device-gb", type=float, help="plan for a device of this many GB instead of this machine")
    p.add_argument("--device", choices=["cuda", "cpu"], help="what the memory is: GPU VRAM or CPU RAM")
    p.add_argument("--precision", choices=["app", "paper"], default="app",
                   help="app: dtypes as this app trains (fp32 adapters and embeddings); paper: as the QLoRA "
                   "paper's code (bf16)")
    # Not the config's flag: a plan for N processes overrides the preset's without its 1..64 range.
    p.add_argument("--processes", type=int, help="training processes, one per GPU: figures become per device")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), help="with --processes N: ddp replicates the model on "
                   "every device, fsdp / deepspeed (ZeRO-3) shard it (default: the preset's accelerate_config, "
                   "else ddp)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="with fsdp / deepspeed: parameters, gradients and optimizer state in CPU RAM (GPU keeps "
                   "the gathered layers and activations)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=plan_main)


def plan_main(args) -> int:
    import sys

    try:
        cfg = load_preset(args.preset) if getattr(args, "preset", None) else RunConfig()
        cfg = apply_cli_flags(cfg, args)
        problems = validate_fields(cfg)
        if problems:
            raise ConfigError(problems)
        device_gb = args.device_gb
        if device_gb is None and getattr(args, "preset", None):
            device_gb = preset_target_gb(args.preset)
        if device_gb is not None and not (math.isfinite(device_gb) and device_gb > 0):
            raise ConfigError([f"--device-gb {device_gb}: give a positive number of GB"])
        procs = getattr(args, "processes", None)
        if procs is not None and procs < 1:
            raise ConfigError([f"--processes {procs}: give 1 or more"])
        plan = plan_for_config(cfg, device_gb, device=args.device, precision=args.precision, processes=procs,
                               strategy=getattr(args, "strategy", None), offload=getattr(args, "offload", None))
    except ShapeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: invalid plan settings:\n{e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_json(), indent=2, ensure_ascii=False))
    else:
        print(format_plan(plan))
    return 0


def format_plan(plan: Plan) -> str:
    """A plain-text table of the plan for the terminal."""
    s = plan.settings
    head = (f"{plan.shape.name}: {plan.shape.total_params / 1e9:.2f}B params | batch {s.batch} x {s.seq} tokens | "
            f"LoRA r{s.rank} ({s.targets}) | {s.optimizer} | gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'} | {s.precision} precision, {s.device}"
            + (f" | GB{plan.scope()}" if s.processes > 1 else ""))
    cols = [m for m in METHODS]
    lines = [head, "", f"{'GB':<16}" + "".join(f"{METHODS[m]:>28}" for m in cols)]
    for part in PARTS:
        lines.append(f"{part:<16}" + "".join(f"{plan.breakdown[m][part] / GB:>28.2f}" for m in cols))
    lines.append(f"{'total':<16}" + "".join(f"{plan.total_gb(m):>28.2f}" for m in cols))
    lines += ["", (f"{METHODS[plan.method]} needs {plan.total_gb():.2f} GB of {plan.device_gb:.1f} GB "
                   f"{plan.device_label}: {plan.verdict}")]
    if plan.advice:
        lines.append(f"To make it fit: {plan.advice}")
    lines += plan.notes
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m qlora_ui.memory plan ...` works before the main CLI wires it in
    import sys

    _parser = argparse.ArgumentParser(prog="python -m qlora_ui.memory")
    add_plan_parser(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args()
    sys.exit(_args.func(_args))
