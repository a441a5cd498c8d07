"""`python -m benchmark.probe`: sparse probing on the SAE-Probes datasets (docs/probing.md).

Unit tests of the parts on hand-made data (the latent-selection rule, the probe's AUC on
separable and on label-shuffled data, the split, the .csv.zst reader, the summary), the CLI's
one-line errors, and one integration test: a tiny run folder (a TopK SAE saved with save_sae,
the composed config, a minimal result.json) probed on the real bundled model on one synthetic
dataset of 168 short texts.
"""

from __future__ import annotations

import csv
import io
import json

import pandas as pd
import pytest
import torch

from benchmark.probe import DEFAULT_DATASETS, balanced_split, dataset_dir, main, read_dataset
from benchmark.probe_fit import fit_probe, rank_latents, roc_auc
from benchmark.report.probe import comparison, probe_markdown
from tests.conftest import MODEL_CACHE
from tests.helpers import random_sae_run

HOOK = "blocks.6.hook_resid_post"


def write_csv_zst(path, rows, header=("prompt", "prompt_len", "target")):
    zstandard = pytest.importorskip("zstandard")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(zstandard.ZstdCompressor().compress(text.getvalue().encode()))
    return path


def test_latents_ranked_by_scaled_class_mean_difference_on_the_rows_given():
    y = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    f = torch.zeros(8, 4)
    f[:, 0] = 5.0  # fires everywhere, same on both classes: no difference
    f[:4, 1] = 1.0  # fires on every positive only: scaled difference 1
    f[[0, 1, 4], 2] = 100.0  # large but fires on 2 positives, 1 negative: scaled 0.25
    f[:4, 3] = torch.tensor([0.5, 1.5, 0.5, 1.5])  # positives only, varying size: scaled 1
    # Unscaled, latent 2 (difference 25) would come first; scaled by its mean firing size it is
    # behind the two latents that separate the classes; ties keep the lower index first.
    assert rank_latents(f, y).tolist() == [1, 3, 2, 0]
    # Only the rows given count: on rows where latent 2 fires on positives alone it separates
    # the classes as well as latents 1 and 3 (all three at 1), ahead of latent 0.
    rows = torch.tensor([0, 1, 5, 6])
    ranked = rank_latents(f[rows], y[rows]).tolist()
    assert set(ranked[:3]) == {1, 2, 3} and ranked[3] == 0


def test_roc_auc_counts_ties_as_half():
    y = torch.tensor([0, 0, 1, 1])
    assert roc_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert roc_auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert roc_auc(torch.tensor([1.0, 1.0, 1.0, 1.0]), y) == 0.5
    assert roc_auc(torch.tensor([0.1, 0.3, 0.3, 0.4]), y) == pytest.approx(0.875)


def _gaussian_classes(n, d, shift, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, d, generator=g)
    X[:, 0] += shift * (2 * y - 1)
    return X, y


@pytest.mark.parametrize("n_train", [40, 400])  # stratified 6-fold; one hold-out split
def test_probe_auc_near_one_on_separable_data_and_near_half_on_shuffled_labels(n_train):
    X, y = _gaussian_classes(n_train + 400, 8, 4.0, seed=0)
    p = fit_probe(X[:n_train], y[:n_train], X[n_train:], y[n_train:])
    assert p.auc > 0.99 and p.accuracy > 0.95 and p.val_auc > 0.95
    g = torch.Generator().manual_seed(1)
    y_shuffled = y[torch.randperm(len(y), generator=g)]
    shuffled = fit_probe(X[:n_train], y_shuffled[:n_train], X[n_train:], y_shuffled[n_train:])
    assert abs(shuffled.auc - 0.5) < 0.1


def test_balanced_split_is_disjoint_balanced_and_seeded():
    labels = torch.tensor([0] * 30 + [1] * 20)
    train, test = balanced_split(labels, 11, 8, seed=3)
    assert len(train) == 11 and len(test) == 8 and not set(train.tolist()) & set(test.tolist())
    assert int(labels[train].sum()) == 6 and int(labels[test].sum()) == 4  # ceil(n / 2)
    again = balanced_split(labels, 11, 8, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    with pytest.raises(ValueError, match="class 1"):
        balanced_split(labels, 30, 12)


def test_reader_reads_a_csv_zst_as_data(tmp_path):
    path = write_csv_zst(tmp_path / "7_tiny.csv.zst", [
        ("Ada Lovelace", 12, "False"), ('a "quoted", text\nover two lines', 30, "True"),
        ("", 0, "True"), ("Alan Turing", 11, "False"),
    ])  # fmt: skip
    ds = read_dataset(path)
    assert ds.name == "7_tiny" and ds.classes == ("False", "True")  # the empty prompt dropped
    assert ds.texts == ["Ada Lovelace", 'a "quoted", text\nover two lines', "Alan Turing"]
    assert ds.labels.tolist() == [0, 1, 0]
    assert read_dataset(path, max_rows=2).texts == ds.texts[:2]  # only the first rows are read
    numbers = write_csv_zst(tmp_path / "n.csv.zst", [("a", 1, "10"), ("b", 1, "9")])
    assert read_dataset(numbers).labels.tolist() == [1, 0]  # 9 < 10 by value, not as text
    bad = write_csv_zst(tmp_path / "bad.csv.zst", [("a", 1, "x")], header=("text", "n", "y"))
    with pytest.raises(ValueError, match="columns prompt and target"):
        read_dataset(bad)
    (tmp_path / "broken.csv.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(ValueError, match="broken.csv.zst"):
        read_dataset(tmp_path / "broken.csv.zst")


def test_the_default_datasets_ship_in_the_installed_wheel():
    try:
        folder = dataset_dir()
    except ValueError:
        pytest.skip("sae-probes is not installed (scripts/setup.sh installs it)")
    for name in DEFAULT_DATASETS:
        ds = read_dataset(folder / f"{name}.csv.zst")
        assert len(ds.texts) >= 1536 and 0.4 < float(ds.labels.double().mean()) < 0.6


def _frame():
    rows = []
    for sae, base in (("jumprelu", 0.8), ("topk", 0.7)):
        for seed in (0, 1, 2):
            for dataset in ("a", "b"):
                for k in (1, 16):
                    rows.append({"run_id": f"{sae}{seed}", "sae": sae, "target_l0": 20, "l0": 21,
                                 "seed": seed, "dataset": dataset, "k": k,
                                 "auc": base + 0.01 * seed + 0.05 * (k == 16), "accuracy": 0.6,
                                 "model": "m", "hook": HOOK})  # fmt: skip
    rows.append({"run_id": "dense", "sae": "dense", "dataset": "a", "k": 576, "auc": 0.9,
                 "accuracy": 0.8, "model": "m", "hook": HOOK})  # fmt: skip
    return pd.DataFrame(rows)


def test_summary_pairs_seeds_and_gives_a_verdict():
    table = comparison(_frame().pipe(lambda f: f.groupby(
        ["model", "hook", "run_id", "sae", "target_l0", "seed", "k"], dropna=False
    )[["auc", "accuracy", "l0"]].mean().reset_index()))  # fmt: skip
    assert set(table["verdict"]) == {"JumpReLU higher"}
    assert table["diff"].tolist() == pytest.approx([0.1, 0.1]) and set(table["seeds"]) == {3}
    text = probe_markdown(_frame())
    assert "| JumpReLU | 20 | 21.0 | 3 | 0.810 ± 0.025 | 0.860 ± 0.025 |" in text
    assert "dense (all 576 dims)" in text and "JumpReLU higher" in text


@pytest.mark.parametrize("args, message", [
    (["--ks", "0,2"], "error: --ks='0,2': expected comma-separated integers >= 1"),
    (["--n-train", "8"], "error: --n-train='8': expected an integer >= 16"),
    (["--datasets", "nope"], "error: --datasets=nope: no nope.csv.zst in"),
])  # fmt: skip
def test_bad_arguments_are_one_line_and_status_2(run_dir, tmp_path, capsys, args, message):
    code = main([str(run_dir), "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1


def test_a_folder_without_runs_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no complete run" in capsys.readouterr().err


@pytest.fixture
def run_dir(tmp_path):
    return random_sae_run(tmp_path, HOOK)


@pytest.mark.integration
def test_probe_on_the_bundled_model_writes_the_tidy_csv(run_dir, tmp_path, bundled_model,
                                                         monkeypatch):  # fmt: skip
    monkeypatch.setattr("benchmark.models.load_model", lambda *a, **k: bundled_model)
    names = ["Mary", "Anna", "Lucy", "Emma", "Sarah", "Julia", "Rose", "Alice", "Grace", "Helen",
             "Clara", "Laura"]  # fmt: skip
    places = ["London", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin",
              "Oslo", "Lisbon", "Athens", "Warsaw"]  # fmt: skip
    templates = ["{} went home", "I met {}", "We saw {}", "This is {}", "{} is far", "Ask {}",
                 "Near {}"]  # fmt: skip
    rows = [(t.format(w), 0, int(w in places)) for t in templates for w in names + places]
    write_csv_zst(tmp_path / "1_toy.csv.zst", rows)
    out = tmp_path / "out"
    args = [str(run_dir.parent), "--datasets", "1_toy", "--data-dir", str(tmp_path), "--n-train",
            "128", "--n-test", "32", "--ks", "1,4", "--device", "cpu", "--out", str(out),
            "--cache-dir", str(MODEL_CACHE)]  # fmt: skip
    assert main(args) == 0
    frame = pd.read_csv(out / "probe.csv")
    assert list(frame.columns[:9]) == ["run_id", "sae", "target_l0", "l0", "seed", "dataset",
                                       "k", "auc", "accuracy"]  # fmt: skip
    sae_rows, dense = frame[frame["sae"] == "topk"], frame[frame["sae"] == "dense"]
    assert sae_rows["k"].tolist() == [1, 4] and dense["k"].tolist() == [576]
    assert (frame["n_train"] == 128).all() and (frame["n_test"] == 32).all()
    assert frame["auc"].between(0, 1).all() and frame["hook"].eq(HOOK).all()
    assert dense["auc"].iloc[0] > 0.9  # names against cities: easy for the dense probe
    assert "## smollm2_135m blocks.6.hook_resid_post" in (out / "probe.md").read_text()
    assert json.loads((out / "probe.json").read_text())["datasets"] == ["1_toy"]


def test_report_hook_writes_probe_md_and_refuses_a_foreign_csv(tmp_path):
    from benchmark.report.probe import write_probe

    _frame().to_csv(tmp_path / "probe.csv", index=False)
    assert write_probe(tmp_path / "probe.csv", tmp_path) == [
        tmp_path / "probe.md", tmp_path / "fig_probe.png", tmp_path / "fig_probe.pdf"]  # fmt: skip
    assert "Paired over seeds" in (tmp_path / "probe.md").read_text()
    assert (tmp_path / "fig_probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ValueError, match="not a benchmark.probe CSV"):
        write_probe(tmp_path / "other.csv", tmp_path)


def test_probe_figure_has_a_panel_per_target_and_a_line_per_architecture():
    from benchmark.report.probe import plot_probe

    frame = _frame()
    fig = plot_probe(frame)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    targets = frame.loc[frame["sae"] != "dense", "target_l0"].nunique()
    assert len(visible) == targets
    labels = [t.get_text() for t in visible[0].get_legend().get_texts()]
    saes = sorted(frame.loc[frame["sae"] != "dense", "sae"].unique())
    assert len([lab for lab in labels if lab != "dense probe"]) == len(saes)
