"""result.json is moved aside (result.<time>.json) only when it is complete (a rerun), and
files written atomically (fileio.atomic_write) or exported (benchmark.export) get the mode a
plain `open` gives under the umask.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from benchmark import fileio
from benchmark.results import read_result, write_result
from tests.helpers import compose_config, sae_from_conf


def test_a_complete_record_is_moved_aside_only_by_a_rerun_and_a_failed_one_is_replaced(tmp_path):
    write_result(tmp_path, {"status": "failed", "error": "boom", "time": "2026-01-01T00:00:00"})
    write_result(tmp_path, {"status": "complete", "time": "2026-01-02T00:00:00"})
    assert read_result(tmp_path) == {"status": "complete", "time": "2026-01-02T00:00:00"}
    assert list(tmp_path.glob("result.*.json")) == []
    write_result(tmp_path, {"status": "complete", "time": "2026-01-03T00:00:00"})  # rerun=true
    assert read_result(tmp_path) == {"status": "complete", "time": "2026-01-03T00:00:00",
                                     "replaces": "result.2026-01-02T000000.json"}  # fmt: skip
    (kept,) = tmp_path.glob("result.*.json")
    assert json.loads(kept.read_text())["time"] == "2026-01-02T00:00:00"


@pytest.mark.parametrize(
    "umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"]
)
def test_written_and_exported_files_have_the_umask_s_mode(tmp_path, umask, mode):
    from benchmark.export import export
    from benchmark.saes import sae_node, save_sae

    sae = sae_from_conf("jumprelu", 16, 32)
    node = sae_node(compose_config(["sae=jumprelu", "sparsity=l0_10"]).sae, 16, 32)
    run_dir = tmp_path / "run"
    old = os.umask(umask)
    try:
        save_sae(sae, run_dir, node)
        fileio.write_json_atomic(run_dir / "result.json",
                                 {"hook": "blocks.2.hook_resid_post", "d_in": 16, "d_sae": 32})  # fmt: skip
        written = [*run_dir.iterdir()]
        written += export(run_dir, "saelens", tmp_path / "saelens")
        written += export(run_dir, "gemma_scope", tmp_path / "gemma_scope")
    finally:
        os.umask(old)
    names = sorted(p.name for p in written)
    assert names == ["cfg.json", "params.npz", "result.json", "sae.safetensors",
                     "sae_config.yaml", "sae_weights.safetensors"]  # fmt: skip
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {
        n: oct(mode) for n in names
    }
