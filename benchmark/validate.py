"""Checks that fail in a second, before any model, data or training work.

Owns: validating every `_target_` node of a composed config against its class's signature (a
typo names the key and the valid ones), and the cross-group checks of a run (target L0 against
the dictionary size, sparsity mode against the architecture). Must not load models or data.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from benchmark.errors import ConfigError
from benchmark.massive import model_norm_rule
from benchmark.recipe import check_precision_device

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Arguments the runner supplies when it instantiates a node (not written in the YAML).
SUPPLIED = {"sae": {"d_in", "d_sae"}}


def target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every (dotted path, node) with a `_target_`, depth first."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if key != "hydra":
                yield from target_nodes(node._get_node(key), f"{path}.{key!s}".lstrip("."))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from target_nodes(item, f"{path}[{i}]")


def check_target(path: str, node: DictConfig, supplied: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    target = node["_target_"]
    try:
        obj = get_object(target)
    except Exception as e:  # ImportError, AttributeError, ... all mean "cannot find it"
        raise ConfigError(f"{path}._target_={target!r} cannot be imported: {e}") from e
    params = inspect.signature(obj).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    keys = {str(k) for k in node.keys()} - HYDRA_KEYS
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = sorted(keys - set(names)) if not takes_kwargs else []
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {unknown} for {target}; valid keys: {sorted(names)}"
        )
    missing = [
        n for n, p in params.items()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and n not in keys and n not in supplied
    ]  # fmt: skip
    if missing:
        raise ConfigError(f"{path}: {target} needs {missing}, which the config does not set")


def check_targets(cfg: DictConfig) -> int:
    """Validate every `_target_` node; returns how many were checked."""
    n = 0
    for path, node in target_nodes(cfg):
        check_target(path, node, SUPPLIED.get(path, set()))
        n += 1
    return n


def site_width(cfg: DictConfig) -> int:
    """d_in of the SAE: d_model, or n_heads * d_head for the attention site's hook_z."""
    m = cfg.model
    return int(m.n_heads * m.d_head) if "hook_z" in cfg.site.hook else int(m.d_model)


def dictionary_size(cfg: DictConfig, d_in: int) -> int:
    """train.width if set, else train.width_factor x d_in (checked by `check_width`)."""
    width = cfg.train.get("width")
    return int(width) if width is not None else int(cfg.train.width_factor * d_in)


def check_width(cfg: DictConfig) -> None:
    width, factor = cfg.train.get("width"), cfg.train.get("width_factor")
    if width is not None and not _pos_int(width):
        raise ConfigError(f"train.width={width!r} must be a positive integer (d_sae) or null")
    if width is None:
        ok = isinstance(factor, (int, float)) and not isinstance(factor, bool)
        if not ok or not math.isfinite(factor) or int(factor * site_width(cfg)) < 1:
            raise ConfigError(
                f"train.width_factor={factor!r} must be a number > 0 (d_sae = width_factor x "
                f"d_in = {site_width(cfg)}), or set train.width"
            )


# Top-level keys of conf/config.yaml; anything else (`+foo=1`) is a typo that would silently
# change the config hash.
ROOT_KEYS = {
    *("model", "layer", "site", "sae", "sparsity", "data", "train", "eval", "logger", "seed"),
    *("device", "experiment_name", "results_dir", "cache_dir", "rerun", "progress"),
}


# model.dtype values; benchmark.models maps them to torch dtypes (auto: bf16 on GPU, else fp32).
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_root(cfg: DictConfig) -> None:
    unknown = sorted(str(k) for k in cfg.keys() if k not in ROOT_KEYS and k != "hydra")
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(unknown)}; valid: {', '.join(sorted(ROOT_KEYS))}"
        )
    n_layers, layer = cfg.model.get("n_layers"), cfg.layer.get("index")
    if not _pos_int(layer + 1 if isinstance(layer, int) else None) or (
        _pos_int(n_layers) and layer >= n_layers
    ):
        raise ConfigError(
            f"layer.index={layer!r} is out of range for model={cfg.model.name}: valid 0.."
            f"{n_layers - 1 if _pos_int(n_layers) else '?'}"
        )
    dtype = cfg.model.get("dtype")
    if dtype not in MODEL_DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
    if cfg.data.get("source") == "local" and (
        OmegaConf.is_missing(cfg.data, "path") or not cfg.data.get("path")
    ):
        raise ConfigError("data=local needs data.path=<a .txt/.jsonl/.parquet file or a folder>")


# The keys each group may hold, with a check per key: (predicate, what would be valid).
def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1


_POS_INT = (_pos_int, "a positive integer")
_OPT_STR = (_opt_str, "a string or null")
_BOOL = (_is_bool, "true or false")
DATA_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: v in ("bundled", "hf", "local"), "bundled, hf or local"),
    "context_length": (lambda v: _pos_int(v) and v >= 2, "an integer >= 2"),
    "eval_fraction": (_fraction, "a number in (0, 1)"),
    "n_train_tokens": _POS_INT,
    "n_eval_tokens": _POS_INT,
    "eval_pool_tokens": _POS_INT,
    "allow_fewer_tokens": _BOOL,
    "stream": _BOOL,
    "stream_buffer_tokens": _POS_INT,
    "stream_norm_tokens": _POS_INT,
    "harvest": (
        lambda v: (
            isinstance(v, dict)
            and set(v) <= {"batch_size", "shard_mb"}
            and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                for x in v.values()
            )
        ),
        "{batch_size: positive int, shard_mb: positive number}",
    ),  # fmt: skip
    "path": _OPT_STR,
    "config": _OPT_STR,
    "hf_split": (lambda v: isinstance(v, str), "a string"),
    "text_field": (lambda v: isinstance(v, str), "a string"),
    "id_field": _OPT_STR,
    "max_norm_multiple": (
        lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1),
        "null (keep every token) or a number > 1 (a multiple of the median activation norm)",
    ),
}
EVAL_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "batch_size": _POS_INT,
    "kl_div": _BOOL,
    "n_activation_tokens": _POS_INT,
    "activation_batch_size": _POS_INT,
}


def check_group(
    group: str, node: DictConfig, keys: dict[str, tuple[Callable[[Any], bool], str]]
) -> None:
    """Every key of `node` known and valid, else ConfigError naming `group.key` and the value."""
    plain = OmegaConf.to_container(node, resolve=True)
    assert isinstance(plain, dict)
    unknown = sorted(str(k) for k in plain if k not in keys)
    if unknown:
        raise ConfigError(
            f"{group}: unknown key(s) {', '.join(f'{group}.{k}' for k in unknown)}; "
            f"valid keys: {', '.join(sorted(keys))}"
        )
    for raw_key, value in plain.items():
        key = str(raw_key)
        ok, valid = keys[key]
        if not ok(value):
            raise ConfigError(f"{group}.{key}={value!r} is invalid: must be {valid}")


def check_seed(cfg: DictConfig) -> None:
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r} must be an integer in [0, 2**32)")


def check_precision(cfg: DictConfig) -> None:
    """train.precision tf32/bf16 on a device that resolves to a CPU (device=cpu, or auto on a
    machine without CUDA): a ConfigError now rather than when training starts. The value itself
    is checked by TrainConfig; a device name torch rejects is reported by models.resolve_device."""
    precision, name = cfg.train.get("precision", "fp32"), str(cfg.get("device", "auto"))
    if name == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            device_type = torch.device(name).type
        except RuntimeError:
            return
    check_precision_device(precision, device_type)


def evaluate_only(cfg: DictConfig) -> bool:
    """train=none: no training; the SAE is loaded from `sae.path` (conf/train/none.yaml)."""
    return cfg.train.get("name") == "none"


def _rule_note(cfg: DictConfig) -> str:
    """Where data.max_norm_multiple came from when the model config's rule set it."""
    from_rule = cfg.data.get("max_norm_multiple") == model_norm_rule(cfg)
    where = f"{cfg.site.name} layer {cfg.layer.index}"
    return f" (model.massive_activations sets it at {where})" if from_rule else ""


def check_run(cfg: DictConfig) -> None:
    """All cheap checks of one run's config (raises ConfigError naming the bad value)."""
    check_root(cfg)
    check_targets(cfg)
    check_seed(cfg)
    model_norm_rule(cfg)  # a malformed model.massive_activations, named
    check_group("data", cfg.data, DATA_KEYS)
    check_group("eval", cfg.eval, EVAL_KEYS)
    if cfg.data.get("stream") and cfg.data.get("max_norm_multiple") is not None:
        raise ConfigError(
            f"data.max_norm_multiple={cfg.data.max_norm_multiple} needs cached activations"
            f"{_rule_note(cfg)}: set data.stream=false or data.max_norm_multiple=null"
        )
    if evaluate_only(cfg):  # the SAE comes from a file: its size and sparsity are the file's
        if not cfg.sae.get("path"):
            raise ConfigError(
                "train=none evaluates a given SAE: use sae=gemma_scope, saelens or "
                "dictionary_learning with sae.path=<file, folder or hf://owner/repo/...>"
            )
        return
    check_width(cfg)
    check_precision(cfg)
    d_sae = dictionary_size(cfg, site_width(cfg))
    sp = cfg.sparsity
    if sp.mode == "target_l0":
        t = sp.target_l0
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= d_sae:
            raise ConfigError(
                f"sparsity.target_l0={sp.target_l0} must be in [1, d_sae={d_sae}] "
                f"(the dictionary size for train={cfg.train.name} at site={cfg.site.name})"
            )
    elif sp.mode == "coefficient":
        if OmegaConf.is_missing(sp, "coefficient"):
            raise ConfigError("sparsity=coefficient needs sparsity.coefficient=<lambda>")
        c = sp.coefficient
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ConfigError(
                f"sparsity.coefficient={c!r} must be a finite number >= 0 (the lambda)"
            )
        if "k" in cfg.sae:  # an architecture whose sparsity is its k, not a coefficient
            raise ConfigError(
                f"sae={cfg.sae._target_} sets its L0 through k; use sparsity=l0_N, not "
                "sparsity=coefficient"
            )
    else:
        raise ConfigError(f"sparsity.mode={sp.mode!r}; valid: target_l0, coefficient")
