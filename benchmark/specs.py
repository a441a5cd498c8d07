"""Typed specs: the parts of a composed config each stage below the entry point reads.

Owns the boundary between Hydra's config tree and the stages. `run.py` (and each tool's
entry point: probe, interp, examples, the scripts) turns a resolved config into these frozen
dataclasses once; `models`, `data` and `activations` take them and never see a DictConfig, so
each module can be read without the config tree (DESIGN: "The Hydra DictConfig stops at
run.py"). A spec holds only what its stage uses, with the config's own defaults.

- `ModelSpec` (conf/model): what boots the model, checks its shape and names its hooks.
- `SiteSpec` (conf/site): a site's name and hook.
- `DataSpec` (conf/data): the text source, split, window layout, budgets and how activations
  are read. `identity` is the resolved data config without its budget keys, exactly as the
  activation cache key has always hashed it (`data.BUDGET_KEYS`), so keys do not change.
- `SourceSpec`: where activations come from (model, layer, site, data, device, cache folder,
  progress display): what `activations.get_activation_store(s)` reads.
- `EvalSpec` (conf/eval): the held-out activation set and the LM evaluation.

Values are taken as the config holds them (after interpolation); the stages still check them
where they are used, with the messages they always gave (e.g. `data.n_train_tokens=0 must be a
positive integer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys of a data config that do not change which tokens a split holds (kept out of cache keys):
# budgets, and how activations are read (harvest settings, streaming).
BUDGET_KEYS = (
    *("n_train_tokens", "n_eval_tokens", "eval_pool_tokens", "allow_fewer_tokens", "harvest"),
    *("stream", "stream_buffer_tokens", "stream_norm_tokens"),
    "max_norm_multiple",  # applied when the cache is read (ActivationStore.without_outliers)
)
EVAL_POOL_TOKENS = 200_000  # default data.eval_pool_tokens
STREAM_DEFAULTS = {"stream_buffer_tokens": 262_144, "stream_norm_tokens": 100_000}


def plain(node: Any) -> dict[str, Any]:
    """A config node (DictConfig or mapping) as a plain, resolved dict."""
    if node is None:
        return {}
    if hasattr(node, "_get_node"):  # an OmegaConf container, without importing omegaconf here
        from omegaconf import OmegaConf

        out = OmegaConf.to_container(node, resolve=True)
    else:
        out = {k: plain(v) if isinstance(v, Mapping) else v for k, v in dict(node).items()}
    if not isinstance(out, dict):
        raise TypeError(f"expected a mapping, got {type(node).__name__}")
    return {str(k): v for k, v in out.items()}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str | None = None
    path: str | None = None
    architecture: str | None = None
    dtype: str = "float32"
    bos_token: str | None = None
    n_layers: Any = None
    d_model: Any = None
    n_heads: Any = None
    d_head: Any = None
    layers: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, node: Any) -> ModelSpec:
        d = plain(node)
        keys = ("name", "source", "path", "architecture", "dtype", "bos_token")
        shape = ("n_layers", "d_model", "n_heads", "d_head")
        kwargs = {k: d[k] for k in (*keys, *shape) if k in d and d[k] is not None}
        return cls(**kwargs, layers=dict(d.get("layers") or {}))

    @property
    def identity(self) -> dict[str, Any]:
        """What changes the model's outputs, before the dtype is resolved (cache keys)."""
        return {
            k: getattr(self, k) for k in ("name", "source", "path", "architecture", "bos_token")
        }


@dataclass(frozen=True)
class SiteSpec:
    name: str
    hook: str | None = None

    @classmethod
    def of(cls, node: Any) -> SiteSpec:
        d = plain(node)
        return cls(name=str(d.get("name")), hook=d.get("hook"))


@dataclass(frozen=True)
class HarvestSpec:
    batch_size: int = 32  # windows per forward pass (and the streaming forward batch)
    shard_mb: float = 32  # size of one cache shard on disk


@dataclass(frozen=True)
class DataSpec:
    name: str
    source: str | None
    context_length: Any = None
    path: str | None = None
    config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    id_field: str | None = None
    eval_fraction: Any = 0.05
    n_train_tokens: Any = None
    n_eval_tokens: Any = None
    eval_pool_tokens: Any = EVAL_POOL_TOKENS
    allow_fewer_tokens: bool = False
    max_norm_multiple: float | None = None
    stream: bool = False
    stream_buffer_tokens: Any = STREAM_DEFAULTS["stream_buffer_tokens"]
    stream_norm_tokens: Any = STREAM_DEFAULTS["stream_norm_tokens"]
    harvest: HarvestSpec = field(default_factory=HarvestSpec)
    identity: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, node: Any) -> DataSpec:
        d = plain(node)
        names = {f for f in cls.__dataclass_fields__} - {"harvest", "identity", "name", "source"}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        harvest = d.get("harvest") or {}
        return cls(
            name=str(d.get("name")),
            source=d.get("source"),
            **kwargs,
            harvest=HarvestSpec(
                **{k: harvest[k] for k in ("batch_size", "shard_mb") if k in harvest}
            ),
            identity={k: v for k, v in d.items() if k not in BUDGET_KEYS},
        )

    def budget(self, key: str) -> Any:
        """A budget or streaming key by name (`n_train_tokens`, `stream_norm_tokens`, ...)."""
        return getattr(self, key)


@dataclass(frozen=True)
class SourceSpec:
    """Where activations come from: `layer` of `model` at `site`, over `data`."""

    model: ModelSpec
    layer: int
    site: SiteSpec
    data: DataSpec
    device: str = "auto"
    cache_dir: Path = Path("cache")
    progress: bool = True

    @classmethod
    def of(cls, cfg: Any) -> SourceSpec:
        """The source of a composed (or saved) run config: model, layer.index, site, data,
        device, cache_dir, progress."""
        return cls(
            model=ModelSpec.of(cfg["model"]),
            layer=int(cfg["layer"]["index"]),
            site=SiteSpec.of(cfg["site"]),
            data=DataSpec.of(cfg["data"]),
            device=str(_get(cfg, "device", "auto")),
            cache_dir=Path(str(cfg["cache_dir"])),
            progress=bool(_get(cfg, "progress", True)),
        )


@dataclass(frozen=True)
class EvalSpec:
    n_activation_tokens: int
    activation_batch_size: int
    batch_size: int
    kl_div: bool = True

    @classmethod
    def of(cls, node: Any) -> EvalSpec:
        d = plain(node)
        return cls(
            n_activation_tokens=int(d["n_activation_tokens"]),
            activation_batch_size=int(d["activation_batch_size"]),
            batch_size=int(d["batch_size"]),
            kl_div=bool(d.get("kl_div", True)),
        )


def _get(cfg: Any, key: str, default: Any) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else default
    return default if value is None else value
