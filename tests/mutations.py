"""Mutation check: does the suite notice a wrong model? (issue 35)

Each hand-made mutation below is applied, one at a time, to a copy of the source tree (tracked and untracked
files, as `git ls-files -co --exclude-standard` lists them); the tests named with it then run on that copy
(PYTHONPATH and the working directory point at the copy; the script checks that `import stexport` resolves
there). A mutation is killed when those tests fail (pytest exit status 1); a mutation whose pattern no longer
matches the source is an error, never a pass, so a refactor that moves the code shows up here. Prints each
result and the kill rate; exits 1 unless every mutation is killed.

    .venv/bin/python tests/mutations.py            # all; ~2-5 min each on 2 busy cores
    .venv/bin/python tests/mutations.py --list
    .venv/bin/python tests/mutations.py conv-skip-reference softmax-average --baseline

--baseline first runs each mutation's tests on an unmutated copy (they must pass).

Patterns are regular expressions over the files a glob names (relative to the repository root). The
"average logits instead of probabilities" mutation matches every `softmax(X).mean(axis=0)` in
stexport/runtime/**/*.py (today classify.py and batch.py; the scoring code may move to
stexport/runtime/scoring.py: the glob already covers it, adjust the pattern if the expression changes).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    glob: str  # files the pattern applies to
    pattern: str  # a regular expression (re.MULTILINE)
    replacement: str
    tests: tuple[str, ...]  # pytest node ids / files (with -k where given as "FILE::-k EXPR")


FOUNDATION = "tests/test_foundation.py::test_reference_matches_the_official_forward_with_non_trivial_weights"
FOLD = "tests/test_fold.py::test_folded_equals_reference_uint8_and_float"

MUTATIONS = (
    Mutation("in-proj-bias-reference", "drop the attention's in_proj_bias in the reference",
             "stexport/build/reference.py",
             r"F\.linear\(x, self\.attn\.in_proj_weight, self\.attn\.in_proj_bias\)",
             "F.linear(x, self.attn.in_proj_weight)", (FOUNDATION,)),
    Mutation("ln-pre-affine-reference", "drop ln_pre's affine (weight and bias) in the reference",
             "stexport/build/reference.py", r"x = self\.ln_pre\(x\)",
             "x = F.layer_norm(x, x.shape[-1:], eps=self.ln_pre.eps)", (FOUNDATION,)),
    Mutation("quickgelu-to-gelu-reference", "exact GELU where the backbone uses QuickGELU, in the reference",
             "stexport/build/reference.py", r'QuickGELU\(\) if cfg\.act == "quick_gelu" else nn\.GELU\(\)',
             "nn.GELU()", (FOUNDATION,)),
    Mutation("conv-skip-reference", "skip the adapters' depth-wise temporal conv in the reference",
             "stexport/build/reference.py", r"^(\s+)y = self\.conv\(y\)$", r"\1y = y", (FOUNDATION,)),
    Mutation("in-proj-bias-fold", "drop the attention's in_proj_bias in the folded model",
             "stexport/build/fold.py", r"b = mha\.in_proj_bias\.detach\(\)\.clone\(\)",
             "b = torch.zeros_like(mha.in_proj_bias)", (FOLD,)),
    Mutation("conv-skip-fold", "skip the temporal conv (kernel (kt,1,1) path) in the folded model",
             "stexport/build/fold.py", r"y = self\.tconv\(self\.fc1\(x\)\.reshape\(-1, T, L, W\)\)",
             "y = self.fc1(x).reshape(-1, T, L, W)", (FOLD,)),
    Mutation("softmax-average", "average the views' logits instead of their probabilities",
             "stexport/runtime/**/*.py", r"softmax\(([\w\[\]:. +]+?)\)\.mean\(axis=0\)",
             r"softmax(\1.mean(axis=0, keepdims=True))[0]",
             ("tests/test_infer.py::test_views_softmax_averaged_like_official_eval",
              "tests/test_infer.py::test_views_are_scored_by_averaging_probabilities_not_logits")),
    Mutation("frame-index-off-by-one", "every sampled frame index one later (rate > 0)",
             "stexport/runtime/video.py", r"min\(st \+ j \* r, n - 1\)", "min(st + j * r + 1, n - 1)",
             ("tests/test_video.py::-k test_frame_indices_match_official",)),
    Mutation("frame-index-off-by-one-uniform", "uniform sampling (rate 0) one frame later",
             "stexport/runtime/video.py", r"\(round\(seg \* i\) \+ round\(seg \* \(i \+ 1\)\)\) // 2",
             "(round(seg * i) + round(seg * (i + 1))) // 2 + 1",
             ("tests/test_video.py::-k test_frame_indices_match_official",)),
)


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def apply(m: Mutation, tree: Path) -> int:
    """Apply `m` in `tree`; returns how many places changed."""
    n = 0
    for path in sorted(tree.glob(m.glob)):
        text = path.read_text()
        new, k = re.subn(m.pattern, m.replacement, text, flags=re.MULTILINE)
        if k:
            path.write_text(new)
            n += k
    return n


# in file order (pyproject's addopts pins pytest-randomly's seed, so `-p no:randomly` is a usage error, exit 4)
PYTEST_FLAGS = ("-q", "-x", "--randomly-dont-reorganize", "-p", "no:cacheprovider")


def pytest_args(tests: tuple[str, ...]) -> list[str]:
    args = []
    for t in tests:
        path, _, k = t.partition("::-k ")
        args += [path, "-k", k] if k else [t]
    return args


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    where = subprocess.run([sys.executable, "-c", "import stexport; print(stexport.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True)
    if not where.stdout.startswith(str(tree)):
        raise SystemExit(f"import stexport does not resolve to the copy: {where.stdout or where.stderr}")
    cmd = [sys.executable, "-m", "pytest", *PYTEST_FLAGS, *pytest_args(tests)]
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    tail = (p.stdout + p.stderr).strip().splitlines()
    return p.returncode, tail[-1] if tail else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--baseline", action="store_true", help="first run each mutation's tests unmutated")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    a = ap.parse_args()
    chosen = [m for m in MUTATIONS if not a.names or m.name in a.names]
    if a.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:32s} {m.what}  [{m.glob}] -> {' '.join(m.tests)}")
        return 0 if a.list else 2
    killed = 0
    with tempfile.TemporaryDirectory(prefix="stexport-mutations-") as tmp:
        pristine = Path(tmp) / "pristine"
        copy_tree(pristine)
        if a.baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                code, last = run_tests(pristine, tests, a.timeout)
                print(f"baseline {' '.join(tests)}: {'pass' if code == 0 else 'FAIL'} ({last})", flush=True)
                if code != 0:
                    return 1
        for m in chosen:
            tree = Path(tmp) / m.name
            shutil.copytree(pristine, tree)
            t0 = time.perf_counter()
            places = apply(m, tree)
            if not places:
                print(f"ERROR    {m.name}: pattern {m.pattern!r} matches nothing in {m.glob}", flush=True)
                continue
            code, last = run_tests(tree, m.tests, a.timeout)
            verdict = "killed" if code == 1 else "SURVIVED" if code == 0 else f"ERROR({code})"
            killed += code == 1
            print(f"{verdict:8s} {m.name} ({places} place{'s' * (places > 1)}; {time.perf_counter() - t0:.0f} s): "
                  f"{last}", flush=True)
            shutil.rmtree(tree, ignore_errors=True)
    print(f"kill rate: {killed}/{len(chosen)} ({100 * killed / len(chosen):.0f}%)")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
