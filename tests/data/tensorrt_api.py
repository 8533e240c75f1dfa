"""The TensorRT Python API names stexport's TensorRT layer uses, and which of them each bindings wheel has.

TensorRT cannot be installed on this project's machines, but NVIDIA's bindings wheels download, and the string
table of their tensorrt.so holds every name the pybind11 module registers. This script scans trt_engines/*.py
for the names used (see `used_names`) and writes, per wheel, whether each is there. tests/test_trt.py runs the
same scan and checks the result against the committed list.

A "tail" (the name is only the end of a longer string of tensorrt.so: the linker stores "Builder" inside
"IBuilder") is necessary, not sufficient. tests/data/tensorrt-source-names.txt adds the bindings' source:
whether each name is a string literal ("name") of NVIDIA/TensorRT's python/src/**/*.cpp, the pybind11 code
that registers every class, method, enum value and keyword. test_trt.py requires that for every "tail" name.

Regenerate tests/data/tensorrt-source-names.txt from a checkout of github.com/NVIDIA/TensorRT with:

    python tests/data/tensorrt_api.py --source TENSORRT_CHECKOUT > tests/data/tensorrt-source-names.txt

Regenerate tests/data/tensorrt-api-names.txt with:

    pip download --no-deps -d /tmp/trtb tensorrt-cu12-bindings==10.16.1.11
    pip download --no-deps -d /tmp/trtb tensorrt-cu13-bindings==11.4.0.106
    python tests/data/tensorrt_api.py /tmp/trtb/tensorrt_cu12_bindings-10.16.1.11-*.whl \\
        /tmp/trtb/tensorrt_cu13_bindings-11.4.0.106-*.whl > tests/data/tensorrt-api-names.txt
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Variables that hold TensorRT objects in trt_engines/*.py (as locals or as self.<name>); `trt` is the module.
TRT_OBJECTS = {"trt", "builder", "network", "parser", "config", "shapes", "tcache", "runtime", "engine",
               "context", "refitter", "prototype"}
# APIs gone in TensorRT 11 that a strongly typed build must not use; listed to show the wheels tell them apart
REMOVED = ("FP16", "int8_calibrator", "EXPLICIT_BATCH", "platform_has_fast_fp16", "device_memory_size")


def _chain(node: ast.AST) -> tuple[str | None, list[str]]:
    """`a.b().c.d` → ("a", ["b", "c", "d"]): the root name and the attribute names, calls skipped."""
    names = []
    while True:
        if isinstance(node, ast.Attribute):
            names.insert(0, node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            return (node.id if isinstance(node, ast.Name) else None), names


def _trt_names(node: ast.AST) -> list[str] | None:
    """The TensorRT names an expression uses, or None if it is not rooted in a TensorRT object."""
    root, names = _chain(node)
    if root in TRT_OBJECTS:
        return names
    if root == "self" and names and names[0] in TRT_OBJECTS - {"trt"}:
        return names[1:]
    return None


def used_names(files) -> set[str]:
    """Attributes and methods reached from TensorRT objects, keyword names of calls on them, names passed to
    getattr on them, and the callbacks of classes deriving from trt.* (TensorRT calls those by name)."""
    found: set[str] = set()
    for path in files:
        tree = ast.parse(Path(path).read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                found.update(_trt_names(node) or [])
            elif isinstance(node, ast.Call):
                if _trt_names(node.func) is not None:
                    found.update(k.arg for k in node.keywords if k.arg)
                f = node.func
                if (isinstance(f, ast.Name) and f.id in ("getattr", "hasattr") and len(node.args) > 1
                        and _trt_names(node.args[0]) is not None and isinstance(node.args[1], ast.Constant)):
                    found.add(node.args[1].value)
            elif isinstance(node, ast.ClassDef) and any(_chain(b)[0] == "trt" for b in node.bases):
                found.update(f.name for f in node.body
                             if isinstance(f, ast.FunctionDef) and f.name != "__init__")
    return found


def trt_engine_files() -> list[Path]:
    return sorted((ROOT / "trt_engines").glob("*.py"))


def wheel_api(wheel: Path) -> tuple[str, str, set[str], set[str]]:
    """(version, sha256, strings of tensorrt.so, names defined at the top of the package's __init__.py)."""
    with zipfile.ZipFile(wheel) as z:
        so = next(n for n in z.namelist() if n.endswith("/tensorrt.so"))
        init = so.rsplit("/", 1)[0] + "/__init__.py"
        strings = {m.decode() for m in re.findall(rb"[\x20-\x7e]{3,}", z.read(so))}
        tree = ast.parse(z.read(init).decode())
    py = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            py.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                py.add(t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", ""))
    version = re.search(r"bindings-([0-9.]+)-", wheel.name).group(1)
    return version, hashlib.sha256(wheel.read_bytes()).hexdigest(), strings, py


def presence(name: str, strings: set[str], py: set[str]) -> str:
    """"exact": a string of tensorrt.so; "init": defined in the package's __init__.py; "tail": only the end of
    a longer string (the linker stores a string that is the tail of another only once: "Logger" lives inside
    "ILogger"); "no": absent. "tail" is necessary, not sufficient ("INT8" is the tail of "UINT8")."""
    if name in strings:
        return "exact"
    if name in py:
        return "init"
    return "tail" if any(s.endswith(name) for s in strings) else "no"


def source_literals(checkout: Path) -> tuple[str, set[str]]:
    """(TensorRT version of the checkout, every identifier-like string literal of its python/src/**/*.cpp)."""
    header = (checkout / "include" / "NvInferVersion.h").read_text()
    version = ".".join(re.search(rf"#define TRT_{part}_ENTERPRISE (\d+)", header).group(1)
                       for part in ("MAJOR", "MINOR", "PATCH", "BUILD"))
    found = set()
    for cpp in sorted((checkout / "python" / "src").rglob("*.cpp")):
        found.update(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"', cpp.read_text()))
    return version, found


def main_source(checkout: str) -> None:
    version, found = source_literals(Path(checkout))
    names = sorted(used_names(trt_engine_files()) | set(REMOVED), key=str.lower)
    print("# Whether each TensorRT API name of tensorrt-api-names.txt is a string literal of the Python")
    print("# bindings' source (NVIDIA/TensorRT python/src/**/*.cpp: pybind11 registers every name there).")
    print("# Produced by tests/data/tensorrt_api.py --source (its docstring has the command).")
    print(f"# source TensorRT {version}")
    for n in names:
        print(n, "yes" if n in found else "no")


def main(wheels: list[str]) -> None:
    apis = [wheel_api(Path(w)) for w in wheels]
    names = sorted(used_names(trt_engine_files()) | set(REMOVED), key=str.lower)
    print("# TensorRT Python API names used by trt_engines/*.py (and a few removed in 11.x), per bindings")
    print("# wheel. Produced by tests/data/tensorrt_api.py (its docstring has the command); checked by")
    print("# tests/test_trt.py. exact: a string of tensorrt.so; init: defined in tensorrt/__init__.py;")
    print("# tail: only the end of a longer string (the linker merges string tails: 'Logger' is stored")
    print("# inside 'ILogger'); no: absent.")
    for v, sha, _, _ in apis:
        print(f"# wheel {v}: sha256 {sha}")
    print("# name " + " ".join(v for v, *_ in apis))
    for n in names:
        print(n, *(presence(n, s, py) for _, _, s, py in apis))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--source"]:
        main_source(sys.argv[2])
    else:
        main(sys.argv[1:])
