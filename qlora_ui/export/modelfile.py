"""The Ollama Modelfile beside a GGUF: its TEMPLATE read from the model's own chat template, stop tokens, a system
prompt; and the commands that run an export elsewhere."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError

_S, _U, _A, _U2 = "\x02SYS\x03", "\x02USR\x03", "\x02AST\x03", "\x02USR2\x03"


@dataclass
class TurnFormat:
    """The chat template as per-role prefix/suffix strings: what a Go template for Ollama can express."""
    prefix: dict[str, str]
    suffix: str
    generation: str
    default_system: str
    bos: str

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(self.prefix[m["role"]] + m["content"] + self.suffix for m in messages)
        return text + (self.generation if add_generation_prompt else "")


def turn_format(tokenizer) -> TurnFormat:
    """Read the template's pieces by rendering marked messages through the model's own chat template."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render([{"role": "system", "content": _S}, {"role": "user", "content": _U},
                   {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}])
    sys_prefix, rest = full.split(_S, 1)
    between_su, rest = rest.split(_U, 1)
    between_ua, rest = rest.split(_A, 1)
    between_au, _ = rest.split(_U2, 1)
    last = render([{"role": "system", "content": _S}, {"role": "user", "content": _U},
                   {"role": "assistant", "content": _A}]).split(_A, 1)[1]
    # What follows every turn's content, whatever comes next, is the turn end (<|im_end|>\n, <|eot_id|>).
    suffix = os.path.commonprefix([between_su, between_ua, between_au, last])
    bos = tokenizer.bos_token or ""
    if bos and sys_prefix.startswith(bos) and not between_su[len(suffix):].startswith(bos):
        sys_prefix = sys_prefix[len(bos):]  # a BOS only at the very start: llama.cpp adds it itself
    prefix = {"system": sys_prefix, "user": between_su[len(suffix):], "assistant": between_ua[len(suffix):]}
    two = [{"role": "system", "content": _S}, {"role": "user", "content": _U}]
    generation = render(two, True)[len(render(two)):]
    # A template that adds its own system message when there is none (SmolLM2 does): keep it as the default.
    alone = render([{"role": "user", "content": _U}])
    default_system = ""
    if alone.count(prefix["system"]) and prefix["system"]:
        head = alone.split(prefix["system"], 1)[1]
        default_system = head.split(suffix, 1)[0] if suffix and suffix in head else ""
    return TurnFormat(prefix, suffix, generation, default_system, bos)


def _go_quote(s: str) -> str:
    return json.dumps(s)[1:-1]


def ollama_template(fmt: TurnFormat) -> str:
    # One line of actions, no {{- trimming: the newlines inside the prefixes and the turn end are part of the
    # prompt the model was trained on, and a trim marker would eat them.
    parts = ["{{ range .Messages }}"]
    for i, role in enumerate(("system", "user", "assistant")):
        parts.append(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{fmt.prefix[role]}'
                     f'{{{{ .Content }}}}{fmt.suffix}')
    parts += ["{{ end }}{{ end }}", fmt.generation]
    return "".join(parts)


def check_modelfile_text(system_prompt: str) -> None:
    """A Modelfile value in triple quotes ends at the first \"\"\" and has no escapes: a system prompt holding one
    would end early, and what follows would be read as directives (FROM, ADAPTER /etc/passwd ...)."""
    if '"""' in system_prompt or system_prompt.endswith('"'):
        raise ExportError('The system prompt contains """ (or ends with "), which an Ollama Modelfile cannot quote: '
                          "the rest would be read as Modelfile directives. Change it, or export the merged model.")


def ollama_modelfile(gguf_name: str, merged: Path, system_prompt: str = "") -> str:
    """FROM the GGUF beside it, TEMPLATE from the model's chat template, stop tokens, and a system prompt."""
    from ..imports import ml_libraries

    ml_libraries()  # an export thread may be the first to import transformers (imports.py says why)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    stem = Path(gguf_name).stem
    out = [f"# Made by QLoRA Studio. Run: ollama create {stem.lower()} -f {stem}.Modelfile", f"FROM ./{gguf_name}"]
    stops = [s for s in {tok.eos_token} if s]
    if getattr(tok, "chat_template", None):
        fmt = turn_format(tok)
        template = ollama_template(fmt)
        if '"""' in template:
            raise ExportError('The chat template contains """, which a Modelfile cannot quote.')
        out.append(f'TEMPLATE """{template}"""')
        end = fmt.suffix.strip()
        if end and end not in stops:
            stops.insert(0, end)
        # The special token that opens a turn (<|im_start|>): the model starting a new turn has finished.
        for special in getattr(tok, "all_special_tokens", []):
            if special and fmt.prefix["user"].startswith(special) and special not in stops:
                stops.append(special)
        system = system_prompt or fmt.default_system
    else:
        system = system_prompt
    if system:
        check_modelfile_text(system)
        out.append(f'SYSTEM """{system}"""')
    out += [f'PARAMETER stop "{_go_quote(s)}"' for s in stops]
    out.append("PARAMETER temperature 0")
    return "\n".join(out) + "\n"


def modelfile_path(gguf: Path) -> Path:
    """One Modelfile per GGUF (<name>.Modelfile beside it): exports of several quant types live side by side."""
    return gguf.with_suffix(".Modelfile")


def run_commands(gguf: Path) -> dict[str, str]:
    """The one-line commands that run an export elsewhere."""
    mf = modelfile_path(gguf)
    name = gguf.stem.lower()
    return {"ollama": f"cd {gguf.parent} && ollama create {name} -f {mf.name} && ollama run {name}",
            "llama-cli": f"llama-cli -m {gguf} -cnv"}
