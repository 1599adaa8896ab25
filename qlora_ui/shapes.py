"""Model shapes for the memory planner: layer counts and sizes from a model's config.json, a name the planner
knows (qlora_ui/model_shapes.json), or a hub id whose config is already cached. No weights are read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import BUNDLED_MODEL
from .errors import ShapeError  # the error family's; importable from here as before

SHAPES_FILE = Path(__file__).resolve().parent / "model_shapes.json"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- shapes

@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    head_dim: int = 0  # 0 = hidden // heads
    attention_bias: bool = False
    gated_mlp: bool = True  # SwiGLU (gate, up, down) as in LLaMA; False = two-matrix MLP (up, down)
    hub_ids: tuple[str, ...] = ()

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder block."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_heads * self.hd, self.intermediate
        out = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.gated_mlp:
            out["gate_proj"] = (h, i)
        out.update(up_proj=(h, i), down_proj=(i, h))
        return out

    def param_counts(self) -> dict[str, int]:
        """Parameters per module kind, all layers together."""
        lin = self.linears()
        attn = sum(a * b for k, (a, b) in lin.items() if k in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if self.attention_bias:  # Qwen2 has q/k/v biases
            attn += self.heads * self.hd + 2 * self.kv_heads * self.hd
        mlp = sum(a * b for k, (a, b) in lin.items() if k in ("gate_proj", "up_proj", "down_proj"))
        emb = self.vocab * self.hidden
        return {
            "embeddings": emb,
            "attention": attn * self.layers,
            "mlp": mlp * self.layers,
            "norms": self.hidden * (2 * self.layers + 1),
            "lm_head": 0 if self.tie_embeddings else emb,
        }

    @property
    def total_params(self) -> int:
        return sum(self.param_counts().values())

    @property
    def quantized_params(self) -> int:
        """Weights bitsandbytes stores in 4 bits: every linear layer in the blocks (not embeddings, lm_head,
        norms or biases; transformers keeps the output layer in 16 bits)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def lora_params(self, rank: int, targets: str = "all-linear") -> int:
        return self.layers * sum(rank * (a + b) for a, b in self._targets(targets).values())

    def _targets(self, targets: str) -> dict[str, tuple[int, int]]:
        lin = self.linears()
        if targets.strip() == "all-linear":
            return lin
        # peft matches a target against the end of the module name, so "q_proj" and "self_attn.q_proj" match.
        wanted = {t.strip().rsplit(".", 1)[-1] for t in targets.split(",") if t.strip()}
        return {k: v for k, v in lin.items() if k in wanted}


def _load_shapes() -> dict[str, ModelShape]:
    raw = json.loads(SHAPES_FILE.read_text(encoding="utf-8"))
    return {name: shape_from_config(d, name) for name, d in raw.items() if not name.startswith("_")}


def known_shapes() -> list[str]:
    return sorted(SHAPES)


def shape_from_config(conf: dict, name: str = "local") -> ModelShape:
    """A shape from a Hugging Face config.json dict (Llama-style keys, GPT-2-style as a fallback)."""
    conf = conf.get("text_config", conf) if "hidden_size" not in conf and "n_embd" not in conf else conf

    def pick(*keys: str, default=None):
        for k in keys:
            if conf.get(k) is not None:
                return conf[k]
        return default

    hidden = pick("hidden_size", "n_embd", "d_model")
    layers = pick("num_hidden_layers", "n_layer", "num_layers")
    heads = pick("num_attention_heads", "n_head")
    vocab = pick("vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]
    if missing:
        raise ShapeError(f"config for '{name}' lacks {', '.join(missing)}; cannot estimate its memory.")
    model_type = str(conf.get("model_type", "")).lower()
    gated = model_type not in ("gpt2", "gpt_neox", "gptj", "opt", "falcon", "phi", "bloom", "gpt_bigcode")
    return ModelShape(
        name=name,
        hidden=int(hidden),
        intermediate=int(pick("intermediate_size", "n_inner", "ffn_dim", default=4 * int(hidden)) or 4 * hidden),
        layers=int(layers),
        heads=int(heads),
        kv_heads=int(pick("num_key_value_heads", "num_kv_heads", default=heads)),
        vocab=int(vocab),
        # transformers' LlamaConfig defaults to untied; counting an untied head is the safe side.
        tie_embeddings=bool(pick("tie_word_embeddings", default=False)),
        head_dim=int(pick("head_dim", default=0) or 0),
        attention_bias=bool(pick("attention_bias", default=model_type == "qwen2")),
        gated_mlp=gated,
        hub_ids=tuple(conf.get("hub_ids", ())),
    )


SHAPES: dict[str, ModelShape] = _load_shapes()


def resolve_shape(model: str) -> ModelShape:
    """A shape name ("llama-65b"), a hub id that maps to one, the bundled model (its shape, without converting
    it), a local folder (or its config.json), or a hub id already in the local Hugging Face cache."""
    name = (model or "").strip()
    low = name.lower()
    if name == BUNDLED_MODEL or low in ("bundled", "smollm2-135m-instruct"):
        return SHAPES["smollm2-135m"]
    if low in SHAPES:
        return SHAPES[low]
    for shape in SHAPES.values():
        if low in (h.lower() for h in shape.hub_ids):
            return shape
    p = Path(name).expanduser()
    conf_file = p if p.name == "config.json" else p / "config.json"
    if conf_file.is_file():
        return shape_from_config(json.loads(conf_file.read_text(encoding="utf-8")), p.name or name)
    if p.exists():
        raise ShapeError(f"'{name}' has no config.json, so the planner cannot read its shape.")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        cached = _hub_cached_config(name)
        if cached is not None:
            return shape_from_config(json.loads(cached.read_text(encoding="utf-8")), name)
    raise ShapeError(f"unknown model '{name}'. Known shapes: {', '.join(known_shapes())}; "
                     "or give a local folder with config.json.")


def _hub_cached_config(repo_id: str) -> Path | None:
    # Offline by design: only a config.json the user has already downloaded is read.
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id: just "not cached"
        return None
    return Path(hit) if isinstance(hit, str) else None
