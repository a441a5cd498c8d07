"""A ratchet on the code's shape (scripts/shape_check.py): modules over 400 lines, functions
over 80, private names imported across files, import cycles and config parameters below the
entry point (stages take benchmark/specs.py's typed specs) may only shrink, and none is left:
a new one fails here."""

from __future__ import annotations

import ast
import importlib.util

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("shape_check", ROOT / "scripts" / "shape_check.py")
assert spec is not None and spec.loader is not None
shape_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shape_check)

KNOWN: set[str] = set()  # none left: the reshaping (issue 21) removed the last ones


def key(problem: str) -> str:
    if problem.startswith("private import"):  # every name counts
        return problem
    head = problem.split(": ", 1)[0]
    return head.rsplit(" ", 1)[0] if head.startswith("function") else head


def test_no_new_shape_violations():
    problems = shape_check.collect()
    new = [p for p in problems if key(p) not in KNOWN]
    assert not new, (
        "new shape violations (split the module or function, import public names, break the "
        "import cycle):\n" + "\n".join(new)
    )


def test_reshaped_packages_stay_small():
    """Packages already reshaped (benchmark/plan/: issue 21) keep functions within 60 lines."""
    reshaped = ("benchmark/plan/", "benchmark/plan.py")
    problems = [p for p in shape_check.collect(max_function=60) if any(r in p for r in reshaped)]
    assert not problems, "\n".join(problems)


def test_checker_finds_each_kind(tmp_path, monkeypatch):
    """The checker on a made-up package: a long module and function, a private import, a cycle."""
    pkg = tmp_path / "benchmark"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    (pkg / "a.py").write_text(f"from benchmark.b import _hidden\n\n\ndef long():\n{body}\n")
    (pkg / "c.py").write_text("def stage(cfg, data_cfg: Any, spec: Spec, node: DictConfig):\n    pass\n"
                              "def typed(cfg: TrainConfig):\n    pass\n")  # fmt: skip
    (pkg / "run.py").write_text("def entry(cfg):\n    pass\n")  # the entry point may
    (pkg / "b.py").write_text("import benchmark.a\n\n_hidden = 1\n" + "\n" * 400)
    (tmp_path / "baselines").mkdir()
    monkeypatch.setattr(shape_check, "ROOT", tmp_path)
    got = {key(p) for p in shape_check.collect()}
    assert got == {"module benchmark/b.py", "function benchmark/a.py long() at line",
                   "private import benchmark/a.py: _hidden from benchmark.b", "import cycle",
                   "config parameter benchmark/c.py stage(cfg) at line 1",
                   "config parameter benchmark/c.py stage(data_cfg) at line 1",
                   "config parameter benchmark/c.py stage(node) at line 1"}  # fmt: skip


def _suite_imports(package: str) -> list[tuple[str, str]]:
    """(module, suite module it imports) for every module of `package`, at any depth."""
    known = shape_check.modules()
    return [(name, target) for name, path in known.items() if name.split(".")[0] == package
            for target, _ in shape_check.imports(name, ast.parse(path.read_text()), known)]  # fmt: skip


def test_baselines_import_nothing_of_the_suite():
    """baselines/ holds only the architectures under test: it imports neither interop/ (the
    released formats, which build baselines' classes) nor benchmark/; interop/ imports no
    benchmark/ module (benchmark uses both)."""
    assert [(m, t) for m, t in _suite_imports("baselines") if not t.startswith("baselines")] == []
    assert [(m, t) for m, t in _suite_imports("interop") if t.startswith("benchmark")] == []
    assert any(t.startswith("baselines") for _, t in _suite_imports("interop"))  # it scans
