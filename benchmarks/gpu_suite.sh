#!/usr/bin/env bash
# The GPU check of cellplm_scvi, in one call of about 4 minutes.
#
#   0. setup:     install the carried wheels of ./.whl (benchmarks/gpu_wheels.sh) into $SITE,
#                 nvidia-smi, versions of python / torch / CUDA / NCCL / scvi-tools / ...
#   1. tests:     tests/test_gpu.py with CELLPLM_TEST_DEVICE (embedding vs CPU, bf16 / fp16
#                 inference, CSR embedder, bf16- and 16-mixed training, DDP at world size 1)
#   2. bench_gpu: benchmarks/bench_gpu.py at the 85M configuration (tissues of 10,000 cells)
#   3. extra:     every other benchmarks/bench_gpu_*.py that exists (none yet: skipped)
#
# Each section has its own timeout, and all of them share one deadline ($SUITE_SECONDS, 400 s;
# with CELLPLM_TEST_DEVICE=cpu every limit is multiplied by $SCALE, 4).
# Reports go to $OUT (default ./gpu_out) as they are written: one log per section and
# summary.txt (section, exit status, seconds).
#
# On the GPU machine (repository root, .whl carried):
#     bash benchmarks/gpu_suite.sh
# Dry run on a CPU (small sizes, the same steps, with a python like the machine's):
#     CELLPLM_TEST_DEVICE=cpu PYTHON=/work/venv312-device/bin/python bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
export CELLPLM_TEST_DEVICE=${CELLPLM_TEST_DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
if [ "$CELLPLM_TEST_DEVICE" = cpu ]; then
  SCALE=${SCALE:-4}  # section timeouts x4: a small shared CPU machine is slow
  BENCH_ARGS=${BENCH_ARGS:---device cpu --small --n-cells 300 --n-tissues 2 --train-epochs 1}
  BENCH_ARGS="$BENCH_ARGS --precisions 32 bf16 16 --train-precisions 32 bf16-mixed"
  EXTRA_ARGS=${EXTRA_ARGS:---device cpu --small}
else
  BENCH_ARGS=${BENCH_ARGS:---device $CELLPLM_TEST_DEVICE}  # 85M, 4 tissues x 10,000 cells
  EXTRA_ARGS=${EXTRA_ARGS:---device $CELLPLM_TEST_DEVICE}
  SCALE=${SCALE:-1}
fi
SUITE_SECONDS=${SUITE_SECONDS:-$((400 * SCALE))}

START=$(date +%s)
FAILED=0
: >"$OUT/summary.txt"

# section NAME SECONDS COMMAND...: run COMMAND under `timeout` (capped by the suite's deadline),
# its output teed into $OUT/NAME.log; one line per section in $OUT/summary.txt
section() {
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local left=$((SUITE_SECONDS - ($(date +%s) - START)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: not run, the suite's $SUITE_SECONDS s are spent" | tee -a "$OUT/summary.txt"
    FAILED=1
    return
  fi
  echo "=== $name (timeout ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || FAILED=1
  echo "=== $name: rc $rc$( [ "$rc" -eq 124 ] && echo ' (timed out)'), $(($(date +%s) - t0)) s" \
    | tee -a "$OUT/summary.txt"
}

setup() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
    PYTHONPATH= "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" .whl/*.whl || return 1
  else
    echo "no .whl/: using the installed packages (run benchmarks/gpu_wheels.sh and carry .whl)"
  fi
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
      --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$PYTHON" - <<'EOF'
import importlib.metadata as md
import os
import platform
import sys

import torch

print(f"python {sys.version.split()[0]} at {sys.executable}; {platform.platform()}")
print(f"CPU cores {os.cpu_count()}; CELLPLM_TEST_DEVICE={os.environ['CELLPLM_TEST_DEVICE']}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(
        f"device {props.name}: {props.total_memory / 2**30:.0f} GiB, capability "
        f"{props.major}.{props.minor}, {props.multi_processor_count} SMs; bf16 supported: "
        f"{torch.cuda.is_bf16_supported()}; cuDNN {torch.backends.cudnn.version()}; NCCL "
        f"{'.'.join(map(str, torch.cuda.nccl.version()))}"
    )
print(f"float32 matmul precision: {torch.get_float32_matmul_precision()}")
for name in ("scvi-tools", "lightning", "anndata", "scanpy", "numpy", "scipy", "pandas",
             "h5py", "scikit-learn", "numba", "pyro-ppl", "zarr", "pytest"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: NOT INSTALLED")
import cellplm_scvi  # noqa: E402

print(f"cellplm_scvi from {cellplm_scvi.__file__}")
EOF
}

tests() {
  "$PYTHON" -m pytest -p no:cacheprovider -q -rA --durations=15 tests/test_gpu.py
}

extra() {
  local script ran=0
  for script in benchmarks/bench_gpu_*.py; do
    [ -e "$script" ] || continue
    ran=1
    echo "--- $script $EXTRA_ARGS"
    # shellcheck disable=SC2086
    timeout -k 5 "${EXTRA_SECONDS:-90}" "$PYTHON" "$script" $EXTRA_ARGS || echo "--- rc $?"
  done
  [ "$ran" -eq 1 ] || echo "skipped: no other benchmarks/bench_gpu_*.py"
}

# the repository (cellplm_scvi is not installed there), then the carried packages
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHON SITE EXTRA_ARGS
export -f setup tests extra  # `timeout` runs them in a child bash
section 00_setup 90 bash -c setup
section 01_tests 150 bash -c tests
# shellcheck disable=SC2086
section 02_bench_gpu 180 "$PYTHON" benchmarks/bench_gpu.py $BENCH_ARGS
section 03_extra 60 bash -c extra
echo "=== total $(($(date +%s) - START)) s; reports in $OUT" | tee -a "$OUT/summary.txt"
exit "$FAILED"
