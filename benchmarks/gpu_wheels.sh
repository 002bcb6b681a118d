#!/usr/bin/env bash
# Download the Python 3.12 wheels that the GPU machine lacks into ./.whl (ignored by git).
#
# The lent GPU machine (nvidia-h200, see benchmarks/README.md "Running the GPU suite") has
# Python 3.12 with torch, lightning, numpy, scipy, pandas, h5py, scikit-learn, numba, matplotlib,
# seaborn, statsmodels, xarray, tensorboard, torchmetrics, rich, pyyaml, absl-py, six, ... but
# no registry access. This script fetches, without their dependencies, exactly the packages
# cellplm_scvi needs on top of those: scvi-tools 1.4.2 and the closure of its requirements
# (each wheel's Requires-Dist) that the machine does not already have. Versions are those of
# the project's 3.11 venv. squidpy is left out (only assign_tissues' spatial graph imports it).
#
# Usage (repository root):  bash benchmarks/gpu_wheels.sh
# Install there (offline):  python3 -m pip install -q --no-index --no-deps --no-compile \
#     --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

WHEELS=(
  scvi-tools==1.4.2
  anndata==0.12.19     # scvi-tools, scanpy, mudata
  mudata==0.3.10       # scvi-tools
  scanpy==1.11.5       # scvi-tools (scanpy[skmisc]: scikit-misc only for seurat_v3 HVGs)
  ml-collections==1.1.0  # scvi-tools (absl-py, pyyaml are there)
  pyro-ppl==1.9.2      # scvi-tools (opt-einsum is there)
  pyro-api==0.1.2      # pyro-ppl
  sparse==0.19.3       # scvi-tools (numba is there)
  zarr==3.1.6          # anndata
  numcodecs==0.16.6    # zarr
  donfig==0.8.1.post1  # zarr
  google-crc32c==1.9.0 # zarr
  array-api-compat==1.16.0  # anndata
  legacy-api-wrap==1.5 # anndata, scanpy
  natsort==8.4.0       # anndata, scanpy
  scverse-misc==0.0.3  # anndata, mudata
  session-info2==0.4.1 # scanpy, mudata, scverse-misc
  umap-learn==0.5.12   # scanpy
  pynndescent==0.7.0   # scanpy, umap-learn
  pandas==2.3.3        # anndata 0.12 needs pandas < 3; the machine's pandas may be 3.x
  pytz==2026.6         # pandas 2 (python-dateutil is there)
  tzdata==2026.6       # pandas 2
)

# sdist only on PyPI, pure Python: built into a py3-none-any wheel here
SDISTS=(
  docrep==0.3.2        # scvi-tools (six is there)
)

mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
quiet() { grep -v "is ignored" || true; }  # this machine's pip config warns per local index
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}" 2>&1 | quiet
python3 -m pip wheel -q --no-deps -w .whl "${SDISTS[@]}" 2>&1 | quiet

# one version of each package (two stop the whole install there)
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "several versions in .whl of: $dupes (remove the old wheels)" >&2
  exit 1
fi
count=$(ls .whl/*.whl | wc -l)
expected=$((${#WHEELS[@]} + ${#SDISTS[@]}))
if [ "$count" -ne "$expected" ]; then
  echo "expected $expected wheels in .whl, found $count" >&2
  exit 1
fi
ls -1 .whl
echo "total: $count wheels, $(du -ch .whl/*.whl | tail -1 | cut -f1)"
