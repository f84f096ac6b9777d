#!/usr/bin/env bash
# Run fastserial's test suite against the OLDEST supported torch (2.6), in a
# separate virtual environment, without touching the system site-packages.
#
#   bash tests/oldest_torch.sh                     # whole suite
#   bash tests/oldest_torch.sh tests/test_semantics_safe.py -x   # args go to pytest
#
# What it does:
#   1. creates (or reuses) the venv at .venv-oldest/ in the repo root (git-ignored);
#   2. installs torch==2.6.* and the `test` extra's other requirements, plus maturin,
#      unless torch 2.6 is already there (first run downloads ~2.5 GB of CUDA wheels
#      that torch 2.6 from PyPI depends on; later runs reuse them);
#   3. builds a release wheel of the working tree with maturin (cargo target dir
#      .venv-oldest/cargo-target, so the main target/ and the editable build's
#      python/fastserial/_fastserial*.so are left alone) and installs it into the venv;
#   4. runs `python -m pytest -q -p no:cacheprovider "$@"` from the repo root with the
#      venv's python.
#
# Environment:
#   PYTHON            interpreter that creates the venv (default: python3)
#   OLDEST_TORCH      torch requirement (default: torch==2.6.*)
#   OLDEST_VENV       venv path (default: <repo>/.venv-oldest)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

venv="${OLDEST_VENV:-$repo/.venv-oldest}"
torch_req="${OLDEST_TORCH:-torch==2.6.*}"
py="$venv/bin/python"

if [ ! -x "$py" ]; then
    echo "oldest_torch: creating venv $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi

# Reuse the venv when its torch already satisfies the requirement.
if ! "$py" - "$torch_req" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
req = Requirement(sys.argv[1])
sys.exit(0 if req.specifier.contains(version("torch"), prereleases=True) else 1)
EOF
then
    echo "oldest_torch: installing $torch_req and test requirements into $venv" >&2
    "$py" -m pip install --upgrade pip packaging
    "$py" -m pip install "$torch_req"
fi

# The `test` extra's other requirements, the runtime dependencies, and the builder.
# (Already satisfied -> pip returns quickly without downloading.)
"$py" -m pip install -q "pytest>=7" "hypothesis>=6" "psutil>=5" "safetensors>=0.4" \
    "numpy>=1.22" "ml_dtypes>=0.3" "maturin>=1.5,<2" "$torch_req"

# Build the working tree into a wheel and install it (not editable: `maturin develop`
# would overwrite python/fastserial/_fastserial*.so, which the system install uses).
wheels="$venv/wheels"
rm -rf "$wheels"
CARGO_TARGET_DIR="$venv/cargo-target" "$venv/bin/maturin" build --release \
    --interpreter "$py" --out "$wheels" >&2
"$py" -m pip install -q --force-reinstall --no-deps "$wheels"/fastserial-*.whl

# Check that the suite will import the venv's fastserial and the old torch.
"$py" - "$venv" <<'EOF'
import os, sys
import torch, fastserial
venv = os.path.realpath(sys.argv[1])
where = os.path.realpath(fastserial.__file__)
print(f"oldest_torch: torch {torch.__version__}, fastserial from {where}", file=sys.stderr)
if not where.startswith(venv + os.sep):
    sys.exit(f"oldest_torch: fastserial imported from outside {venv}")
EOF

exec "$py" -m pytest -q -p no:cacheprovider "$@"
