"""QLoRA Studio: `python app.py` (or `make run`) serves the app on http://127.0.0.1:7860.

Thin on purpose: parse flags, build the UI, launch. Everything else is in qlora_ui/.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import sys
from pathlib import Path

from qlora_ui.decode_weights import FLAG_HELP, MODES

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# An upload request's multipart framing (boundaries, part headers) on top of its file: well under a kilobyte.
UPLOAD_FRAMING_BYTES = 8 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="QLoRA Studio: fine-tune 4-bit models with LoRA in the browser.")
    p.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="Create a public Gradio link (requires --auth/--auth-file).")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="Require this login.")
    p.add_argument("--auth-file", default=None, help="File with one USER:PASS per line (chmod 600: it holds "
                   "passwords in plain text).")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="Key for the OpenAI-compatible API at /v1 (clients send 'Authorization: Bearer KEY'). "
                        "Needed for /v1 when the app is reachable beyond this machine (--share or a non-local "
                        "--host); without one the API is off there. On loopback with no key, /v1 is open.")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="File with one API key per line (chmod 600: it holds the keys in plain text).")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="Another host name this app is reached by (a reverse proxy's or a LAN DNS name; "
                        "repeatable). Requests naming any other host are refused, so a web page cannot reach the "
                        "app by re-pointing its own name at this machine (DNS rebinding). Loopback names, "
                        "numeric addresses, the --host name and the share link's host are always accepted.")
    p.add_argument("--login-failures-per-address", type=int, default=20, metavar="N",
                   help="Failed sign-ins one client address may make within 5 minutes, whatever user names it "
                        "tries; then every sign-in from it is refused for 30 s, doubling up to 10 minutes "
                        "(default 20; 0 turns this off). Behind a proxy on this machine (the share link, a reverse "
                        "proxy) the address it names in X-Forwarded-For counts; where it names none, every client "
                        "behind it shares one count, so one guesser can hold everyone's sign-in off: have the proxy "
                        "set X-Forwarded-For, or use 0 there and rely on the per-user lockout.")
    p.add_argument("--upload-max-age", type=float, default=24.0, metavar="HOURS",
                   help="Remove uploaded files (and files copied out for downloads) from Gradio's cache once they "
                        "are this many hours old (default 24; 0 keeps them all). A dataset a run still uses where "
                        "it lies is kept; smaller ones are copied into their run folder when the run starts. "
                        "Whatever this app uploaded is also removed when it stops.")
    p.add_argument("--runs-dir", default="runs", help="Folder holding the run folders (default ./runs).")
    p.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="Folder whose model subfolders the app may load (repeatable). Default ./models.")
    p.add_argument("--max-file-size", default="200mb", help="Browser upload cap, e.g. 200mb or 1gb.")
    p.add_argument("--max-data-size", default=None, metavar="SIZE",
                   help="Largest dataset file the app prepares, uploaded or from --data-root (default 20gb; also "
                        "QLORA_MAX_DATA_SIZE). Its prepared copy must also fit the free disk.")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="Folder whose dataset files the Model & Data tab lists, used where they lie: big files need "
                        "no upload (repeatable). Anyone who can use the app can pick, and download, any file in it.")
    p.add_argument("--preset", default="cpu-quickstart", help="Preset the form opens with.")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="Let requests turn on trust_remote_code / allow_pickle (a model's own Python, pickle "
                        "weights). Off by default: anyone who can use the app could run code on this machine.")
    p.add_argument("--allowed-models", action="append", default=None, metavar="PATTERN",
                   help="Hub ids a request may load (repeatable; shell-style patterns like 'meta-llama/*'). "
                        "Default: any. Local folders are governed by --model-root.")
    p.add_argument("--allowed-datasets", action="append", default=None, metavar="PATTERN",
                   help="Hub dataset ids a request may download (repeatable; shell-style patterns like "
                        "'timdettmers/*'). Default: any on loopback, none with --share or a non-local --host. Local "
                        "dataset folders are governed by --data-root; sizes by --max-data-size.")
    p.add_argument("--chat-max-new-tokens", type=int, default=None, metavar="N",
                   help="Longest chat reply in tokens, whatever the form asks (default: 256 with --share, a "
                        "non-local --host or a login (--auth, --auth-file), else the form's own limit).")
    p.add_argument("--chat-max-waiting", type=int, default=32, metavar="N",
                   help="Chat requests that may wait for the model at once; more are refused with a message "
                        "(default 32).")
    p.add_argument("--chat-max-batch", type=int, default=16, metavar="N",
                   help="Chat requests decoded together in one batch (default 16).")
    p.add_argument("--chat-dequantize", choices=list(MODES), default="auto", help=FLAG_HELP)
    return p.parse_args(argv)


def read_auth(args) -> list[tuple[str, str]] | None:
    from qlora_ui.webguard import MAX_USER_NAME, read_secret_file  # the throttle refuses longer names unread

    pairs = []
    if args.auth:
        pairs.append(args.auth)
    if args.auth_file:
        pairs += read_secret_file(args.auth_file, "--auth-file", "the passwords", "a login of their own")
    out = []
    for pair in pairs:
        user, sep, pw = pair.partition(":")
        if not sep or not user or not pw:
            raise ValueError("auth must be USER:PASS (one per line in --auth-file).")
        if len(user) > MAX_USER_NAME:
            raise ValueError(f"auth user names are at most {MAX_USER_NAME} characters.")
        out.append((user, pw))
    return out or None


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(args, auth) -> str | None:
    """Anyone who can reach the app can train and read its files: refuse exposure without a login."""
    if args.share and not auth:
        return ("--share publishes this app on a public gradio.live link. Add --auth USER:PASS (or --auth-file) so "
                "strangers cannot use it.")
    if not is_loopback(args.host) and not auth:
        return (f"--host {args.host} makes this app reachable from other machines. Add --auth USER:PASS "
                "(or --auth-file), or keep the default --host 127.0.0.1.")
    return None


def exposure_warnings(args) -> list[str]:
    out = []
    if args.allow_remote_code and (args.share or not is_loopback(args.host)):
        out.append("--allow-remote-code on a shared app: every signed-in user can make this machine run a model "
                   "repository's Python code. Use --allowed-models to limit which hub models can be named.")
    return out


def served_host_names(args) -> list[str]:
    """The host names requests may name besides loopback and numeric addresses (see webguard.host_allowed);
    the share link's host joins them once the tunnel is up."""
    import socket

    names = [args.host, *args.allowed_host]
    if not is_loopback(args.host):
        # Reached from the LAN by this machine's own name.
        names += [socket.gethostname(), socket.getfqdn()]
    return [n for n in names if n]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth = read_auth(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        from qlora_ui.api import read_api_keys

        api_keys = read_api_keys(args.api_key, args.api_key_file)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.login_failures_per_address < 0:
        print(f"error: --login-failures-per-address {args.login_failures_per_address} is negative; give a count "
              "of failed sign-ins (20 by default), or 0 to turn the per-address limit off.", file=sys.stderr)
        return 2
    if not math.isfinite(args.upload_max_age) or args.upload_max_age < 0:
        print(f"error: --upload-max-age {args.upload_max_age:g} is not an age; give hours (24 by default, 0.5 for "
              "half an hour), or 0 to keep uploads.", file=sys.stderr)
        return 2
    problem = check_exposure(args, auth)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from qlora_ui.studio import Studio
    from qlora_ui.ui.app import CSS, JS, build_app

    roots = args.model_root or ["models"]
    from qlora_ui.data import parse_size

    if args.max_data_size:
        try:
            parse_size(args.max_data_size)
        except ValueError:
            print(f"error: --max-data-size '{args.max_data_size}' is not a size; write it like 20gb or 500mb.",
                  file=sys.stderr)
            return 2
        # An environment variable, so the training processes a multi-process run launches see it too.
        os.environ["QLORA_MAX_DATA_SIZE"] = args.max_data_size
    try:
        # One upload request carries at most one file's worth (the per-file cap) plus its multipart framing.
        upload_request_cap = parse_size(args.max_file_size) + UPLOAD_FRAMING_BYTES
    except ValueError:
        print(f"error: --max-file-size '{args.max_file_size}' is not a size; write it like 200mb or 1gb.",
              file=sys.stderr)
        return 2
    shared = args.share or not is_loopback(args.host)
    studio = Studio(args.runs_dir, model_roots=roots, allow_remote_code=args.allow_remote_code,
                    allowed_models=args.allowed_models,
                    # A login means more than one person shares the model, loopback or not: cap each reply
                    # so one client's 1,024-token replies cannot hold the batch for everyone else.
                    chat_max_new_tokens=args.chat_max_new_tokens or (256 if shared or auth else None),
                    chat_max_waiting=args.chat_max_waiting, chat_max_batch=args.chat_max_batch,
                    data_roots=args.data_root,
                    # A stranger on a shared link must not fill this disk with any dataset of the Hub.
                    allowed_datasets=args.allowed_datasets if args.allowed_datasets is not None else
                    ([] if shared else None),
                    # Full paths on one person's local app; on a shared one, or behind a login (several people
                    # use it), a path outside the app folder shows only its last part.
                    shared=shared or bool(auth))
    studio.chat.dequantize = args.chat_dequantize  # read when the chat base loads (qlora_ui/decode_weights.py)
    if studio.data_roots:
        import gradio as gr

        # Files under --data-root are handed to the file box as they are: never copied into Gradio's cache
        # (a 20 GB copy per pick), and a request may name only those.
        gr.set_static_paths([str(r) for r in studio.data_roots])
    for warning in exposure_warnings(args):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    demo = build_app(studio, preset=args.preset)
    demo.queue(default_concurrency_limit=4)
    import contextlib
    from urllib.parse import urlsplit

    from qlora_ui.api import mount
    from qlora_ui.ui.page_script import install_early_script
    from qlora_ui.ui.progress_route import mount_progress
    from qlora_ui.webguard import AddressThrottle, LoginThrottle, ServedHosts, install_same_origin_guard

    hosts = ServedHosts(served_host_names(args))
    per_address = (AddressThrottle(args.login_failures_per_address)
                   if auth and args.login_failures_per_address > 0 else None)

    @contextlib.asynccontextmanager
    async def before_serving(app):
        # The server runs this before it accepts a connection. Done after launch() instead, /v1 and the host
        # check were missing for as long as Gradio tried the share tunnel (a minute on a machine that cannot
        # reach it), while the page already answered.
        # The OpenAI-compatible API on the same server (port, share link); its keys, not the login, open it.
        mount(app, studio, api_keys, exposed=shared)
        mount_progress(app, studio)  # the Train tab's light progress channel
        install_early_script(app)  # before the guard: the guard stays outermost
        install_same_origin_guard(app, hosts, login_throttle=per_address, max_upload_request=upload_request_cap)
        if args.upload_max_age > 0:
            from qlora_ui.ui.uploads import purging

            async with purging(demo, args.upload_max_age * 3600, studio.files_in_use):
                yield
        else:
            yield

    launch = dict(server_name=args.host, server_port=args.port, auth=LoginThrottle(auth) if auth else None,
                  max_file_size=args.max_file_size,
                  css=CSS, js=JS, show_error=True, auth_message="QLoRA Studio: sign in." if auth else None,
                  allowed_paths=[str(Path("presets/data").resolve())], prevent_thread_lock=True,
                  app_kwargs={"lifespan": before_serving},
                  # Each streaming chat holds a worker thread while it waits for its batch: room for all of them.
                  max_threads=max(40, 2 * (args.chat_max_waiting + args.chat_max_batch)))
    # Gradio catches a failed tunnel itself and keeps serving locally; we only make the outcome plain.
    demo.launch(share=args.share, **launch)
    if demo.share_url:
        hosts.extend([urlsplit(demo.share_url).hostname])
    print(f"QLoRA Studio on {demo.local_url}", flush=True)
    if shared and not api_keys:
        print("The OpenAI-compatible API (/v1) is off: this app is reachable beyond this machine; add --api-key "
              "or --api-key-file to open it.", file=sys.stderr, flush=True)
    else:
        print(f"OpenAI-compatible API on {demo.local_url.rstrip('/')}/v1", flush=True)
    if args.share:
        if demo.share_url:
            print(f"Public link (login required): {demo.share_url}", flush=True)
        else:
            print("Could not create the public share link: this machine cannot reach the Gradio tunnel service. "
                  f"The app keeps serving locally on {demo.local_url}.", file=sys.stderr, flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
