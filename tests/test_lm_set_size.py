"""scripts/lm_set_size.py on hand-made per-window CE sums: interpolation in log L0 between a
curve's runs, the paired difference and its window-cluster SE, and which separations survive
an LM set cut into interleaved subsets."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("lm_set_size", ROOT / "scripts" / "lm_set_size.py")
assert spec is not None and spec.loader is not None
lm_set_size = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm_set_size)

N = np.full(8, 100.0)  # scored positions per window
ALT = np.array([1.0, -1.0] * 4)  # +-1 nats, alternating over the windows


def run(sae: str, l0: float, spliced: np.ndarray) -> dict:
    windows = np.stack([np.zeros(8), spliced, N], axis=1)  # clean CE sums 0
    return {"sae": sae, "seed": 0, "splice_l0": l0, "windows": windows}


RUNS = [
    run("a", 20.0, 50 + ALT), run("a", 40.0, 30 + ALT),
    run("b", 20.0, 60 + 0 * ALT), run("b", 40.0, 40 + 0 * ALT),
    run("c", 20.0, 50 + 0 * ALT), run("c", 40.0, 30 + 0 * ALT),
]  # fmt: skip


def test_window_deltas_interpolate_in_log_l0_and_never_extrapolate():
    mid = lm_set_size.window_deltas(RUNS[:2], math.sqrt(800))  # t = 1/2 in log L0
    np.testing.assert_allclose(mid, 40 + ALT)
    assert lm_set_size.window_deltas(RUNS[:2], 19.9) is None
    assert lm_set_size.window_deltas(RUNS[:2], 40.1) is None


def test_separation_by_hand():
    # D_w = -10 + ALT: D = -80 / 800 = -0.1; residuals D_w - D n_w = +-1, so
    # SE = sqrt(8 / 7 * 8) / 800 = 0.0037796; t(0.975, 7) = 2.3646 * SE << 0.1: separates.
    diff, se, sep = lm_set_size.separation(-10 + ALT, N)
    assert diff == pytest.approx(-0.1)
    assert se == pytest.approx(math.sqrt(8 / 7 * 8) / 800)
    assert sep
    diff, se, sep = lm_set_size.separation(ALT, N)  # mean 0: never separates
    assert diff == 0 and not sep


def test_size_table_keeps_a_separation_only_if_every_subset_keeps_it():
    df = lm_set_size.size_table(RUNS, [28.3], [1, 2, 4, 8]).set_index("pair")
    ab, ac = df.loc["a - b"], df.loc["a - c"]
    assert ab["separates"] and ab["diff"] == pytest.approx(-0.1)
    # Every 2nd window: offsets 0 and 1 hold D_w = -9 and -11 (constant, SE 0): both separate.
    assert ab["1/2: 4 windows"] == "2/2 holds" and ab["1/4: 2 windows"] == "4/4 holds"
    assert ab["1/8: 1 windows"] == "n/a"  # one window has no SE
    # a - c = ALT: zero in the full set, but each interleaved subset is a constant +-1: they
    # "separate" with opposite signs, so a separation the full set lacks never holds.
    assert not ac["separates"] and ac["1/2: 4 windows"] == "2/2"
