"""Model hyper-parameters, read from a checkpoint's `params.json` or `config.json`.

The two files name the same numbers differently:

    params.json (Mistral)   config.json (Hugging Face)
    ---------------------   --------------------------------------------------
    dim                     hidden_size
    n_layers                num_hidden_layers
    n_heads                 num_attention_heads
    n_kv_heads              num_key_value_heads
    head_dim                head_dim              (optional: dim // n_heads)
    hidden_dim              intermediate_size
    norm_eps                rms_norm_eps
    vocab_size              vocab_size
    rope_theta              rope_theta | rope_parameters.rope_theta
    sliding_window          sliding_window        (optional: none)

Every value comes from the file. We never fill a gap with `transformers.MistralConfig`'s
defaults: they describe no real checkpoint of v0.3 (eps 1e-6, theta 1e4, window 4096).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

# Bounds far past any real checkpoint (v0.3: 32 layers, widths up to 32768), so that a corrupt or
# hostile config fails at once instead of building a model that cannot exist.
MAX_LAYERS = 1024
MAX_WIDTH = 2**20


@dataclass(frozen=True)
class ModelArgs:
    dim: int  # width of the residual stream
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads; n_heads // n_kv_heads query heads share each (GQA)
    head_dim: int
    hidden_dim: int  # width of the SwiGLU feed-forward
    norm_eps: float
    vocab_size: int
    rope_theta: float
    sliding_window: int | None = None  # v0.1 only: attend to the last `sliding_window` positions

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size"):
            value, limit = getattr(self, name), MAX_LAYERS if name == "n_layers" else MAX_WIDTH
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
            if value > limit:  # no real model comes near; building one this size would only exhaust memory
                shown = value if value < 2**50 else f"~2**{value.bit_length() - 1}"
                raise ValueError(f"ModelArgs.{name} is {shown}, past the limit of {limit}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ModelArgs.{name} must be a positive finite number, got {value!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window!r}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def to_params(self) -> dict:
        """The `params.json` form."""
        params = dataclasses.asdict(self)
        if params["sliding_window"] is None:
            del params["sliding_window"]
        return params

    def to_hf_config(self) -> dict:
        """The `config.json` form, as the official v0.3 repository writes it."""
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "rms_norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_params(cls, params: dict, source: str = "params.json") -> "ModelArgs":
        n_heads = _field(params, "n_heads", int, source)
        dim = _field(params, "dim", int, source)
        return _build(
            source,
            dim=dim,
            n_layers=_field(params, "n_layers", int, source),
            n_heads=n_heads,
            n_kv_heads=_field(params, "n_kv_heads", int, source),
            head_dim=_field(params, "head_dim", int, source, default=_head_dim(dim, n_heads)),
            hidden_dim=_field(params, "hidden_dim", int, source),
            norm_eps=_field(params, "norm_eps", float, source),
            vocab_size=_field(params, "vocab_size", int, source),
            # Mistral's own reference reads a missing rope_theta as 1e4 (the v0.1 files lack it).
            rope_theta=_field(params, "rope_theta", float, source, default=10000.0),
            sliding_window=_field(params, "sliding_window", int, source, default=None),
        )

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        n_heads = _field(config, "num_attention_heads", int, source)
        dim = _field(config, "hidden_size", int, source)
        rope_theta = config.get("rope_theta")
        if rope_theta is None and isinstance(config.get("rope_parameters"), dict):
            rope_theta = config["rope_parameters"].get("rope_theta")  # transformers >= 5 writes it here
        if rope_theta is None:
            raise CheckpointError(f"{source}: missing field 'rope_theta' (the v0.3 value is 1000000.0)")
        return _build(
            source,
            dim=dim,
            n_layers=_field(config, "num_hidden_layers", int, source),
            n_heads=n_heads,
            n_kv_heads=_field(config, "num_key_value_heads", int, source),
            head_dim=_field(config, "head_dim", int, source, default=_head_dim(dim, n_heads)),
            hidden_dim=_field(config, "intermediate_size", int, source),
            norm_eps=_field(config, "rms_norm_eps", float, source),
            vocab_size=_field(config, "vocab_size", int, source),
            rope_theta=_number(rope_theta, float, "rope_theta", source),
            sliding_window=_field(config, "sliding_window", int, source, default=None),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        """Read `params.json` or `config.json` (told apart by their keys)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except (ValueError, UnicodeDecodeError) as e:  # ValueError: JSONDecodeError, or a 5000-digit number
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise CheckpointError(f"{path}: not a config file (JSON nested too deeply)") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
        if "hidden_size" in data or "num_hidden_layers" in data:
            return cls.from_hf_config(data, source=str(path))
        return cls.from_params(data, source=str(path))


_MISSING = object()


def _number(value, kind: type, name: str, source: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{source}: field {name!r} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's 1e400 reads as inf; NaN, Infinity
        raise CheckpointError(f"{source}: field {name!r} must be a finite number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise CheckpointError(f"{source}: field {name!r} must be an integer, got {value!r}")
        return int(value)
    if abs(value) > 1e300:  # an integer too large for a float (10**400 is valid JSON)
        raise CheckpointError(f"{source}: field {name!r} must be a finite number, got ~2**{int(value).bit_length() - 1}")
    return float(value)


def _head_dim(dim, n_heads):
    """v0.1's default, dim // n_heads; 0 (refused by ModelArgs, naming n_heads) when n_heads is not positive."""
    return dim // n_heads if n_heads > 0 else 0


def _field(data: dict, name: str, kind: type, source: str, default=_MISSING):
    value = data.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise CheckpointError(f"{source}: missing field {name!r}")
        return default
    return _number(value, kind, name, source)


def _build(source: str, **fields) -> ModelArgs:
    try:
        return ModelArgs(**fields)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


PRESETS: dict[str, ModelArgs] = {
    # Mistral-7B-v0.3 / Mistral-7B-Instruct-v0.3, as in the official params.json.
    "7b-v0.3": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
        norm_eps=1e-5, vocab_size=32768, rope_theta=1e6,
    ),
    # The same shape family at a size that runs in CI in well under a second per forward pass.
    # The vocabulary stays 32768 so that the real v3 tokenizer works with it.
    "small": ModelArgs(
        dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512,
        norm_eps=1e-5, vocab_size=32768, rope_theta=1e6,
    ),
    # About 0.5B parameters: the middle size of the CPU benchmarks.
    "0.5b": ModelArgs(
        dim=1536, n_layers=16, n_heads=12, n_kv_heads=4, head_dim=128, hidden_dim=4096,
        norm_eps=1e-5, vocab_size=32768, rope_theta=1e6,
    ),
}


def preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
