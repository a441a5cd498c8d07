"""Shared plumbing of the loaders of released and foreign SAEs: gemma_scope.py, saelens.py and
dictionary_learning.py beside this file.

Owns: where a loader's files are (`path`: a local file or folder, or `hf://owner/repo/path/in/repo`
read through `huggingface_hub.hf_hub_download`, i.e. from the local Hugging Face cache or the
hub), building the suite's own architecture for a foreign one, copying weights into it with
their shapes checked, and recording where the weights came from on the module (`sae.source`, a
plain dict a result can store; `source_of(sae)` reads it, None for an SAE trained here).

A loaded SAE is an instance of the suite's own class (JumpReLUSAE, TopKSAE, GatedSAE, ReLUSAE,
BatchTopKSAE) whose outputs equal the foreign formula (each loader's docstring gives the map),
so it is evaluated by the suite's metrics with no special case. It reads raw activations of the
hooked site (no input normalisation): the released formats store weights in activation units.

Each format declares its weights as data, not as branches: a table from the format's own name
of an architecture to a `Layout` (the suite architecture it becomes, and {suite tensor: Rule},
a Rule being the file's tensor name, copied, or one of the exact transforms below), applied by
`map_tensors` in the table's order.

Files are data: every loader parses its files (JSON, safetensors, `torch.load(weights_only=True)`,
npz without pickles) and `reading` turns whatever a damaged, truncated or hostile file raises
into one ValueError that names the file.

Must not know Hydra, the data, the model or the trainer.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import huggingface_hub
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from baselines.base import SparseAutoencoder
from baselines.batchtopk import BatchTopKSAE
from baselines.gated import GatedSAE
from baselines.jumprelu import JumpReLUSAE
from baselines.relu import ReLUSAE
from baselines.topk import TopKSAE

HF = "hf://"
# The suite's architectures, by the names conf/sae/ uses.
SUITE: dict[str, type[SparseAutoencoder]] = {
    "jumprelu": JumpReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "gated": GatedSAE,
    "relu": ReLUSAE,
}


# How one suite tensor is made from a file's tensors `w` and its config `cfg`: the name of a
# tensor of the file (copied as is) or a function of both (`transposed`, `folded`, ...).
Rule = str | Callable[[Mapping[str, Tensor], Mapping[str, Any]], Tensor]


@dataclass(frozen=True)
class Layout:
    """How one architecture of a released format loads: `suite`, the suite architecture it
    becomes (a key of SUITE); `tensors`, {suite parameter or buffer: Rule}; `prepare`, an exact
    rewrite of the file's tensors applied before the rules (None: none)."""

    suite: str
    tensors: Mapping[str, Rule]
    prepare: Callable[[dict[str, Tensor], Mapping[str, Any]], dict[str, Tensor]] | None = None


def map_tensors(
    layout: Layout, w: Mapping[str, Tensor], cfg: Mapping[str, Any] | None = None
) -> dict[str, Tensor]:
    """The suite's tensors of `layout` from the file's tensors `w` (and its config `cfg`), in
    the layout's order (a missing tensor raises KeyError naming it)."""
    cfg = cfg or {}
    if layout.prepare is not None:
        w = layout.prepare(dict(w), cfg)
    return {k: w[r] if isinstance(r, str) else r(w, cfg) for k, r in layout.tensors.items()}


def transposed(name: str) -> Rule:
    """An nn.Linear weight, stored (out, in), as the suite's (in, out)."""
    return lambda w, cfg: w[name].t()


def folded(bias: str, weight: str = "W_enc") -> Rule:
    """The suite's encoder bias for a file whose encoder reads x without subtracting b_dec
    (`fold_input_bias` of the file's `weight`, `bias` and b_dec)."""
    return lambda w, cfg: fold_input_bias(w[weight], w[bias], w["b_dec"])


def clamped_threshold(name: str) -> Rule:
    """A foreign JumpReLU threshold as the suite's (`jumprelu_threshold`)."""
    return lambda w, cfg: jumprelu_threshold(w[name])


def scalar(name: str) -> Rule:
    """A one-element tensor as a 0-d one (BatchTopK's global threshold)."""
    return lambda w, cfg: w[name].reshape(())


def local_files(path: str | Path, names: Sequence[str]) -> list[Path]:
    """Local paths of the files `names` of one SAE.

    `path` is the SAE's folder or one file inside it. A local file given for a one-file format
    (Gemma Scope's params.npz) is used whatever its name. `hf://owner/repo/sub/folder` (or
    `.../sub/folder/<file>`) downloads `sub/folder/<name>` of the hub repo `owner/repo` (or
    takes it from the local Hugging Face cache).
    """
    text = str(path)
    if text.startswith(HF):
        return _hub_files(text, names)
    p = Path(text).expanduser()
    if p.is_file() and len(names) == 1:
        return [p]
    folder = p.parent if p.is_file() else p
    files = [folder / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"path={text!r}: missing {', '.join(missing)}")
    return files


def _hub_files(uri: str, names: Sequence[str]) -> list[Path]:
    parts = PurePosixPath(uri[len(HF) :]).parts
    if len(parts) < 2:
        raise ValueError(f"path={uri!r}: expected hf://owner/repo[/folder][/file]")
    repo_id, rest = "/".join(parts[:2]), "/".join(parts[2:])
    last = PurePosixPath(rest)
    # A file of the SAE, not its folder (folder names may hold dots: blocks.6.hook_resid_post).
    if rest and (last.name in names or (len(names) == 1 and last.suffix == Path(names[0]).suffix)):
        if len(names) == 1:
            return [Path(_download(repo_id, rest))]
        rest = str(last.parent).removeprefix(".")
    return [Path(_download(repo_id, f"{rest}/{n}" if rest else n)) for n in names]


def _download(repo_id: str, filename: str) -> str:
    # Looked up on the module at call time, so tests can stand in for the hub.
    return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename)


# What parsing a damaged, truncated, foreign or hostile file raises (a pickle outside
# torch.load's weights-only allow-list: UnpicklingError; a bad safetensors header:
# SafetensorError; a cut zip: BadZipFile or EOFError; a missing tensor: KeyError).
PARSE_ERRORS = (
    ValueError, KeyError, IndexError, TypeError, OSError, EOFError, RuntimeError,
    pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError,
)  # fmt: skip


@contextmanager
def reading(file: str | Path, what: str) -> Iterator[None]:
    """Parse errors inside the block become one ValueError naming `file` (a missing file keeps
    its FileNotFoundError): a loader's caller prints one line, never a traceback."""
    try:
        yield
    except FileNotFoundError:
        raise
    except PARSE_ERRORS as e:
        text = refusal(e)
        if isinstance(e, ValueError) and not isinstance(e, pickle.UnpicklingError):
            raise ValueError(text if str(file) in text else f"{file}: {text}") from None
        raise ValueError(f"{file}: not a readable {what} ({type(e).__name__}: {text})") from None


def load_plain(file: str | Path, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` onto the CPU: tensors, numbers, strings and containers;
    any other pickled object raises UnpicklingError and nothing runs. mmap: map the tensors'
    data instead of reading it (a cheap check of a large file; torch.save's zip format only).
    Torch's warning about a pickle protocol it did not write is silenced (the refusal itself
    says what was wrong)."""
    mmap = mmap and zipfile.is_zipfile(file)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)


def safetensors_shapes(file: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, no tensor read (safetensors refuses an
    oversize header and offsets outside the file)."""
    with safe_open(file, framework="pt", device="cpu") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def refusal(e: BaseException) -> str:
    """One line saying why a file was refused; for torch's weights-only unpickler, the object
    it refused (its own message is a page of advice to load the file with code execution on)."""
    text = str(e)
    if m := re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|Check the documentation|$)",
                      text, re.S):  # fmt: skip
        text = "refused to unpickle " + m[1]
    return " ".join(text.split())[:300] or type(e).__name__


def check_sizes(fmt: str, d_in: int | None, d_sae: int | None, found: tuple[int, int]) -> None:
    """A size the caller expects (the runner's site width) must be the file's."""
    for name, want, have in (("d_in", d_in, found[0]), ("d_sae", d_sae, found[1])):
        if want is not None and int(want) != have:
            hint = " (the width of the hooked site)" if name == "d_in" else ""
            raise ValueError(f"the {fmt} SAE has {name}={have}, but {name}={want} was asked{hint}")


def build(architecture: str, d_in: int, d_sae: int, k: int | None = None) -> SparseAutoencoder:
    """A fresh suite SAE of `architecture` (a key of SUITE), weights to be copied in; a TopK
    class (TopK, BatchTopK) takes the file's k."""
    if architecture not in SUITE:
        raise ValueError(f"architecture={architecture!r}; the suite has {', '.join(SUITE)}")
    cls = SUITE[architecture]
    if issubclass(cls, TopKSAE):
        if k is None:
            raise ValueError(f"architecture={architecture} needs k")
        return cls(d_in, d_sae, k=int(k))
    return cls(d_in, d_sae)


def fresh(
    fmt: str, architecture: str | None, d_in: int | None, d_sae: int | None, k: int | None = None
) -> SparseAutoencoder:
    """What a loader builds without a path: an untrained suite SAE (default JumpReLU), so that
    its conf/sae/ entry composes and builds like every other (tests, reloads)."""
    if d_in is None or d_sae is None:
        raise ValueError(f"sae={fmt}: give sae.path=<file, folder or hf://...>")
    return build(architecture or "jumprelu", int(d_in), int(d_sae), k)


@torch.no_grad()
def assign(sae: SparseAutoencoder, tensors: Mapping[str, Tensor]) -> SparseAutoencoder:
    """Copy each tensor into the parameter or buffer of that name (fp32), shapes checked."""
    for name, value in tensors.items():
        target = getattr(sae, name)
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"{name}: the file's shape {tuple(value.shape)} is not the expected "
                f"{tuple(target.shape)}"
            )
        target.copy_(value.to(target.dtype))
    return sae


def fold_input_bias(W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """The suite's b_enc for an encoder that reads x without subtracting b_dec.

    Foreign: pre = x W_enc + b_enc. Suite: pre = (x - b_dec) W_enc + b_enc'. Equal for every x
    iff b_enc' = b_enc + b_dec W_enc (computed in float64). `unfold_input_bias` inverts it.
    """
    return (b_enc.double() + b_dec.double() @ W_enc.double()).to(b_enc.dtype)


def unfold_input_bias(W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    return (b_enc.double() - b_dec.double() @ W_enc.double()).to(b_enc.dtype)


def record_source(sae: SparseAutoencoder, source: dict[str, Any]) -> SparseAutoencoder:
    """Attach {format, path, ...} to a loaded SAE (not a parameter: it is not saved)."""
    sae.source = dict(source)  # type: ignore[assignment]
    return sae


def suite_node(sae: SparseAutoencoder) -> dict[str, Any]:
    """The config node of a loaded SAE's own suite class, for `benchmark.saes.save_sae`: reloading
    it (instantiate + load_state_dict) rebuilds the same SAE without the foreign files."""
    cls = type(sae)
    node: dict[str, Any] = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
    node |= {"d_in": sae.d_in, "d_sae": sae.d_sae}
    if isinstance(sae, TopKSAE):  # BatchTopK too
        node["k"] = sae.k
    if isinstance(sae, JumpReLUSAE):
        node["threshold_param"] = sae.threshold_param
    return node


def source_of(sae: SparseAutoencoder) -> dict[str, Any] | None:
    """Where a loaded SAE's weights came from, or None for an SAE trained by the suite."""
    return getattr(sae, "source", None)


def jumprelu_threshold(threshold: Tensor) -> Tensor:
    """Foreign JumpReLUs compute ReLU(pre) * 1[pre > theta] (Gemma Scope, SAE-Lens,
    dictionary_learning), which equals the suite's pre * 1[pre > theta] with theta clamped at 0."""
    return threshold.clamp_min(0.0)
