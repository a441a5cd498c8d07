"""A search of the code for every way a file could run code when it is read (docs/security.md):
pickle loads, `torch.load` without `weights_only=True`, `np.load(allow_pickle=True)`, YAML's
object loaders, `eval`/`exec`/`compile`, dynamic imports, Hydra's `instantiate` and its class
lookups, and `trust_remote_code`. The few uses that remain are listed here with the reason each
is safe; a new one fails this test until it is reviewed and added. The scanner is tested on
snippets holding each pattern, so it cannot pass by finding nothing."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

PACKAGES = ("benchmark", "baselines", "interop", "hydra_plugins", "scripts")

# (file, function, what): each reviewed use, with why it does not read code from a file.
ALLOWED = {
    # The user's own composed config (conf/ + overrides), never a saved file.
    ("benchmark/saes.py", "build_sae", "instantiate"),
    ("benchmark/run.py", "start_logger", "instantiate"),  # the logger node of the composed config
    ("benchmark/validate.py", "check_target", "get_object"),  # pre-flight of the composed config
    # A saved SAE's _target_: only modules of baselines/, interop/ or named by conf/sae/*.yaml, then
    # checked to be a SparseAutoencoder class before anything is called (load_sae).
    ("benchmark/saes.py", "_saved_class", "importlib.import_module"),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


UNPICKLERS = ("pickle", "cPickle", "dill", "shelve", "marshal", "joblib")
HYDRA_LOOKUPS = ("instantiate", "get_class", "get_method", "get_object", "_locate")


def finding(call: ast.Call) -> str | None:
    """What is risky about this call, or None."""
    name = _dotted(call.func)
    root, last = name.split(".")[0], name.rsplit(".", 1)[-1]
    if name in ("eval", "exec", "compile", "__import__"):
        return name
    if name.endswith("torch.load"):
        return None if _is_true(_keyword(call, "weights_only")) else "torch.load"
    if root in UNPICKLERS and last in ("load", "loads", "Unpickler", "open"):
        return name
    if root in ("np", "numpy") and _is_true(_keyword(call, "allow_pickle")):
        return "np.load(allow_pickle=True)"
    if root == "yaml" and last in ("load", "load_all", "unsafe_load", "full_load"):
        return name
    if last in HYDRA_LOOKUPS:
        return last
    if name in ("importlib.import_module", "import_module"):
        return "importlib.import_module"
    if _is_true(_keyword(call, "trust_remote_code")):
        return "trust_remote_code=True"
    return None


def scan(source: str, file: str) -> set[tuple[str, str, str]]:
    """{(file, enclosing function, what)} for every risky call in `source`."""
    found = set()

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.Call) and (what := finding(node)):
            found.add((file, func, what))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(ast.parse(source), "<module>")
    return found


def test_the_code_reads_files_as_data_only():
    found = set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            file = str(path.relative_to(ROOT))
            found |= scan(path.read_text(encoding="utf-8"), file)
    assert found - ALLOWED == set(), "a new way to run code from data: review it (see docstring)"
    assert ALLOWED - found == set(), "a reviewed use is gone: remove it from ALLOWED"


@pytest.mark.parametrize(
    ("snippet", "what"),
    [
        ("torch.load(p)", "torch.load"),
        ("torch.load(p, weights_only=False)", "torch.load"),
        ("pickle.loads(b)", "pickle.loads"),
        ("pickle.load(fh)", "pickle.load"),
        ("np.load(p, allow_pickle=True)", "np.load(allow_pickle=True)"),
        ("numpy.load(p, allow_pickle=True)", "np.load(allow_pickle=True)"),
        ("yaml.load(text, Loader=yaml.Loader)", "yaml.load"),
        ("yaml.unsafe_load(text)", "yaml.unsafe_load"),
        ("eval(text)", "eval"),
        ("exec(text)", "exec"),
        ("__import__(name)", "__import__"),
        ("hydra.utils.instantiate(node)", "instantiate"),
        ("instantiate(node)", "instantiate"),
        ("get_class(name)", "get_class"),
        ("importlib.import_module(name)", "importlib.import_module"),
        ("AutoModel.from_pretrained(p, trust_remote_code=True)", "trust_remote_code=True"),
    ],
)
def test_the_scanner_finds_each_pattern(snippet, what):
    assert scan(f"def f():\n    {snippet}\n", "x.py") == {("x.py", "f", what)}


@pytest.mark.parametrize(
    "snippet",
    [
        "torch.load(p, weights_only=True)",
        "np.load(p)",
        "np.load(p, mmap_mode='r')",
        "yaml.safe_load(text)",
        "sae.eval()",
        "json.loads(text)",
        "subprocess.call(['ls'])",
    ],
)
def test_the_scanner_lets_safe_calls_pass(snippet):
    assert scan(f"def f():\n    {snippet}\n", "x.py") == set()
