"""Released and foreign SAE formats: loaders against each format's own formula, exports round trip.

The files are written here, offline, from the formats' published definitions (Gemma Scope's
tutorial, SAE-Lens 6.x's sae_lens/saes/*.py, dictionary_learning's dictionary.py): the reference
forwards below restate those definitions and share no code with interop/.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.nn.functional import relu

from baselines.batchtopk import BatchTopKSAE
from baselines.gated import GatedSAE
from baselines.jumprelu import JumpReLUSAE
from baselines.relu import ReLUSAE
from baselines.topk import TopKSAE
from benchmark import export as export_cli
from benchmark.saes import build_sae, load_sae, sae_node, save_sae
from benchmark.validate import check_targets
from interop import dictionary_learning as dl_module
from interop import gemma_scope as gemma_module
from interop import saelens as saelens_module
from interop.dictionary_learning import load_dictionary_learning
from interop.foreign import SUITE, build, source_of, suite_node
from interop.gemma_scope import load_gemma_scope
from interop.saelens import load_saelens
from tests.helpers import compose_config

D_IN, D_SAE, K = 12, 40, 10  # K: the TopK k (conf/sparsity/l0_10)
HOOK = "blocks.6.hook_resid_post"


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _x(seed=0, n=64):
    return torch.randn(n, D_IN, generator=_g(seed)) + 0.3


def _topk(pre, k):
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, relu(top.values))


def _close(got, want, tol):
    torch.testing.assert_close(got.f, want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got.x_hat, want[1], rtol=tol, atol=tol)


# --- Gemma Scope --------------------------------------------------------------------------------
def _gemma_params(seed=1):
    g = _g(seed)
    p = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) / D_SAE**0.5,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(D_IN, generator=g) * 0.5,  # large: the encoder convention matters
        "threshold": torch.rand(D_SAE, generator=g) * 0.6,
    }
    return {k: v.numpy() for k, v in p.items()}


def gemma_scope_forward(p, x):
    """Gemma Scope's tutorial: pre = x W_enc + b_enc (no b_dec subtracted)."""
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    f = (pre > t["threshold"]) * relu(pre)
    return f, f @ t["W_dec"] + t["b_dec"]


def test_gemma_scope_outputs_equal_its_formula(tmp_path):
    p = _gemma_params()
    np.savez(tmp_path / "params.npz", **p)
    x = _x()
    for path in (tmp_path / "params.npz", tmp_path):  # the file or its folder
        sae = load_gemma_scope(str(path), d_in=D_IN)
        assert type(sae) is JumpReLUSAE and (sae.d_in, sae.d_sae) == (D_IN, D_SAE)
        want = gemma_scope_forward(p, x)
        assert 0.1 < (want[0] > 0).float().mean() < 0.9  # a non-trivial active set
        _close(sae(x), want, 1e-5)
        assert source_of(sae)["format"] == "gemma_scope"
        assert source_of(sae)["path"] == str(path)
    # Without the fold (b_enc copied as is) pre would be off by b_dec W_enc: the test has teeth.
    shift = torch.from_numpy(p["b_dec"]) @ torch.from_numpy(p["W_enc"])
    assert shift.abs().max() > 0.3


def test_gemma_scope_from_the_hub_path(tmp_path, monkeypatch):
    np.savez(tmp_path / "params.npz", **_gemma_params())
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        return str(tmp_path / "params.npz")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    hub = "hf://google/gemma-scope-9b-pt-res/layer_20/width_131k/average_l0_68/params.npz"
    sae = load_gemma_scope(hub)
    assert calls == [
        ("google/gemma-scope-9b-pt-res", "layer_20/width_131k/average_l0_68/params.npz")
    ]
    assert source_of(sae)["path"] == hub


def test_gemma_scope_through_the_config_and_size_check(tmp_path):
    np.savez(tmp_path / "params.npz", **_gemma_params())
    cfg = compose_config(["sae=gemma_scope", f"sae.path={tmp_path / 'params.npz'}"])
    check_targets(cfg)
    sae = instantiate(cfg.sae, d_in=D_IN)  # evaluate-only: sizes from the file, d_in checked
    assert sae.d_sae == D_SAE
    with pytest.raises(InstantiationException, match=r"d_in=12, but d_in=576 was asked"):
        instantiate(cfg.sae, d_in=576)
    with pytest.raises(InstantiationException, match="sae.path"):
        instantiate(compose_config(["sae=gemma_scope"]).sae)


# --- SAE-Lens -----------------------------------------------------------------------------------
def _saelens_files(folder, arch, centred=True, threshold="threshold", rescale=False, seed=2):
    """A folder as SAE-Lens 6.x saves an inference SAE (cfg.json + sae_weights.safetensors)."""
    g = _g(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * (0.5 if rescale else 0.2),
        "b_dec": torch.randn(D_IN, generator=g) * 0.5,
    }
    if arch == "gated":
        w |= {k: torch.randn(D_SAE, generator=g) * 0.2 for k in ("b_gate", "b_mag", "r_mag")}
    else:
        w["b_enc"] = torch.randn(D_SAE, generator=g) * 0.1
    if arch == "jumprelu":
        theta = torch.rand(D_SAE, generator=g) * 0.5 + 0.05
        w[threshold] = theta.log() if threshold == "log_threshold" else theta
    cfg = {
        "architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": centred, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.18.0", "hook_name": HOOK, "model_name": "gpt2"},
    }  # fmt: skip
    if arch == "topk":
        cfg |= {"k": K, "rescale_acts_by_decoder_norm": rescale}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return cfg, w


def saelens_forward(cfg, w, x):
    """SAE-Lens 6.x inference forward (sae_lens/saes/*_sae.py encode/decode)."""
    sae_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    arch, W_dec = cfg["architecture"], w["W_dec"]
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        f = gate * relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
        return f, f @ W_dec + w["b_dec"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        f = relu(pre)
    elif arch == "jumprelu":
        theta = w["threshold"] if "threshold" in w else w["log_threshold"].exp()
        f = relu(pre) * (pre > theta).float()
    else:  # topk
        norms = W_dec.norm(dim=-1) if cfg["rescale_acts_by_decoder_norm"] else torch.ones(D_SAE)
        f = _topk(pre * norms, cfg["k"])
        return f, (f / norms) @ W_dec + w["b_dec"]
    return f, f @ W_dec + w["b_dec"]


SAELENS_CASES = [
    ("standard", {}, ReLUSAE),
    ("jumprelu", {}, JumpReLUSAE),
    ("jumprelu", {"threshold": "log_threshold"}, JumpReLUSAE),
    ("topk", {}, TopKSAE),
    ("topk", {"rescale": True}, TopKSAE),
    ("gated", {}, GatedSAE),
]


@pytest.mark.parametrize("centred", [True, False], ids=["b_dec_to_input", "raw_input"])
@pytest.mark.parametrize(("arch", "kw", "cls"), SAELENS_CASES)
def test_saelens_outputs_equal_its_forward(tmp_path, arch, kw, cls, centred):
    cfg, w = _saelens_files(tmp_path, arch, centred=centred, **kw)
    sae = load_saelens(str(tmp_path), d_in=D_IN)
    assert type(sae) is cls
    x = _x()
    want = saelens_forward(cfg, w, x)
    assert 0.05 < (want[0] > 0).float().mean() < 0.95
    _close(sae(x), want, 1e-5)
    src = source_of(sae)
    assert (src["format"], src["hook_name"], src["architecture"]) == ("saelens", HOOK, arch)


def test_saelens_pre_6_config_and_hub_folder(tmp_path, monkeypatch):
    cfg, w = _saelens_files(tmp_path / "l6", "topk")
    old = {k: v for k, v in cfg.items() if k not in ("metadata", "architecture", "k")}
    old |= {"hook_point": HOOK, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}}
    (tmp_path / "l6" / "cfg.json").write_text(json.dumps(old))
    asked = []

    def download(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    sae = load_saelens("hf://someone/saes/l6")
    assert asked == [
        ("someone/saes", "l6/cfg.json"),
        ("someone/saes", "l6/sae_weights.safetensors"),
    ]
    asked.clear()  # a folder name with dots, or the cfg.json inside it, names the same folder
    (tmp_path / "blocks.6.hook_resid_post").symlink_to(tmp_path / "l6")
    load_saelens("hf://someone/saes/blocks.6.hook_resid_post")
    load_saelens("hf://someone/saes/blocks.6.hook_resid_post/cfg.json")
    assert asked == 2 * [
        ("someone/saes", "blocks.6.hook_resid_post/cfg.json"),
        ("someone/saes", "blocks.6.hook_resid_post/sae_weights.safetensors"),
    ]
    assert type(sae) is TopKSAE and sae.k == K and source_of(sae)["hook_name"] == HOOK
    _close(sae(_x()), saelens_forward(cfg, w, _x()), 1e-5)


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_saelens_refuses_run_time_normalisation(tmp_path, norm):
    cfg, _ = _saelens_files(tmp_path, "standard")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"normalize_activations": norm}))
    with pytest.raises(ValueError, match=norm):
        load_saelens(str(tmp_path))


# --- dictionary_learning ------------------------------------------------------------------------
def _dl_state(dict_class, seed=3):
    """A state dict with dictionary_learning's names and nn.Linear (out, in) layouts."""
    g = _g(seed)
    enc, dec = (
        torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5,
        torch.randn(D_IN, D_SAE, generator=g) * 0.2,
    )
    vec = lambda n, s=0.2: torch.randn(n, generator=g) * s  # noqa: E731
    if dict_class == "AutoEncoder":
        return {"bias": vec(D_IN, 0.5), "encoder.weight": enc, "encoder.bias": vec(D_SAE),
                "decoder.weight": dec}  # fmt: skip
    if dict_class == "GatedAutoEncoder":
        return {"decoder_bias": vec(D_IN, 0.5), "encoder.weight": enc, "r_mag": vec(D_SAE),
                "gate_bias": vec(D_SAE), "mag_bias": vec(D_SAE), "decoder.weight": dec}  # fmt: skip
    if dict_class == "JumpReluAutoEncoder":
        theta = torch.rand(D_SAE, generator=g) * 0.5
        theta[:3] = -0.1  # a negative threshold: ReLU(pre * 1[pre > theta]) keeps it exact
        return {"W_enc": enc.t().contiguous(), "b_enc": vec(D_SAE), "W_dec": dec.t().contiguous(),
                "b_dec": vec(D_IN, 0.5), "threshold": theta}  # fmt: skip
    return {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.15),
            "decoder.weight": dec, "encoder.weight": enc, "encoder.bias": vec(D_SAE),
            "b_dec": vec(D_IN, 0.5)}  # fmt: skip


def dictionary_learning_forward(dict_class, s, x):
    """dictionary_learning's forward per class (dictionary.py, trainers/top_k.py, batch_top_k.py)."""
    if dict_class == "AutoEncoder":
        f = relu((x - s["bias"]) @ s["encoder.weight"].t() + s["encoder.bias"])
        return f, f @ s["decoder.weight"].t() + s["bias"]
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].t()
        f = (x_enc + s["gate_bias"] > 0).float() * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, f @ s["decoder.weight"].t() + s["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = relu(pre * (pre > s["threshold"]).float())
        return f, f @ s["W_dec"] + s["b_dec"]
    post = relu((x - s["b_dec"]) @ s["encoder.weight"].t() + s["encoder.bias"])
    f = _topk(post, K) if dict_class == "AutoEncoderTopK" else post * (post > s["threshold"])
    return f, f @ s["decoder.weight"].t() + s["b_dec"]


DL_CASES = [
    ("AutoEncoder", ReLUSAE),
    ("GatedAutoEncoder", GatedSAE),
    ("JumpReluAutoEncoder", JumpReLUSAE),
    ("AutoEncoderTopK", TopKSAE),
    ("BatchTopKSAE", BatchTopKSAE),
]


@pytest.mark.parametrize(("dict_class", "cls"), DL_CASES)
def test_dictionary_learning_outputs_equal_its_forward(tmp_path, dict_class, cls):
    state = _dl_state(dict_class)
    torch.save(state, tmp_path / "ae.pt")
    trainer = {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE,
               "layer": 6, "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_6"}  # fmt: skip
    if "TopK" in dict_class:
        trainer["k"] = K
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))
    sae = load_dictionary_learning(str(tmp_path), d_in=D_IN, d_sae=D_SAE)
    assert type(sae) is cls and not sae.training
    x = _x()
    want = dictionary_learning_forward(dict_class, state, x)
    assert 0.05 < (want[0] > 0).float().mean() < 0.95
    _close(sae(x), want, 1e-5)
    assert source_of(sae)["dict_class"] == dict_class and source_of(sae)["layer"] == 6


def test_dictionary_learning_refuses_unknown_classes(tmp_path):
    torch.save({}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderNew"}}))
    with pytest.raises(ValueError, match="supported: AutoEncoder"):
        load_dictionary_learning(str(tmp_path))


# --- the declarative maps -------------------------------------------------------------------
LAYOUTS = {
    **{f"saelens {n}": lay for n, lay in saelens_module.ARCHITECTURES.items()},
    **{f"dictionary_learning {n}": lay for n, lay in dl_module.DICT_CLASSES.items()},
    "gemma_scope": gemma_module.LAYOUT,
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_format_map_fills_every_tensor_of_its_suite_class(name):
    """Each declared map names a suite architecture and sets every parameter and buffer of it,
    nothing else: a loaded SAE holds no tensor left at its initialisation."""
    layout = LAYOUTS[name]
    assert layout.suite in SUITE
    sae = build(layout.suite, D_IN, D_SAE, k=K)
    assert list(layout.tensors) and set(layout.tensors) == set(sae.state_dict())


# --- export: our SAE -> format -> our loader ----------------------------------------------------
@torch.no_grad()
def _trained_like(name, seed=4):
    """A suite SAE from conf/sae/<name>.yaml with every parameter moved off its init."""
    torch.manual_seed(seed)
    sae = build_sae(compose_config([f"sae={name}", f"sparsity=l0_{K}"]).sae, D_IN, D_SAE)
    for pname, p in sae.named_parameters():
        p.add_(torch.randn_like(p) * (0.1 if pname != "raw_threshold" else 0.0))
    if isinstance(sae, JumpReLUSAE):
        sae.raw_threshold.copy_(torch.rand(D_SAE) * 0.4 + 0.05)
    if isinstance(sae, BatchTopKSAE):
        sae.threshold.fill_(0.2)
    return sae.eval()


def _run_dir(tmp_path, name):
    sae = _trained_like(name)
    run = tmp_path / "run"
    save_sae(
        sae, run, sae_node(compose_config([f"sae={name}", f"sparsity=l0_{K}"]).sae, D_IN, D_SAE)
    )
    result = {"run_id": "run", "status": "complete", "hook": HOOK, "model": "smollm2_135m",
              "d_in": D_IN, "d_sae": D_SAE}  # fmt: skip
    (run / "result.json").write_text(json.dumps(result))
    return sae, run


BATCHTOPKS = ("batchtopk", "matryoshka_batchtopk")  # both infer as a JumpReLU, one threshold
EXPORTS = [("saelens", n) for n in ("jumprelu", "topk", *BATCHTOPKS, "gated", "relu")] + [
    ("gemma_scope", n) for n in ("jumprelu", *BATCHTOPKS)
]


@pytest.mark.parametrize(("fmt", "name"), EXPORTS)
def test_export_round_trip_identical(tmp_path, fmt, name):
    sae, run = _run_dir(tmp_path, name)
    assert export_cli.main([str(run), "--format", fmt, "--out", str(tmp_path / "out")]) == 0
    load = load_saelens if fmt == "saelens" else load_gemma_scope
    again = load(str(tmp_path / "out"), d_in=D_IN, d_sae=D_SAE)
    x = _x(seed=7) * 2
    a, b = sae(x), again(x)
    assert 0.02 < (a.f > 0).float().mean() < 0.98
    torch.testing.assert_close(b.f, a.f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.x_hat, a.x_hat, rtol=1e-6, atol=1e-6)


def test_export_refuses_a_format_that_cannot_hold_the_architecture(tmp_path, capsys):
    _, run = _run_dir(tmp_path, "topk")
    assert export_cli.main([str(run), "--format", "gemma_scope", "--out", str(tmp_path / "o")]) == 2
    assert "JumpReLU" in capsys.readouterr().err


# The fields SAE-Lens 6.x's inference configs define (SAEConfig + per-architecture dataclass,
# serialised by SAEConfig.to_dict with "architecture" and "metadata"), and the tensors its
# inference classes hold (threshold for jumprelu; gated has no b_enc).
SAELENS_BASE = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "reshape_activations", "metadata"}  # fmt: skip
SAELENS_FIELDS = {
    "standard": SAELENS_BASE,
    "jumprelu": SAELENS_BASE,
    "gated": SAELENS_BASE,
    "topk": SAELENS_BASE | {"k", "rescale_acts_by_decoder_norm"},
}
SAELENS_TENSORS = {
    "standard": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "jumprelu": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"},
    "topk": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "gated": {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"},
}
SAELENS_SHAPES = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}


@pytest.mark.parametrize(
    ("name", "arch"),
    [("relu", "standard"), ("jumprelu", "jumprelu"), ("batchtopk", "jumprelu"),
     ("matryoshka_batchtopk", "jumprelu"), ("topk", "topk"), ("gated", "gated")],
)  # fmt: skip
def test_exported_saelens_cfg_matches_the_6x_schema(tmp_path, name, arch):
    _, run = _run_dir(tmp_path, name)
    export_cli.export(run, "saelens", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert set(cfg) == SAELENS_FIELDS[arch] and cfg["architecture"] == arch
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert cfg["dtype"] in ("float32", "float64", "float16", "bfloat16")
    assert cfg["normalize_activations"] in (
        "none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"
    )  # fmt: skip
    assert cfg["reshape_activations"] in ("none", "hook_z") and cfg["apply_b_dec_to_input"] is True
    meta = cfg["metadata"]
    assert meta["hook_name"] == HOOK and meta["model_name"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else SAE-Lens reads it as pre-6.0
    if arch == "topk":
        assert cfg["k"] == K and isinstance(cfg["rescale_acts_by_decoder_norm"], bool)
    tensors = load_file(tmp_path / "out" / "sae_weights.safetensors")
    assert set(tensors) == SAELENS_TENSORS[arch]
    for key, t in tensors.items():
        assert tuple(t.shape) == SAELENS_SHAPES.get(key, (D_SAE,)) and t.dtype == torch.float32


@pytest.mark.parametrize(("dict_class", "cls"), DL_CASES)
def test_loaded_sae_saves_and_reloads_without_the_foreign_files(tmp_path, dict_class, cls):
    """What an evaluate-only run saves: the suite class's node + the mapped weights."""
    state = _dl_state(dict_class)
    torch.save(state, tmp_path / "ae.pt")
    trainer = {"dict_class": dict_class, "k": K}
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer}))
    sae = load_dictionary_learning(str(tmp_path))
    save_sae(sae, tmp_path / "run", OmegaConf.create(suite_node(sae)))
    (tmp_path / "ae.pt").unlink()
    again = load_sae(tmp_path / "run").eval()
    assert type(again) is cls
    x = _x(seed=9)
    assert torch.equal(again(x).f, sae(x).f) and torch.equal(again(x).x_hat, sae(x).x_hat)
