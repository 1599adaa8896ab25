"""QLoRA Studio: fine-tune 4-bit base models with LoRA adapters, from the browser or the command line."""

import logging

# bitsandbytes warns at import, on every start, that an optional CPU kernel package ('kernels', fetched from a
# hub) is missing. Nothing a user can or needs to act on: keep it out of their terminal.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
