"""Files from others are data, never code (docs/security.md): a hostile or broken checkpoint,
saved SAE config, foreign SAE or weights file is refused with one line naming it, and nothing in
it runs. Each payload, if it ever ran, would create a marker file (or delete a file); every test
checks that it did not and that the folder's other files are unchanged. ~1 min in all."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from baselines.topk import TopKSAE
from benchmark.errors import ConfigError
from benchmark.saes import load_sae, save_sae
from benchmark.train import Sparsity, TrainConfig, Trainer, read_checkpoint
from interop.dictionary_learning import load_dictionary_learning
from interop.gemma_scope import load_gemma_scope
from interop.saelens import load_saelens
from tests.helpers import compose_config, one_error_line, run_cli

D_IN, D_SAE = 8, 32


class Payload:
    """Unpickling this calls `func(*args)`: a stand-in for any code a pickle can run."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch(marker: Path) -> Payload:
    return Payload(os.system, f"touch {marker}")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


def saved_topk(folder: Path) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(D_IN, D_SAE, k=4)
    node = {"_target_": "baselines.topk.TopKSAE", "d_in": D_IN, "d_sae": D_SAE, "k": 4}
    save_sae(sae, folder, OmegaConf.create(node))
    return sae


# ---- checkpoints --------------------------------------------------------------------------


def test_a_hostile_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "checkpoint.pt"
    with open(ckpt, "wb") as fh:  # what a hostile checkpoint is: a pickle that runs a command
        pickle.dump({"format": 2, "sae": {}, "opt": {}, "state": touch(marker)}, fh)
    before = snapshot(tmp_path)
    sae = TopKSAE(D_IN, D_SAE, k=4)
    cfg = TrainConfig.from_dict({"n_tokens": 32, "batch_size": 8})
    with pytest.raises(ConfigError) as e:
        Trainer(sae, cfg, Sparsity("target_l0", 4.0), checkpoint_path=ckpt, progress=False)
    line = one_line(e.value)
    assert line.startswith(f"{ckpt}: refused") and "rerun=true" in line
    assert "os.system" in line or "posix.system" in line or "Unsupported" in line, line
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_a_checkpoint_of_the_old_pickled_format_is_refused_with_rerun(tmp_path):
    """Before format 2 the TrainState was pickled as an object: that needs unpickling a class,
    which weights_only refuses; the message says how to go on."""
    from benchmark.train import TrainState

    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"sae": {}, "opt": {}, "state": TrainState(step=3)}, ckpt)
    with pytest.raises(ConfigError, match="rerun=true") as e:
        read_checkpoint(ckpt)
    assert "TrainState" in one_line(e.value)


def test_rerun_ignores_a_refused_checkpoint_and_overwrites_it(tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "checkpoint.pt"
    with open(ckpt, "wb") as fh:
        pickle.dump(touch(marker), fh)
    sae = TopKSAE(D_IN, D_SAE, k=4)
    cfg = TrainConfig.from_dict({"n_tokens": 16, "batch_size": 8, "checkpoint_every": 1})
    t = Trainer(sae, cfg, Sparsity("target_l0", 4.0), checkpoint_path=ckpt, progress=False,
                resume=False)  # fmt: skip
    for _ in range(2):
        t.step(torch.randn(8, D_IN))
    assert read_checkpoint(ckpt)["state"]["step"] == 2 and not marker.exists()


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    sae = TopKSAE(D_IN, D_SAE, k=4)
    cfg = TrainConfig.from_dict({"n_tokens": 16, "batch_size": 8, "checkpoint_every": 1})
    ckpt = tmp_path / "checkpoint.pt"
    t = Trainer(sae, cfg, Sparsity("target_l0", 4.0), checkpoint_path=ckpt, progress=False)
    t.step(torch.randn(8, D_IN))
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(ConfigError, match="rerun=true") as e:
        Trainer(TopKSAE(D_IN, D_SAE, k=4), cfg, Sparsity("target_l0", 4.0),
                checkpoint_path=ckpt, progress=False)  # fmt: skip
    assert one_line(e.value).startswith(f"{ckpt}: refused")


# ---- a saved SAE's config (benchmark.saes.load_sae) ---------------------------------------

HOSTILE_NODES = {
    "os.system": ({"_target_": "os.system", "command": "touch {marker}"}, "module os is refused"),
    "subprocess.call": (
        {"_target_": "subprocess.call", "args": ["touch", "{marker}"]},
        "module subprocess is refused",
    ),
    "pathlib unlink": (
        {"_target_": "pathlib.Path.unlink", "self": "{victim}"},
        "module pathlib.Path is refused",
    ),
    "nested _target_": (
        {"_target_": "baselines.topk.TopKSAE", "d_in": D_IN, "d_sae": D_SAE,
         "k": {"_target_": "os.system", "command": "touch {marker}"}},
        "k: only plain values",
    ),
    "_args_": (
        {"_target_": "baselines.topk.TopKSAE", "_args_": ["touch {marker}"]},
        "key '_args_' is refused",
    ),
    "_partial_": (
        {"_target_": "baselines.topk.TopKSAE", "_partial_": True},
        "key '_partial_' is refused",
    ),
    "interpolation": (
        {"_target_": "baselines.topk.TopKSAE", "d_in": D_IN, "d_sae": D_SAE, "k": "${oc.env:K}"},
        "interpolations are not resolved",
    ),
    "a function of the suite": (
        {"_target_": "interop.saelens.load_saelens", "path": "{victim}"},
        "is not a SparseAutoencoder class",
    ),
    "an unknown argument": (
        {"_target_": "baselines.topk.TopKSAE", "d_in": D_IN, "d_sae": D_SAE, "k": 4,
         "command": "touch {marker}"},
        "unexpected keyword argument 'command'",
    ),
}  # fmt: skip


def _write_node(folder: Path, node: dict, marker: Path, victim: Path) -> None:
    text = json.dumps(node).replace("{marker}", str(marker)).replace("{victim}", str(victim))
    (folder / "sae_config.yaml").write_text(text)  # JSON is YAML


@pytest.mark.parametrize("case", list(HOSTILE_NODES))
def test_a_hostile_sae_config_is_refused_before_anything_is_built(tmp_path, case):
    node, expected = HOSTILE_NODES[case]
    marker, victim = tmp_path / "PWNED", tmp_path / "victim.txt"
    saved_topk(tmp_path)
    victim.write_text("keep me")
    _write_node(tmp_path, node, marker, victim)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_sae(tmp_path)
    line = one_line(e.value)
    assert line.startswith(f"{tmp_path / 'sae_config.yaml'}: ") and expected in line, line
    assert not marker.exists() and victim.read_text() == "keep me"
    assert snapshot(tmp_path) == before


def test_a_module_outside_the_trusted_ones_is_never_imported(tmp_path):
    saved_topk(tmp_path)
    _write_node(tmp_path, {"_target_": "antigravity.Anything"}, tmp_path, tmp_path)
    assert "antigravity" not in sys.modules  # importing it would open a web browser
    with pytest.raises(ConfigError, match="module antigravity is refused"):
        load_sae(tmp_path)
    assert "antigravity" not in sys.modules


def test_sizes_that_disagree_with_the_weights_allocate_nothing(tmp_path):
    """A config asking for a huge dictionary is checked against the weights file's header on
    the meta device: refused in milliseconds, no 4 TB allocation."""
    saved_topk(tmp_path)
    node = {"_target_": "baselines.topk.TopKSAE", "d_in": 1_000_000, "d_sae": 1_000_000, "k": 4}
    _write_node(tmp_path, node, tmp_path, tmp_path)
    with pytest.raises(ConfigError) as e:
        load_sae(tmp_path)
    line = one_line(e.value)
    assert line.startswith(f"{tmp_path / 'sae.safetensors'}: W_dec has shape [32, 8], expected "
                           "[1000000, 1000000]"), line  # fmt: skip


def test_a_good_saved_sae_still_loads_exactly(tmp_path):
    sae = saved_topk(tmp_path)
    again = load_sae(tmp_path)
    x = torch.randn(5, D_IN)
    assert torch.equal(sae(x).x_hat, again(x).x_hat)


# ---- weights files ------------------------------------------------------------------------


def _huge_header(file: Path) -> None:
    """A safetensors file whose first 8 bytes declare a 1 TB header."""
    file.write_bytes(struct.pack("<Q", 1 << 40) + b'{"W_enc": {}}')


def _lying_header(file: Path) -> None:
    """A valid header declaring a 4 TB tensor that the file does not hold."""
    header = json.dumps({"W_enc": {"dtype": "F32", "shape": [1_000_000, 1_000_000],
                                   "data_offsets": [0, 4 * 10**12]}}).encode()  # fmt: skip
    file.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


@pytest.mark.parametrize("corrupt", [_huge_header, _lying_header, lambda f: f.write_bytes(b"")])
def test_a_damaged_safetensors_file_is_one_line(tmp_path, corrupt):
    saved_topk(tmp_path)
    corrupt(tmp_path / "sae.safetensors")
    with pytest.raises(ConfigError) as e:
        load_sae(tmp_path)
    assert one_line(e.value).startswith(f"{tmp_path / 'sae.safetensors'}: not a readable")


def _saelens_folder(folder: Path, cfg: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    w = {"W_enc": torch.randn(D_IN, D_SAE), "W_dec": torch.randn(D_SAE, D_IN),
         "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(D_IN)}  # fmt: skip
    save_file(w, str(folder / "sae_weights.safetensors"))


def test_a_saelens_cfg_json_with_a_payload_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    cfg = {"architecture": f"__import__('os').system('touch {marker}')", "d_in": D_IN,
           "d_sae": D_SAE}  # fmt: skip
    _saelens_folder(tmp_path, cfg)
    with pytest.raises(ValueError) as e:
        load_saelens(str(tmp_path))
    line = one_line(e.value)
    assert (
        line.startswith(f"{tmp_path / 'cfg.json'}: SAE-Lens architecture=") and not marker.exists()
    )


def test_saelens_sizes_are_checked_against_the_header_before_building(tmp_path):
    _saelens_folder(tmp_path, {"architecture": "standard", "d_in": D_IN, "d_sae": 10**9})
    with pytest.raises(ValueError) as e:
        load_saelens(str(tmp_path))
    line = one_line(e.value)
    assert line.startswith(f"{tmp_path / 'sae_weights.safetensors'}: W_enc has shape"), line


@pytest.mark.parametrize("corrupt", [_huge_header, _lying_header])
def test_saelens_weights_with_a_bad_header_are_one_line(tmp_path, corrupt):
    _saelens_folder(tmp_path, {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE})
    corrupt(tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError) as e:
        load_saelens(str(tmp_path))
    assert one_line(e.value).startswith(f"{tmp_path / 'sae_weights.safetensors'}: not a readable")


def test_a_dictionary_learning_ae_pt_with_a_payload_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with open(tmp_path / "ae.pt", "wb") as fh:
        pickle.dump({"encoder.weight": touch(marker)}, fh)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as e:
        load_dictionary_learning(str(tmp_path))
    line = one_line(e.value)
    assert line.startswith(f"{tmp_path / 'ae.pt'}: not a readable dictionary_learning ae.pt")
    assert "refused to unpickle" in line, line
    assert not marker.exists() and snapshot(tmp_path) == before


def _params(d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, np.ndarray]:
    return {"W_enc": np.ones((d_in, d_sae), np.float32), "W_dec": np.ones((d_sae, d_in), np.float32),
            "b_enc": np.zeros(d_sae, np.float32), "b_dec": np.zeros(d_in, np.float32),
            "threshold": np.zeros(d_sae, np.float32)}  # fmt: skip


def test_a_gemma_scope_npz_with_a_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    arrays = _params()
    payload = np.empty(1, dtype=object)
    payload[0] = touch(marker)
    arrays["threshold"] = payload
    np.savez(tmp_path / "params.npz", **arrays, allow_pickle=True)
    with pytest.raises(ValueError) as e:
        load_gemma_scope(str(tmp_path / "params.npz"))
    assert one_line(e.value).startswith(f"{tmp_path / 'params.npz'}: threshold: declares")
    assert not marker.exists()


def test_a_gemma_scope_npz_truncated_or_inconsistent_is_one_line(tmp_path):
    file = tmp_path / "params.npz"
    np.savez(file, **_params())
    file.write_bytes(file.read_bytes()[:300])
    with pytest.raises(ValueError) as e:
        load_gemma_scope(str(file))
    assert one_line(e.value).startswith(f"{file}: not a readable Gemma Scope params.npz")
    arrays = _params()
    arrays["b_dec"] = np.zeros(D_IN + 1, np.float32)
    np.savez(file, **arrays)
    with pytest.raises(ValueError) as e:
        load_gemma_scope(str(file))
    assert one_line(e.value) == f"{file}: b_dec has shape (9,), expected (8,)"


def test_a_gemma_scope_header_declaring_more_than_the_file_holds(tmp_path):
    """A member whose .npy header declares a 4 TB array in a 200-byte file is refused from the
    header, before numpy allocates anything."""
    file = tmp_path / "params.npz"
    np.savez(file, **_params())
    with zipfile.ZipFile(file) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    header = members["W_enc.npy"]
    members["W_enc.npy"] = header.replace(b"(8, 32)", b"(1000000, 1000000)".ljust(7))
    with zipfile.ZipFile(file, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(ValueError) as e:
        load_gemma_scope(str(file))
    assert "W_enc: declares (1000000, 1000000)" in one_line(e.value)


# ---- end to end: the command line ---------------------------------------------------------


def _hostile_run_folder(folder: Path, marker: Path, victim: Path) -> None:
    saved_topk(folder)
    cfg = compose_config(["+experiment=smoke", "sae=topk"])
    OmegaConf.save(cfg, folder / "config.yaml", resolve=True)
    (folder / "result.json").write_text(json.dumps({"status": "complete", "hook": "blocks.2.hook_resid_post",
                                                    "run_id": "r", "model": "m"}))  # fmt: skip
    _write_node(folder, {"_target_": "pathlib.Path.unlink", "self": "{victim}"}, marker, victim)
    victim.write_text("keep me")


@pytest.mark.parametrize("module", ["export", "examples"])
def test_export_and_examples_refuse_a_hostile_folder_in_one_line(tmp_path, module, capsys):
    """Their `main` in this process (the same code as `python -m benchmark.<module>`, without
    a subprocess's seconds of imports); the run entry point is tested in subprocesses below."""
    import importlib

    cli = importlib.import_module(f"benchmark.{module}")
    run, marker, victim = tmp_path / "run", tmp_path / "PWNED", tmp_path / "victim.txt"
    _hostile_run_folder(run, marker, victim)
    before = snapshot(run)
    extra = ["--format", "saelens", "--out", str(tmp_path / "out")] if module == "export" \
        else ["--latents", "0"]  # fmt: skip
    rc = cli.main([str(run), *extra])
    err = capsys.readouterr().err
    proc = subprocess.CompletedProcess([], rc, "", err)
    line = one_error_line(proc)
    assert f"{run / 'sae_config.yaml'}: _target_=pathlib.Path.unlink" in line, line
    assert victim.read_text() == "keep me" and not marker.exists() and snapshot(run) == before


def test_reevaluating_a_hostile_folder_refuses_it_before_the_model_loads(tmp_path, monkeypatch):
    from benchmark import models
    from benchmark.run import reevaluate

    run, marker, victim = tmp_path / "run", tmp_path / "PWNED", tmp_path / "victim.txt"
    _hostile_run_folder(run, marker, victim)
    before = snapshot(run)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match="_target_=pathlib.Path.unlink"):
        reevaluate(run, device="cpu")
    assert victim.read_text() == "keep me" and not marker.exists() and snapshot(run) == before


@pytest.mark.integration
def test_resuming_from_a_hostile_checkpoint_is_one_line_and_runs_nothing(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    run.mkdir()
    with open(run / "checkpoint.pt", "wb") as fh:
        pickle.dump(touch(marker), fh)
    proc = run_cli("+experiment=smoke", "hydra.mode=RUN", "sae=topk",
                f"results_dir={tmp_path}", f"hydra.run.dir={run}", "progress=false")  # fmt: skip
    line = one_error_line(proc)
    assert line.startswith(f"error: {run / 'checkpoint.pt'}: refused") and "rerun=true" in line
    assert not marker.exists()
    assert "[run] activations" not in proc.stdout + proc.stderr  # refused before any harvest


@pytest.mark.integration
def test_a_foreign_sae_with_a_payload_is_one_line_before_the_model_loads(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "config.json").write_text(
        json.dumps({"trainer": {"dict_class": "AutoEncoder"}})
    )
    with open(tmp_path / "dl" / "ae.pt", "wb") as fh:
        pickle.dump(touch(marker), fh)
    proc = run_cli("+experiment=smoke", "hydra.mode=RUN", "train=none",
                "sae=dictionary_learning", f"sae.path={tmp_path / 'dl'}",
                f"results_dir={tmp_path / 'results'}")  # fmt: skip
    line = one_error_line(proc)
    assert f"{tmp_path / 'dl' / 'ae.pt'}: not a readable dictionary_learning ae.pt" in line, line
    assert not marker.exists()
