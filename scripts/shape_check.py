"""The code's shape against issue-21 limits: modules over 400 lines, functions over 80 lines,
import cycles between the suite's modules (benchmark/, baselines/, interop/), private names
(`_x`) imported across files, and config parameters below the entry point: a function of a
stage module (any suite module outside CONFIG_LAYER) whose parameter is annotated DictConfig
(or DictConfig-like: ListConfig, OmegaConf containers) or is named `cfg` / `*_cfg`, the
suite's names for a config node, untyped or typed Any. Stages take the typed specs of benchmark/specs.py.

    python scripts/shape_check.py [--max-module 400] [--max-function 80] [--strict]

Prints each violation on one line and a summary; exits 1 with --strict when there is any
(a target the code base is being reshaped towards, so not yet part of the default tests).
Function length counts the lines from `def` to the last line of the body, docstring included.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "baselines", "interop")
# The modules that read the composed (or a saved run's) config tree: the entry points and their
# pre-flight checks, the spec builders, Hydra plumbing, the planner (it composes configs itself).
CONFIG_LAYER = (
    "benchmark.run", "benchmark.runchecks", "benchmark.specs", "benchmark.validate",
    "benchmark.identity", "benchmark.compose", "benchmark.hub", "benchmark.massive",
    "benchmark.fanout", "benchmark.sweep", "benchmark.cli_errors", "benchmark.plan",
)  # fmt: skip
CONFIG_TYPES = ("DictConfig", "ListConfig", "Container")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def long_functions(tree: ast.AST, limit: int) -> list[tuple[str, int, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > limit:
                found.append((node.name, node.lineno, n))
    return found


def config_params(tree: ast.AST) -> list[tuple[str, int, str]]:
    """(function, line, parameter) for each parameter that takes a config node: annotated
    with an OmegaConf container type, or named cfg / *_cfg without a type or typed Any (a
    typed `cfg: TrainConfig` is a spec)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
                note = ast.unparse(p.annotation) if p.annotation is not None else ""
                named = p.arg == "cfg" or p.arg.endswith("_cfg")
                if (named and note in ("", "Any")) or any(t in note for t in CONFIG_TYPES):
                    found.append((node.name, node.lineno, p.arg))
    return found


def in_config_layer(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in CONFIG_LAYER)


def imports(name: str, tree: ast.AST, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module imported, names imported from it) for every import of a suite module, at any
    depth (function-level imports count: they are how cycles are usually hidden)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import (none in the suite today): resolve it
                pkg = name.split(".")
                if known[name].name != "__init__.py":
                    pkg = pkg[:-1]
                base = ".".join([*pkg[: len(pkg) - node.level + 1], node.module])
            if base in known:
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
                out += [(s, []) for s in subs]
                out.append((base, [a.name for a in node.names if f"{base}.{a.name}" not in known]))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def collect(max_module: int = 400, max_function: int = 80) -> list[str]:
    """Every violation, one line each (module lengths, function lengths, private imports
    across files, import cycles)."""
    known = modules()
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        text = path.read_text()
        tree = ast.parse(text)
        n_lines = len(text.splitlines())
        rel = path.relative_to(ROOT)
        if n_lines > max_module:
            problems.append(f"module {rel}: {n_lines} lines (> {max_module})")
        for fn, line, n in long_functions(tree, max_function):
            problems.append(f"function {rel} {fn}() at line {line}: {n} lines (> {max_function})")
        if name.startswith("benchmark.") and not in_config_layer(name):
            for fn, line, arg in config_params(tree):
                problems.append(f"config parameter {rel} {fn}({arg}) at line {line}")
        graph[name] = set()
        for target, names in imports(name, tree, known):
            if target == name:
                continue
            graph[name].add(target)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"private import {rel}: {', '.join(private)} from {target}")
    for comp in cycles(graph):
        problems.append(f"import cycle: {' <-> '.join(comp)}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-module", type=int, default=400)
    ap.add_argument("--max-function", type=int, default=80)
    ap.add_argument("--strict", action="store_true")
    a = ap.parse_args()
    problems = collect(a.max_module, a.max_function)
    for p in problems:
        print(p)
    kinds = ("module", "function", "private import", "import cycle", "config parameter")
    print("summary: " + ", ".join(f"{sum(p.startswith(k) for p in problems)} {k}" for k in kinds))
    return 1 if a.strict and problems else 0


if __name__ == "__main__":
    sys.exit(main())
