"""Checks that fail in a second, before any model, data or training work.

Owns: validating every `_target_` node of a composed config against its class's signature (a
typo names the key and the valid ones), and the cross-group checks of a run (target L0 against
the dictionary size, sparsity mode against the architecture). Must not load models or data.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from benchmark.errors import ConfigError

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
    width = cfg.train.get("width")
    return int(width) if width else int(cfg.train.width_factor * d_in)


def check_run(cfg: DictConfig) -> None:
    """All cheap checks of one run's config (raises ConfigError naming the bad value)."""
    check_targets(cfg)
    d_sae = dictionary_size(cfg, site_width(cfg))
    sp = cfg.sparsity
    if sp.mode == "target_l0":
        if not sp.target_l0 or not 0 < sp.target_l0 <= d_sae:
            raise ConfigError(
                f"sparsity.target_l0={sp.target_l0} must be in [1, d_sae={d_sae}] "
                f"(the dictionary size for train={cfg.train.name} at site={cfg.site.name})"
            )
    elif sp.mode == "coefficient":
        if OmegaConf.is_missing(sp, "coefficient"):
            raise ConfigError("sparsity=coefficient needs sparsity.coefficient=<lambda>")
        if "k" in cfg.sae:  # an architecture whose sparsity is its k, not a coefficient
            raise ConfigError(
                f"sae={cfg.sae._target_} sets its L0 through k; use sparsity=l0_N, not "
                "sparsity=coefficient"
            )
    else:
        raise ConfigError(f"sparsity.mode={sp.mode!r}; valid: target_l0, coefficient")
