#!/usr/bin/env bash
# Incremental development build without installing: configure + build _C in BUILD_DIR with the torch of
# PYTHON, then run anything against the source tree with
#   PYTHONPATH=python TWOTOWER_EXT_LIB=$(ls BUILD_DIR/_C*.so) python -m pytest -q tests
# usage: tools/dev_build.sh BUILD_DIR [PYTHON]   (TWOTOWER_CUDA / TWOTOWER_CUDA_ARCHS / TWOTOWER_CUTLASS / CUTLASS_DIR
# honoured)
set -euo pipefail
build=${1:?usage: dev_build.sh BUILD_DIR [PYTHON]}
py=${2:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
bindir=$(dirname "$(command -v "$py")")
export PATH="$bindir:$PATH"
cmake -S "$root" -B "$build" -G Ninja -DPython_EXECUTABLE="$(command -v "$py")" -DCMAKE_BUILD_TYPE=Release \
  -DTWOTOWER_CUDA="${TWOTOWER_CUDA:-AUTO}" -DTWOTOWER_CUDA_ARCHS="${TWOTOWER_CUDA_ARCHS:-80-real;90a-real;80-virtual}" \
  -DTWOTOWER_CUTLASS="${TWOTOWER_CUTLASS:-AUTO}" | { grep -E "twotower_ext: " || true; }
cmake --build "$build" -j "${JOBS:-2}"
echo "built: $(ls "$build"/_C*.so)"
