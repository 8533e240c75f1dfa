"""The layout's rules, derived from the folders: the wings' import contracts (import-linter, declared in
pyproject.toml) and no private names imported across modules."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each top-level folder installs (pyproject.toml's package-dir)
INSTALLED_AS = {"stexport": "stexport", "cli": "stexport/cli", "calibration": "stexport/calibration",
                "trt_engines": "stexport/trt_engines"}


def installed_shape(tmp: Path) -> Path:
    """A tree shaped like the installed package (stexport/cli, stexport/calibration, …), made of links to the
    checkout, so the linter sees every wing where `pip install` puts it."""
    pkg = tmp / "stexport"
    pkg.mkdir()
    for entry in (ROOT / "stexport").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for folder, where in INSTALLED_AS.items():
        if folder != "stexport":
            (tmp / where).symlink_to(ROOT / folder)
    return tmp


def test_import_contracts_hold(tmp_path):
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("import-linter is not installed: pip install -e '.[dev]'")
    tree = installed_shape(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree,
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout and "KEPT" in p.stdout


def modules() -> dict[str, Path]:
    out = {}
    for folder, where in INSTALLED_AS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [*where.split("/"), *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def test_no_private_names_imported_across_modules():
    """`from stexport.x import _helper` couples a module to another's internals: make it public or move it."""
    mods = modules()
    bad = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("stexport"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != name:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
    assert bad == []


def test_every_module_is_in_a_wing_or_a_named_utility():
    """A new module goes in a wing's folder; the top level holds only the public API and small utilities."""
    top = {p.stem for p in (ROOT / "stexport").glob("*.py")}
    assert top == {"__init__", "_moved", "errors", "fileutil", "logs", "interrupt", "extras", "onnx_graph",
                   "version"}, "a new top-level module: put it in bundle/, runtime/, serving/ or build/"


def test_moved_paths_still_import_for_one_release():
    """The public paths of 0.1 resolve to the same objects, with a DeprecationWarning naming the new path."""
    import importlib
    import warnings

    from stexport import _moved

    for old, new in _moved.MOVED.items():
        first = old not in sys.modules
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod = importlib.import_module(old)
        assert mod is importlib.import_module(new), old
        assert not first or any(new in str(w.message) for w in caught), old
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import stexport.backends.base as old_base
        import stexport.backends.ort as old_ort
    from stexport.runtime.backends import base, ort
    assert old_ort is ort and old_base.Backend is base.Backend  # a submodule is not loaded twice
    with pytest.warns(DeprecationWarning, match="stexport.runtime.spec"):
        from stexport.batch import ClassifierSpec
    from stexport.runtime.spec import ClassifierSpec as now
    assert ClassifierSpec is now
    with pytest.warns(DeprecationWarning, match="stexport.bundle.store"):
        from stexport.bundle import Bundle  # noqa: F401


def test_no_import_circles_between_modules():
    """Imports between stexport's modules (inside functions too) form no circle."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("stexport"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    state: dict[str, int] = {}
    circles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                circles.append(" -> ".join([*stack[stack.index(d):], d]))
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ importing its own submodules is how packages re-export; not a circle of modules
    circles = [c for c in circles if not all(p.startswith(c.split(" -> ")[0]) for p in c.split(" -> "))]
    assert circles == []


def test_the_mutation_checks_pytest_command_is_valid():
    """tests/mutations.py runs pytest with fixed flags on each mutated copy; flags pytest refuses (exit 4, as
    `-p no:randomly` became once addopts pinned the seed) made every mutation an error, a 0/9 kill rate."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from mutations import PYTEST_FLAGS
    finally:
        sys.path.pop(0)
    r = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_FLAGS, "--collect-only", "tests/test_docs.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
