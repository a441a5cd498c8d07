"""Model sources, device/dtype resolution, hook names and the conf/model entries."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from benchmark import hub, integrity, models
from benchmark.errors import ConfigError
from benchmark.models import BLOCK_HOOKS, hook_name, load_model, resolve_device, resolve_dtype
from benchmark.specs import ModelSpec, SiteSpec
from tests.conftest import MODEL_CACHE
from tests.helpers import CONF as CONF_DIR

MODEL_NAMES = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
# Real shapes, checked against each model's Hugging Face config.json.
REAL_SHAPES = {
    "smollm2_135m": (30, 576, 9, 64),
    "gemma2_9b": (42, 3584, 16, 256),
    "gemma2_2b": (26, 2304, 8, 256),
    "gpt2_small": (12, 768, 12, 64),
    "pythia_70m": (6, 512, 8, 64),
}


def test_resolve_device_and_dtype():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="gpu0"):
        resolve_device("gpu0")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp8.*float32"):
        resolve_dtype("fp8", torch.device("cpu"))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_configs(compose, name):
    """Each entry composes, has the real shape, and names its layers at 9/20/31 of 42."""
    cfg = compose([f"model={name}", "layer=late"])
    m = cfg.model
    assert (m.n_layers, m.d_model, m.n_heads, m.d_head) == REAL_SHAPES[name]
    fractions = {"early": 9 / 42, "middle": 20 / 42, "late": 31 / 42}
    assert dict(m.layers) == {k: round(m.n_layers * f) for k, f in fractions.items()}
    assert cfg.layer.index == m.layers.late
    assert m.source in models.SOURCES and m.architecture
    assert m.dtype in {"auto", *models.DTYPES}


def test_hook_name(compose):
    cfg = compose(["site=attention"])
    assert hook_name(ModelSpec.of(cfg.model), 6, SiteSpec.of(cfg.site)) == "blocks.6.attn.hook_z"
    assert (
        hook_name(ModelSpec.of(cfg.model), 29, SiteSpec.of(compose(["site=residual"]).site))
        == "blocks.29.hook_resid_post"
    )
    for bad in (30, -1, "6"):
        with pytest.raises(ConfigError, match=r"layer.index=.* valid 0\.\.29"):
            hook_name(ModelSpec.of(cfg.model), bad, SiteSpec.of(cfg.site))
    with pytest.raises(ConfigError, match="unknown hook 'hook_resid_postt'.*hook_resid_post"):
        hook_name(
            ModelSpec.of(cfg.model), 6, SiteSpec.of({"name": "typo", "hook": "hook_resid_postt"})
        )
    bridge = SimpleNamespace(hook_dict={"blocks.6.hook_resid_post": None})
    with pytest.raises(ConfigError, match="no hook 'blocks.6.attn.hook_z'.*hook_resid_post"):
        hook_name(ModelSpec.of(cfg.model), 6, SiteSpec.of(cfg.site), bridge)


def test_source_errors(compose, tmp_path):
    cfg = compose([])
    with pytest.raises(ConfigError, match="model.source='ftp'.*bundled, hf, local"):
        load_model(
            ModelSpec.of(OmegaConf.merge(cfg.model, {"source": "ftp"})),
            torch.device("cpu"),
            tmp_path,
        )
    missing = OmegaConf.merge(cfg.model, {"source": "local", "path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="model.path=.*nope"):
        load_model(ModelSpec.of(missing), torch.device("cpu"), tmp_path)
    with pytest.raises(ConfigError, match="model.dtype='half'"):
        load_model(
            ModelSpec.of(OmegaConf.merge(cfg.model, {"dtype": "half"})),
            torch.device("cpu"),
            tmp_path,
        )


def test_hf_source_boots_by_name(compose, monkeypatch):
    """No hub here: check the call the hf source makes and the checks load_model adds."""
    calls = []

    def fake_boot(name, **kwargs):
        calls.append((name, kwargs))
        fake = torch.nn.Linear(2, 2)
        fake.cfg = SimpleNamespace(n_layers=12, d_model=768, n_heads=12, d_head=64)
        return fake

    monkeypatch.setattr(models.TransformerBridge, "boot_transformers", staticmethod(fake_boot))
    cfg = compose(["model=gpt2_small"])
    bridge = load_model(ModelSpec.of(cfg.model), torch.device("cpu"), "unused")
    assert calls[0][0] == "openai-community/gpt2"
    assert calls[0][1]["dtype"] == torch.float32
    assert not bridge.training and not any(p.requires_grad for p in bridge.parameters())
    wrong = OmegaConf.merge(cfg.model, {"n_layers": 11})
    with pytest.raises(
        ConfigError, match="model.n_layers=11 but gpt2_small loaded with n_layers=12"
    ):
        load_model(ModelSpec.of(wrong), torch.device("cpu"), "unused")


@pytest.mark.integration
def test_bundled_model(bundled_model, compose):
    cfg = compose([])
    assert bundled_model.tokenizer.bos_token_id == 0  # <|endoftext|>, see conf/model
    assert bundled_model.to_tokens("Hello")[0, 0].item() == 0
    assert not bundled_model.training
    assert not any(p.requires_grad for p in bundled_model.parameters())
    for hook in BLOCK_HOOKS:
        assert hook_name(
            ModelSpec.of(cfg.model), 6, SiteSpec.of({"name": "x", "hook": hook}), bundled_model
        )
    converted = Path(MODEL_CACHE) / "models" / models.bundled_gguf().stem
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()


@pytest.mark.integration
def test_offline_sources_never_touch_the_network(bundled_model, compose, monkeypatch):
    """Bundled (converted cache present) and local sources load with every socket refused;
    the local source, pointed at the converted bundled model, gives the same logits."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    cfg = compose([])
    bundled = load_model(ModelSpec.of(cfg.model), torch.device("cpu"), MODEL_CACHE)
    path = Path(MODEL_CACHE) / "models" / models.bundled_gguf().stem
    local_cfg = OmegaConf.merge(cfg.model, {"source": "local", "path": str(path)})
    local = load_model(ModelSpec.of(local_cfg), torch.device("cpu"), "unused")
    tokens = torch.tensor([[0, 504, 3458, 282, 4649, 314]])
    with torch.inference_mode():
        expected = bundled_model(tokens)
        torch.testing.assert_close(bundled(tokens), expected)
        torch.testing.assert_close(local(tokens), expected)
    assert local.tokenizer.bos_token_id == 0


# ---- integrity of the converted model (benchmark/integrity.py) ----


def fake_conversion(folder: Path) -> Path:
    """A folder as converted_bundled_model leaves it: files + a sealed checksums.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    names = ["config.json", "model.safetensors"]
    files = integrity.file_records(folder, names)
    (folder / models.CHECKSUMS).write_text(json.dumps(integrity.seal({"files": files})))
    return folder


def test_conversion_damage(tmp_path, monkeypatch):
    """Sizes on every check, checksums once per process; each fault named with its file."""
    folder = fake_conversion(tmp_path / "m")
    hashed = []
    checksum = integrity.checksum
    monkeypatch.setattr(integrity, "checksum", lambda p: hashed.append(p.name) or checksum(p))
    assert models._conversion_damage(folder) is None and len(hashed) == 2
    assert models._conversion_damage(folder) is None and len(hashed) == 2  # not hashed again
    monkeypatch.setattr(integrity, "_verified", set())  # as in a new process
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[1000] ^= 0xFF
    (folder / "model.safetensors").write_bytes(data)
    assert "model.safetensors has checksum" in models._conversion_damage(folder)
    (folder / "model.safetensors").write_bytes(bytes(data[:100]))
    assert "model.safetensors has 100 bytes, 16384 recorded" in models._conversion_damage(folder)
    (folder / "config.json").unlink()
    assert "config.json is missing" in models._conversion_damage(folder)
    (folder / models.CHECKSUMS).write_text('{"files": {')
    assert "checksums.json is unreadable" in models._conversion_damage(folder)
    (folder / models.CHECKSUMS).unlink()  # converted before the checks
    assert "checksums.json is unreadable or predates" in models._conversion_damage(folder)


@pytest.mark.integration
def test_damaged_converted_model_is_converted_again(bundled_model, compose, tmp_path, caplog):
    """Bytes overwritten in a copy of the converted weights: one warning naming the file, a
    fresh conversion (~25 s), and the reloaded model gives the original logits."""
    stem = models.bundled_gguf().stem
    pristine = Path(MODEL_CACHE) / "models" / stem
    copy = tmp_path / "models" / stem
    shutil.copytree(pristine, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:  # flip bytes well inside the tensors, size unchanged
        f.seek(weights.stat().st_size // 2)
        chunk = f.read(4096)
        f.seek(-len(chunk), 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with caplog.at_level(logging.WARNING, logger="benchmark.models"):
        reloaded = load_model(ModelSpec.of(compose([]).model), torch.device("cpu"), tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"{weights} has checksum" in warnings[0], warnings
    assert models._conversion_damage(copy) is None
    tokens = torch.tensor([[0, 504, 3458, 282, 4649, 314]])
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(tokens), bundled_model(tokens))


# ---- hub sources fail fast offline (benchmark/hub.py) ----

HUB_MODELS = {"gemma2_9b": "google/gemma-2-9b", "gpt2_small": "openai-community/gpt2",
              "pythia_70m": "EleutherAI/pythia-70m"}  # fmt: skip


@pytest.fixture
def offline(monkeypatch):
    """No model in the local HF cache, no offline variable, and a hub that does not answer."""
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "model_cached", lambda repo: False)
    monkeypatch.setattr(hub, "_probe", lambda endpoint, timeout: "no answer within 3 s")


@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_hub_model_offline_fails_fast(name, compose, offline):
    cfg = compose([f"model={name}"])
    repo = cfg.model.path or cfg.model.architecture
    assert repo.lower() == HUB_MODELS[name].lower()
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        hub.check_sources(cfg)
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert message.startswith(f"model={name} needs {repo} from the Hugging Face hub, which is ")
    assert "not in the local cache and the hub is unreachable (no answer within 3 s)" in message
    assert f"hf download {repo}" in message and "model=smollm2_135m" in message
    assert "\n" not in message


def test_hub_model_sources(compose, monkeypatch, offline):
    def no_probe(*args):
        raise AssertionError("the hub was probed")

    hub.check_sources(compose([]))  # bundled: nothing to check
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe", no_probe)
    with pytest.raises(ConfigError, match=r"unreachable \(HF_HUB_OFFLINE is set\)"):
        hub.check_sources(compose(["model=gpt2_small"]))
    monkeypatch.setattr(hub, "model_cached", lambda repo: repo == "openai-community/gpt2")
    hub.check_sources(compose(["model=gpt2_small"]))  # in the local cache: fine offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "_probe", lambda endpoint, timeout: None)  # the hub answers
    hub.check_sources(compose(["model=pythia_70m"]))


def test_hub_lookups_never_touch_the_network(monkeypatch):
    """The cache lookup is local; the probe gives up quickly and says why."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise OSError("network access refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert not hub.model_cached("no-such-owner/no-such-model-xyz")

    class Session:
        def head(self, url, timeout):
            raise OSError("refused")

    monkeypatch.setattr(huggingface_hub, "get_session", Session)
    why = hub._probe.__wrapped__("https://hub.example", 0.5)
    assert why == "no answer from https://hub.example within 0.5 s: OSError"
