"""Building, saving and reloading SAEs from their config node.

Owns: turning a `conf/sae/*.yaml` node into a module (`hydra.utils.instantiate`, the only
registry), and the on-disk form of a trained SAE: `sae.safetensors` (the state dict) beside
`sae_config.yaml` (the resolved node, with d_in and d_sae filled in). Reloading needs no table
of names either, so an architecture added by config reloads with no code change here; but a
saved folder may come from someone else, so it is read as data, never as code (`load_sae`):
the node's `_target_` must name a `SparseAutoencoder` class of a trusted module, its arguments
must be plain values, and the weights file's header must match the SAE that the node describes
before any tensor is read. `instantiate` is used only on the user's own composed config
(`build_sae`), never on a saved file. docs/security.md has the whole policy.

Must not know: the data, the model, the trainer.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from baselines.base import SparseAutoencoder
from benchmark.cli_errors import first_line
from benchmark.compose import CONF_DIR
from benchmark.errors import ConfigError
from benchmark.fileio import atomic_write
from benchmark.specs import plain
from interop.foreign import safetensors_shapes

WEIGHTS, CONFIG = "sae.safetensors", "sae_config.yaml"


def sae_node(node: Mapping[str, Any], d_in: int, d_sae: int | None) -> dict[str, Any]:
    """The resolved SAE node (a plain dict) with the runner-supplied sizes filled in (d_sae
    None: a loader of a released SAE, whose size is the file's)."""
    return {**plain(node), "d_in": int(d_in), "d_sae": int(d_sae) if d_sae is not None else None}


def build_sae(node: Mapping[str, Any], d_in: int, d_sae: int | None) -> SparseAutoencoder:
    """The SAE of a `conf/sae` node (from the user's own composed config)."""
    try:
        sae = instantiate(sae_node(node, d_in, d_sae))
    except InstantiationException as e:
        # An architecture's own check (k out of range, bandwidth <= 0, ...) is a user error;
        # the classes cannot raise ConfigError themselves (baselines never import benchmark).
        if isinstance(e.__cause__, (ValueError, TypeError, FileNotFoundError)):
            raise ConfigError(f"sae={node['_target_']}: {e.__cause__}") from None
        raise
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(
            f"sae._target_={node['_target_']!r} built a {type(sae).__name__}, "
            "which is not a baselines.base.SparseAutoencoder"
        )
    return sae


def save_sae(sae: SparseAutoencoder, folder: str | Path, node: Mapping[str, Any]) -> Path:
    """Write sae.safetensors and sae_config.yaml into `folder` (atomically, file by file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, p))
    atomic_write(folder / CONFIG, lambda p: OmegaConf.save(OmegaConf.create(dict(node)), p))
    return folder


# A saved sae_config.yaml is a few hundred bytes; anything this large is not one.
MAX_CONFIG_BYTES = 1 << 20
# The suite's architectures, and its loaders of released formats (which define no SAE class:
# a _target_ there must still name a SparseAutoencoder class).
TRUSTED_PACKAGES = ("baselines", "interop")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_PLAIN = (bool, int, float, str, type(None))


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The SAE saved in `folder` by `save_sae`, read as data: nothing in the folder can run code.

    1. sae_config.yaml is parsed with yaml.safe_load (no tags, no objects) and must be a flat
       mapping: `_target_` plus arguments that are plain values (numbers, strings, booleans,
       null, lists of them); no nested node, no `_args_`/`_partial_`/`_recursive_`/`_convert_`,
       no `${...}` interpolation.
    2. `_target_` is resolved without calling anything: its module must be part of the suite's
       `baselines` or `interop` package or named by a `_target_` of this checkout's
       conf/sae/*.yaml (configs the user wrote), so no other module is imported, and the
       attribute must be a subclass of `SparseAutoencoder`; the arguments must bind to its
       constructor's signature.
    3. The SAE is built on the meta device (no memory), and sae.safetensors's header (validated
       by safetensors: offsets inside the file, no oversize header) must hold exactly its
       tensor names and shapes; only then are the tensors read and the SAE built.
    Every refusal is a ConfigError naming the file, the key and what is valid.
    """
    folder = Path(folder)
    cfg_file, weights_file = folder / CONFIG, folder / WEIGHTS
    node = _read_plain_node(cfg_file)
    cls = _saved_class(node.get("_target_"), cfg_file)
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cfg_file}: {e} for {cls.__name__}") from None
    shapes = _header_shapes(weights_file)
    try:
        with torch.device("meta"):  # shapes only: a hostile d_sae allocates nothing
            want = {k: tuple(v.shape) for k, v in cls(**kwargs).state_dict().items()}
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        raise ConfigError(f"{cfg_file}: {cls.__name__}({_args(kwargs)}) is refused: {e}") from None
    if want != shapes:
        raise ConfigError(f"{weights_file}: {_mismatch(want, shapes)}; it does not hold the SAE "
                          f"that {CONFIG} describes ({_args(kwargs)})")  # fmt: skip
    try:
        tensors = load_file(weights_file, device="cpu")
    except Exception as e:  # noqa: BLE001  (safetensors' own error type: a damaged file)
        raise ConfigError(f"{weights_file}: unreadable ({first_line(e)})") from None
    sae = cls(**kwargs)  # the header matched: the file holds this SAE's size of data
    sae.load_state_dict(tensors)
    return sae.to(device)


def _read_plain_node(file: Path) -> dict[str, Any]:
    """A flat mapping of plain values from `file` (see `load_sae`), or ConfigError."""
    if not file.is_file():
        raise ConfigError(f"{file}: missing (a saved SAE folder holds {CONFIG} and {WEIGHTS})")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{file}: {file.stat().st_size} bytes; a saved SAE config is small")
    try:
        node = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not plain YAML ({first_line(e)})") from None
    if not isinstance(node, dict):
        raise ConfigError(f"{file}: expected a mapping with _target_, got {type(node).__name__}")
    for key, value in node.items():
        if not isinstance(key, str) or (key.startswith("_") and key != "_target_"):
            raise ConfigError(f"{file}: key {key!r} is refused: a saved SAE config holds "
                              "_target_ and plain arguments only")  # fmt: skip
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, _PLAIN) for v in items):
            raise ConfigError(f"{file}: {key}: only plain values (numbers, strings, booleans, "
                              "null, flat lists) are read from a saved SAE config")  # fmt: skip
        if any(isinstance(v, str) and "${" in v for v in items):
            raise ConfigError(f"{file}: {key}={value!r}: interpolations are not resolved in a "
                              "saved SAE config")  # fmt: skip
    return node


def _saved_class(target: Any, file: Path) -> type[SparseAutoencoder]:
    """The class `target` names, resolved without running anything new (see `load_sae`)."""
    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        raise ConfigError(f"{file}: _target_={target!r}: expected module.Class of a "
                          "SparseAutoencoder, e.g. baselines.topk.TopKSAE")  # fmt: skip
    module_name, _, name = target.rpartition(".")
    if not _trusted(module_name):
        raise ConfigError(
            f"{file}: _target_={target}: module {module_name} is refused: a saved SAE may name "
            f"a class of the suite's {' or '.join(TRUSTED_PACKAGES)} package or of a module named "
            f"by {CONF_DIR.name}/sae/*.yaml"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{file}: _target_={target}: {e}") from None
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, SparseAutoencoder)):
        raise ConfigError(f"{file}: _target_={target} is not a SparseAutoencoder class "
                          "(baselines.base.SparseAutoencoder)")  # fmt: skip
    return cls


def _trusted(module: str) -> bool:
    """Part of the suite's packages (TRUSTED_PACKAGES), or named by the user's conf/sae/*.yaml."""
    in_package = any(module == p or module.startswith(p + ".") for p in TRUSTED_PACKAGES)
    return in_package or module in _conf_modules()


@cache
def _conf_modules() -> frozenset[str]:
    """Modules of the `_target_`s in this checkout's conf/sae/*.yaml (the user's own files)."""
    found = set()
    for path in (CONF_DIR / "sae").glob("*.yaml"):
        try:
            node = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError):
            continue
        target = node.get("_target_") if isinstance(node, dict) else None
        if isinstance(target, str) and _DOTTED.fullmatch(target):
            found.add(target.rpartition(".")[0])
    return frozenset(found)


def _header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    if not file.is_file():
        raise ConfigError(f"{file}: missing (a saved SAE folder holds {CONFIG} and {WEIGHTS})")
    try:
        return safetensors_shapes(file)
    except Exception as e:  # noqa: BLE001  (safetensors' own error type: a damaged file)
        raise ConfigError(f"{file}: not a readable safetensors file ({first_line(e)})") from None


def _mismatch(want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]) -> str:
    if missing := sorted(set(want) - set(have)):
        return f"no tensor {missing[0]}"
    if extra := sorted(set(have) - set(want)):
        return f"unexpected tensor {extra[0]}"
    key = next(k for k in want if want[k] != have[k])
    return f"{key} has shape {list(have[key])}, expected {list(want[key])}"


def _args(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())
