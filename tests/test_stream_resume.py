"""A streamed run resumes without running the model over the batches it already trained
(`StreamingStore.batches(start=k)`), and SLURM requeues a job killed at its time limit.

On the real bundled model: layer 2, forward batches of 4 windows (~500 rows), a shuffle buffer
of 256 rows, batches of 64. The model calls are counted by wrapping `read_sites`.
"""

from __future__ import annotations

import logging
from itertools import islice

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmark.activations import StreamingStore, get_activation_store, streaming
from benchmark.compose import CONF_DIR
from benchmark.data import non_special_mask, stream_windows
from benchmark.specs import SourceSpec
from tests.conftest import compose_config

B, BUFFER, K = 64, 256, 20  # batch, shuffle buffer (4 batches), resume after K batches
STREAM = [
    "device=cpu",
    "layer.index=2",
    "data.harvest.batch_size=4",
    "data.stream=true",
    # A stream has no cached set to take a median norm from, so the bundled model's outlier
    # rule (residual layer 2 is in it) must be turned off by hand; validate.check_run says so.
    "data.max_norm_multiple=null",
    "data.stream_norm_tokens=500",
    f"data.stream_buffer_tokens={BUFFER}",
]


@pytest.fixture(scope="module")
def store(bundled_model, tmp_path_factory) -> StreamingStore:
    cfg = compose_config([f"cache_dir={tmp_path_factory.mktemp('stream')}", *STREAM])
    st = get_activation_store(bundled_model, SourceSpec.of(cfg))
    assert isinstance(st, StreamingStore)
    return st


@pytest.fixture(scope="module")
def stream_rows(store) -> torch.Tensor:
    """The stream's first rows in order (no shuffle), enough for K + 4 batches and more."""
    return next(store.batches(BUFFER + (K + 8) * B, seed=0, shuffle=False, normalise=False))


@pytest.fixture(scope="module")
def batch_rows(store, bundled_model) -> list[int]:
    """Rows per forward batch (4 windows), from the tokens alone."""
    windows = list(islice(stream_windows(store._data, bundled_model.tokenizer, "train"), 64))
    mask = non_special_mask(torch.tensor(windows), bundled_model.tokenizer)  # (64, T)
    return [int(mask[i : i + 4].sum()) for i in range(0, 64, 4)]


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The index of the first window of every forward pass the stream makes (found by the
    window's tokens among the split's first windows)."""
    seen: list[int] = []
    real = streaming.read_sites

    def counting(bridge, tokens, mask, hooks, layer):
        seen.append(_window_index(bridge, tokens[0]))
        return real(bridge, tokens, mask, hooks, layer)

    monkeypatch.setattr(streaming, "read_sites", counting)
    return seen


_WINDOWS: list[torch.Tensor] = []


def _window_index(bridge, window: torch.Tensor) -> int:
    if not _WINDOWS:
        cfg = compose_config(STREAM).data
        _WINDOWS.extend(torch.tensor(w) for w in islice(stream_windows(cfg, bridge.tokenizer,
                                                                         "train"), 64))  # fmt: skip
    return next(i for i, w in enumerate(_WINDOWS) if torch.equal(w, window.cpu()))


def forward_batches_from(row: int, batch_rows: list[int]) -> int:
    """The first window of the forward batch holding stream row `row`."""
    done = 0
    for i, n in enumerate(batch_rows):
        if done + n > row:
            return 4 * i
        done += n
    raise AssertionError("row beyond the windows counted")


@pytest.mark.integration
def test_exact_resume_from_saved_state(store, tmp_path, calls, batch_rows):
    """The state saved at batch 16 (every 8) gives, at start=16, exactly the uninterrupted
    batches 17..; at start=20 it is restored and 4 batches replayed. Neither runs the model on
    the forward batches before the saved position."""
    state = tmp_path / StreamingStore.STATE_FILE
    whole = store.batches(B, seed=3, normalise=False, state_path=state, save_every=8)
    ref = list(islice(whole, K + 4))  # the state is saved as batch 17 is drawn
    assert torch.load(state, weights_only=True)["position"] == 16
    for start in (16, K):
        calls.clear()
        resumed = store.batches(B, seed=3, normalise=False, start=start, state_path=state,
                                save_every=8)  # fmt: skip
        got = list(islice(resumed, K + 4 - start))
        assert all(torch.equal(a, b) for a, b in zip(got, ref[start:], strict=True))
        assert calls[0] == forward_batches_from(BUFFER + 16 * B, batch_rows) > 0
        assert len(calls) <= 2  # rows 1280..1792: the windows after those of batches 1..16


@pytest.mark.integration
def test_approximate_resume_without_state(store, tmp_path, calls, stream_rows, batch_rows):
    """No state: the first buffer + K * batch rows are skipped without the model; the resumed
    batches are drawn from the rows after them, refilled in stream order."""
    skip = BUFFER + K * B
    resumed = list(islice(store.batches(B, seed=3, normalise=False, start=K), 4))
    assert calls[0] == forward_batches_from(skip, batch_rows) > 0 and len(calls) <= 2
    for j, batch in enumerate(resumed):  # batch j drew from rows [skip, skip + BUFFER + j * B)
        window = stream_rows[skip : skip + BUFFER + j * B]
        match = (batch[:, None, :] == window[None]).all(-1)  # (B, rows in the window)
        assert bool(match.any(1).all())
    fresh = store.batches(B, seed=3, normalise=False, start=K, state_path=tmp_path / "none.pt")
    assert torch.equal(next(fresh), resumed[0])  # seeded by (seed, K): reproducible


@pytest.mark.integration
def test_unshuffled_resume_is_exact(store, stream_rows, calls, batch_rows):
    got = next(store.batches(B, seed=0, normalise=False, shuffle=False, start=K))
    assert torch.equal(got, stream_rows[K * B : (K + 1) * B])
    assert calls == [forward_batches_from(K * B, batch_rows)]


@pytest.mark.integration
def test_state_of_another_stream_is_not_used(store, tmp_path, caplog):
    state = tmp_path / StreamingStore.STATE_FILE
    list(islice(store.batches(B, seed=3, state_path=state, save_every=2), 3))
    other = store.batches(B, seed=4, normalise=False, start=2, state_path=state)
    with caplog.at_level(logging.WARNING):
        first = next(other)
    assert torch.equal(first, next(store.batches(B, seed=4, normalise=False, start=2)))
    assert "does not match this stream" in caplog.text


@pytest.mark.integration
def test_run_resumes_a_stream_from_its_folder(bundled_model, tmp_path, calls):
    """benchmark.stages.train_stage on a streamed config: killed after 9 steps (checkpoints every
    4), run again in the same folder: the stream resumes from the folder's stream_state.pt
    (no model pass over the first batches) and the SAE ends as an uninterrupted run's; the
    state file goes when the result is written."""
    from benchmark import run, stages

    over = [f"cache_dir={tmp_path / 'cache'}", *STREAM, "train=cpu", f"train.n_tokens={12 * B}",
            f"train.batch_size={B}", "train.checkpoint_every=4", "train.width=64", "sae=relu",
            "sparsity=coefficient", "sparsity.coefficient=1e-3", "progress=false"]  # fmt: skip
    cfg = compose_config(over)

    def train(out, stop_after=None):
        out.mkdir(exist_ok=True)
        real = stages.train_group
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stages, "train_group", lambda *a, **k: real(*a, **k, stop_after=stop_after))
            plan = run.plan_run(cfg)
            member = run.Member(cfg, out, {})
            stages.train_stage([member.unit(plan)], member.source, int(cfg.seed), bundled_model,
                               None)  # fmt: skip
        return plan.sae

    whole = train(tmp_path / "whole")
    out = tmp_path / "cut"
    train(out, stop_after=9)
    assert (out / StreamingStore.STATE_FILE).is_file() and (out / "checkpoint.pt").is_file()
    calls.clear()
    resumed = train(out)
    assert calls and 0 not in calls  # the windows of the first batches were not run again
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    stages.after_result(out, None, {})
    assert not (out / StreamingStore.STATE_FILE).exists()


# ---- SLURM requeue ----


def test_slurm_launcher_requeues_on_timeout():
    """hydra/launcher=slurm: a job killed at its time limit is requeued (submitit), and the
    paper-scale experiment checkpoints so that the requeued job resumes."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "+experiment=gemma2_9b_full"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and "Slurm" in launcher._target_
    assert launcher.max_num_timeout >= 1
    assert launcher.signal_delay_s > 0
    assert cfg.train.checkpoint_every > 0
    steps = cfg.train.n_tokens // cfg.train.batch_size
    assert steps // cfg.train.checkpoint_every >= 10  # many resume points in a run
    assert OmegaConf.select(cfg, "data.stream") is True
