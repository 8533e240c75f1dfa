#!/usr/bin/env bash
# The lowest versions pyproject.toml allows for stexport's direct dependencies: install them and run the tests
# that exercise each. Opt-in, not part of .ci/run: it downloads old wheels (~150 MB) and takes several minutes.
#
#   bash .ci/lowest.sh            # after the README's install (.venv); LOW=dir BASE=dir to change the venvs
#
# uv (installed from PyPI into the new environment) resolves pyproject.toml with `--resolution lowest-direct`:
# every `name>=X` dependency at the lowest release that exists for this Python and platform, exact pins
# (torch==…) kept, transitive dependencies at the highest versions that fit. That set is installed into a new
# environment; the test run then shows whether the floors really work. Raise a floor in pyproject.toml when
# they do not.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-.venv}
LOW=${LOW:-.venv-lowest}
TESTS=${TESTS:-"tests/test_video.py tests/test_infer.py tests/test_foundation.py tests/test_build_verify.py tests/test_export.py"}

rm -rf "$LOW"
python3 -m venv "$LOW"
"$LOW/bin/pip" install -q uv
# The full lowest-direct resolution (uv: each direct dependency at the lowest version pyproject.toml allows,
# transitive ones at the highest that fit), for this Python.
SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt} "$LOW/bin/uv" pip compile pyproject.toml \
    --extra dev --resolution lowest-direct --python "$LOW/bin/python" --native-tls --quiet -o "$LOW.lock"
# Install it; torch's own stack (torch, torchvision, triton, the CUDA wheels: ~5 GB, and torch is pinned with ==)
# is taken from the base environment, whose site-packages the new one lists after its own.
site=$("$LOW/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$BASE/bin/python" -c "import sys; print('\n'.join(p for p in sys.path if p.endswith('-packages')))" \
    > "$site/zz_base_packages.pth"
"$BASE/bin/python" - "$LOW.lock" > "$LOW.install.txt" <<'PY'
import re
import sys
from importlib.metadata import version

skip = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, pin = line.split("==")
    if skip.match(name):
        have = version(name) if name in ("torch", "torchvision") else None
        if have is not None and have.split("+")[0] != pin:
            raise SystemExit(f"{name}=={pin} is pinned but the base environment has {have}")
        continue
    print(line)
PY
echo "lowest-direct resolution (installed here; torch's stack from $BASE):"
sed 's/^/  /' "$LOW.install.txt" | tr '\n' ' '; echo
"$LOW/bin/pip" install -q --no-deps -r "$LOW.install.txt"
"$LOW/bin/pip" install -q --no-deps -e .
"$LOW/bin/python" - <<'PY'
from importlib.metadata import version
for name in ("numpy", "opencv-python-headless", "onnx", "onnxscript", "onnxruntime", "open_clip_torch", "typer",
             "safetensors", "tqdm", "openvino", "torch"):
    try:
        print(f"  {name} {version(name)}")
    except Exception as e:  # noqa: BLE001
        print(f"  {name}: {e}")
PY
# shellcheck disable=SC2086
"$LOW/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider $TESTS
