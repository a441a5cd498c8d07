"""SAE-Lens's saved layout (6.x): a folder with `cfg.json` and `sae_weights.safetensors`.

Read and written as SAE-Lens 6.x's inference SAEs define them (sae_lens/saes/*.py, checked
against the 6.18 source). cfg.json holds the `SAEConfig` fields: architecture, d_in, d_sae,
dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations, metadata
(hook_name, model_name, sae_lens_version, ...), plus `k` and `rescale_acts_by_decoder_norm` for
topk. With sae_in = x - b_dec when apply_b_dec_to_input else x:

    standard  f = ReLU(sae_in W_enc + b_enc)                                   -> ReLUSAE
    jumprelu  pre = sae_in W_enc + b_enc, f = ReLU(pre) * 1[pre > threshold]   -> JumpReLUSAE
    topk      pre = sae_in W_enc + b_enc (times ||W_dec_i|| when rescale_acts_by_decoder_norm),
              f = ReLU(TopK_k(pre)), decoded as (f / ||W_dec_i||) W_dec      -> TopKSAE
    gated     f = 1[sae_in W_enc + b_gate > 0] * ReLU(sae_in (W_enc exp(r_mag)) + b_mag)
                                                                                -> GatedSAE
    all       x_hat = f W_dec + b_dec

Maps, all exact: apply_b_dec_to_input=false folds b_dec into the encoder biases
(`foreign.fold_input_bias`); rescale_acts_by_decoder_norm folds the norms into W_enc, b_enc
and W_dec; the JumpReLU threshold is stored as `threshold`, or as `log_threshold` by earlier
training code: both load. normalize_activations "none" and "expected_average_only_in" (no
run-time transform in SAE-Lens's forward) load; "constant_norm_rescale" and "layer_norm"
normalise each token at run time, which no suite architecture does, and are refused. Configs
from before 6.0 (hook_point, activation_fn "topk" with activation_fn_kwargs.k) are read too.
SAE-Lens saves a trained BatchTopK SAE as a jumprelu; the suite's BatchTopK is written so too.
The maps are data: `ARCHITECTURES` (SAE-Lens architecture -> `foreign.Layout`, for reading)
and `WRITTEN_AS` (suite class -> SAE-Lens architecture, tensors and fields, for writing).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from baselines.base import SparseAutoencoder
from baselines.batchtopk import BatchTopKSAE
from baselines.gated import GatedSAE
from baselines.jumprelu import JumpReLUSAE
from baselines.relu import ReLUSAE
from baselines.topk import TopKSAE
from interop.foreign import (
    Layout,
    Rule,
    assign,
    build,
    check_sizes,
    fold_input_bias,
    fresh,
    jumprelu_threshold,
    local_files,
    map_tensors,
    reading,
    record_source,
    safetensors_shapes,
)

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
SAELENS_VERSION = "6.18.0"  # the version whose source this layout was checked against
IDENTITY_NORMS = ("none", "expected_average_only_in")


def encoder_bias(bias: str, weight: Callable[[Mapping[str, Tensor]], Tensor] | None = None) -> Rule:
    """An encoder bias: copied when cfg.json's apply_b_dec_to_input (default true), else b_dec
    folded in through the matrix it multiplies (`weight(w)`, default W_enc)."""

    def rule(w: Mapping[str, Tensor], cfg: Mapping[str, Any]) -> Tensor:
        if bool(cfg.get("apply_b_dec_to_input", True)):
            return w[bias]
        return fold_input_bias(w["W_enc"] if weight is None else weight(w), w[bias], w["b_dec"])

    return rule


def _magnitude_encoder(w: Mapping[str, Tensor]) -> Tensor:
    return w["W_enc"] * w["r_mag"].exp()


def _threshold(w: Mapping[str, Tensor], cfg: Mapping[str, Any]) -> Tensor:
    """`threshold`, or `log_threshold` (earlier training code), as the suite's threshold."""
    return jumprelu_threshold(w["threshold"] if "threshold" in w else w["log_threshold"].exp())


def _rescaled(w: dict[str, Tensor], cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """rescale_acts_by_decoder_norm folded into W_enc, b_enc and W_dec (exact)."""
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = w["W_dec"].norm(dim=-1)  # (d_sae,)
        w |= {"W_enc": w["W_enc"] * norms, "b_enc": w["b_enc"] * norms}
        w["W_dec"] = w["W_dec"] / norms[:, None]
    return w


# SAE-Lens architecture -> the suite's, with the exact weight map of the module docstring.
COPIED = {"W_dec": "W_dec", "b_dec": "b_dec", "W_enc": "W_enc"}  # the same in every one
ARCHITECTURES: dict[str, Layout] = {
    "standard": Layout("relu", {**COPIED, "b_enc": encoder_bias("b_enc")}),
    "jumprelu": Layout(
        "jumprelu", {**COPIED, "b_enc": encoder_bias("b_enc"), "raw_threshold": _threshold}
    ),
    "topk": Layout("topk", {**COPIED, "b_enc": encoder_bias("b_enc")}, prepare=_rescaled),
    "gated": Layout("gated", {
        **COPIED, "r_mag": "r_mag", "b_gate": encoder_bias("b_gate"),
        "b_mag": encoder_bias("b_mag", _magnitude_encoder),
    }),
}  # fmt: skip


def load_saelens(
    path: str | None = None,
    d_in: int | None = None,
    d_sae: int | None = None,
    architecture: str | None = None,
    k: int | None = None,
) -> SparseAutoencoder:
    """The SAE-Lens SAE saved at `path` (a folder, its cfg.json, or hf://owner/repo/folder).

    d_in, d_sae: sizes the caller expects, checked against cfg.json. architecture (the suite's
    name: relu, jumprelu, topk, gated): when set, must be the file's. Without a path: a fresh
    suite SAE of `architecture` (default jumprelu; k for topk) of size d_in x d_sae.
    """
    if path is None:
        return fresh("saelens", architecture, d_in, d_sae, k)
    cfg_file, weights_file = local_files(path, [CFG, WEIGHTS])
    with reading(cfg_file, "SAE-Lens cfg.json"):
        cfg = json.loads(cfg_file.read_text())
        name, k_file, meta = _read_cfg(cfg)
        layout = ARCHITECTURES[name]
        if architecture is not None and architecture != layout.suite:
            raise ValueError(f"architecture {layout.suite!r}, but sae.architecture={architecture}")
        found = (int(cfg["d_in"]), int(cfg["d_sae"]))
        check_sizes("SAE-Lens", d_in, d_sae, found)
    with reading(weights_file, "SAE-Lens weights file"):
        # The header first: the SAE built from cfg.json's sizes must be the file's size.
        shape = safetensors_shapes(weights_file).get("W_enc")
        if shape != found:
            raise ValueError(f"W_enc has shape {shape}, but {CFG} says d_in x d_sae = {found}")
        w = {name: t.float() for name, t in load_file(weights_file).items()}
        sae = build(layout.suite, *found, k=k_file)
        if "scaling_factor" in w and not torch.all(w["scaling_factor"] == 1):
            raise ValueError("SAE-Lens finetuning scaling_factor is not supported")
        assign(sae, map_tensors(layout, w, cfg))
    source = {
        "format": "saelens", "path": str(path), "folder": str(cfg_file.parent),
        "architecture": cfg.get("architecture", "standard"), "d_in": found[0], "d_sae": found[1],
        "hook_name": meta.get("hook_name"), "model_name": meta.get("model_name"),
        "dtype": cfg.get("dtype"), "sae_lens_version": meta.get("sae_lens_version"),
    }  # fmt: skip
    return record_source(sae.eval(), source)


def _read_cfg(cfg: dict[str, Any]) -> tuple[str, int | None, dict[str, Any]]:
    """(SAE-Lens architecture, k, metadata) of a cfg.json, 6.x or earlier."""
    meta = dict(cfg.get("metadata") or {})
    for key in ("hook_name", "model_name", "sae_lens_version"):  # top level before 6.0
        meta.setdefault(
            key, cfg.get(key) or (cfg.get("hook_point") if key == "hook_name" else None)
        )
    arch, k = cfg.get("architecture", "standard"), cfg.get("k")
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    if act == "topk":
        arch, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    elif act not in (None, "relu"):
        raise ValueError(f"SAE-Lens activation_fn={act!r}: only relu and topk are supported")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"SAE-Lens architecture={arch!r}: supported {', '.join(ARCHITECTURES)} "
            "(SAE-Lens saves BatchTopK SAEs as jumprelu)"
        )
    norm = cfg.get("normalize_activations") or "none"
    if isinstance(norm, bool):  # before 6.0: true meant expected_average_only_in
        norm = "expected_average_only_in" if norm else "none"
    if norm not in IDENTITY_NORMS:
        raise ValueError(
            f"SAE-Lens normalize_activations={norm!r} rescales each token at run time, which "
            f"the suite's architectures do not; supported: {', '.join(IDENTITY_NORMS)}"
        )
    return arch, (int(k) if k is not None else None), meta


@dataclass(frozen=True)
class Written:
    """How a suite class is written: the SAE-Lens `architecture`, its `tensors` beside W_enc,
    W_dec and b_dec, and its `fields` of cfg.json beside SAEConfig's common ones."""

    cls: type[SparseAutoencoder]
    architecture: str
    tensors: Callable[[Any], dict[str, Tensor]]
    fields: Callable[[Any], dict[str, Any]] = field(default=lambda sae: {})


# The suite's classes -> SAE-Lens's; the first class the SAE is an instance of is used
# (BatchTopK and Matryoshka BatchTopK, subclasses of TopK, infer as a JumpReLU with one shared
# threshold).
WRITTEN_AS = (
    Written(BatchTopKSAE, "jumprelu", lambda sae: {
        "b_enc": sae.b_enc, "threshold": sae.threshold.clamp_min(0.0).expand(sae.d_sae)}),
    Written(TopKSAE, "topk", lambda sae: {"b_enc": sae.b_enc},
            lambda sae: {"k": sae.k, "rescale_acts_by_decoder_norm": False}),
    Written(JumpReLUSAE, "jumprelu", lambda sae: {"b_enc": sae.b_enc, "threshold": sae.threshold}),
    Written(GatedSAE, "gated", lambda sae: {
        "b_gate": sae.b_gate, "b_mag": sae.b_mag, "r_mag": sae.r_mag}),
    Written(ReLUSAE, "standard", lambda sae: {"b_enc": sae.b_enc}),
)  # fmt: skip


@torch.no_grad()
def write_saelens(
    sae: SparseAutoencoder, folder: str | Path, metadata: dict[str, Any]
) -> tuple[Path, Path]:
    """Write a suite SAE as SAE-Lens 6.x would save its inference SAE (`WRITTEN_AS`);
    `metadata` holds at least hook_name and model_name. Returns (cfg.json,
    sae_weights.safetensors)."""
    written = next((x for x in WRITTEN_AS if isinstance(sae, x.cls)), None)
    if written is None:
        raise TypeError(f"no SAE-Lens architecture for {type(sae).__name__}")
    hook = str(metadata.get("hook_name") or "")
    cfg = {
        "architecture": written.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
        **written.fields(sae),
        "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
                     "hook_head_index": None, "prepend_bos": True, **metadata},
    }  # fmt: skip
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, **written.tensors(sae)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, folder / WEIGHTS
    )
    (folder / CFG).write_text(json.dumps(cfg, indent=2))
    return folder / CFG, folder / WEIGHTS
