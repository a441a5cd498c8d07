"""The model's shape (parameters and forward FLOPs per position) and the torch device and dtype
a config resolves to, without loading the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from benchmark.errors import ConfigError

# Shapes conf/model/*.yaml does not hold (it has n_layers, d_model, n_heads, d_head), from each
# model's published config.json. A key of the same name in the model config wins.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "google/gemma-2-9b": dict(
        d_mlp=14336, d_vocab=256000, n_kv_heads=8, gated_mlp=True, tied_embeddings=True
    ),
    "google/gemma-2-2b": dict(
        d_mlp=9216, d_vocab=256000, n_kv_heads=4, gated_mlp=True, tied_embeddings=True
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        d_mlp=1536, d_vocab=49152, n_kv_heads=3, gated_mlp=True, tied_embeddings=True
    ),
    "openai-community/gpt2": dict(
        d_mlp=3072, d_vocab=50257, n_kv_heads=12, gated_mlp=False, tied_embeddings=True
    ),
    "EleutherAI/pythia-70m": dict(
        d_mlp=2048, d_vocab=50304, n_kv_heads=8, gated_mlp=False, tied_embeddings=False
    ),
}
SHAPE_KEYS = ("d_mlp", "d_vocab", "n_kv_heads", "gated_mlp", "tied_embeddings")


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    d_mlp: int
    d_vocab: int
    gated_mlp: bool = True
    tied_embeddings: bool = True
    assumed: tuple[str, ...] = ()  # "key=value" for each value not in the config
    source: str = ""  # where the assumed values come from

    @classmethod
    def from_config(cls, model: DictConfig) -> ModelShape:
        known = KNOWN_SHAPES.get(str(model.get("architecture")), {})
        guess = {
            "d_mlp": 4 * int(model.d_model),
            "d_vocab": 50_000,
            "n_kv_heads": int(model.n_heads),
            "gated_mlp": False,
            "tied_embeddings": True,
        }
        values, assumed = {}, []
        for key in SHAPE_KEYS:
            if model.get(key) is not None:
                values[key] = model.get(key)
                continue
            values[key] = known.get(key, guess[key])
            assumed.append(f"{key}={values[key]}" + ("" if key in known else " (a guess)"))
        return cls(
            name=str(model.name),
            n_layers=int(model.n_layers),
            d_model=int(model.d_model),
            n_heads=int(model.n_heads),
            d_head=int(model.d_head),
            n_kv_heads=int(values["n_kv_heads"]),
            d_mlp=int(values["d_mlp"]),
            d_vocab=int(values["d_vocab"]),
            gated_mlp=bool(values["gated_mlp"]),
            tied_embeddings=bool(values["tied_embeddings"]),
            assumed=tuple(assumed),
            source=f"{model.get('architecture')}'s config.json" if known else "guesses",
        )

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.d_head

    @property
    def block_params(self) -> int:
        attn = 2 * self.d_model * self.d_attn + 2 * self.d_model * self.n_kv_heads * self.d_head
        return attn + (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp

    @property
    def non_embedding_params(self) -> int:
        return self.n_layers * self.block_params

    @property
    def params(self) -> int:
        embed = self.d_vocab * self.d_model
        return self.non_embedding_params + embed * (1 if self.tied_embeddings else 2)

    def flops(self, blocks: int, ctx: int, logits: bool = False) -> float:
        """FLOPs per position of a forward pass through `blocks` blocks (and the logits)."""
        f = 2.0 * blocks * self.block_params + 2.0 * blocks * ctx * self.d_attn
        return f + (2.0 * self.d_model * self.d_vocab if logits else 0.0)

    def full(self, ctx: int) -> float:
        return self.flops(self.n_layers, ctx, logits=True)


def resolve(device: str, dtype: str) -> tuple[Any, Any]:
    """(torch device, torch dtype) as benchmark.models.resolve_device / resolve_dtype give
    them (`auto`: cuda if present; bfloat16 on cuda, else float32), without importing the
    model stack (transformer_lens takes seconds to import)."""
    import torch

    try:
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
    except RuntimeError as e:
        raise ConfigError(
            f"device={device!r} is not a torch device; use auto, cpu, cuda, cuda:N"
        ) from e
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)  # checked by validate.check_root (MODEL_DTYPES)
