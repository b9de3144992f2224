#!/usr/bin/env bash
# Make a virtual environment with torch and the build tools, build twotower_ext as a wheel and install it.
#   bash tools/bootstrap.sh VENV cpu    # CPU torch 2.13.0 (local disk); CUDA kernels skipped
#   bash tools/bootstrap.sh VENV cuda   # CUDA torch 2.14.1 + CUTLASS headers; builds every .cu (no GPU needed)
# On a GPU machine that already has torch, build in place instead (see README: "Building on a GPU machine").
set -euo pipefail
venv=${1:?usage: bootstrap.sh VENV cpu|cuda}
kind=${2:?usage: bootstrap.sh VENV cpu|cuda}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$kind" in
  cpu)  torch_req="torch==2.13.0"; cuda_mode=${TWOTOWER_CUDA:-AUTO} ;;
  cuda) torch_req="torch==2.14.1"; cuda_mode=${TWOTOWER_CUDA:-ON} ;;
  *) echo "bootstrap.sh: kind must be cpu or cuda, got '$kind'" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "$torch_req" numpy pytest tokenizers "scikit-build-core>=0.10" "cmake>=3.26" ninja pybind11
# the serve extra (fastapi, uvicorn) and the clients tests/test_serve.py drives it with (openai, httpx)
"${pip[@]}" "fastapi>=0.100" "uvicorn>=0.29" openai httpx
if [ "$kind" = cuda ]; then
  # Headers only; its declared dependencies would pull ~350 MB and downgrade torch's cuda-bindings.
  "${pip[@]}" --no-deps nvidia-cutlass==4.2.0.0
fi
rm -rf "$root/dist/$kind"
TWOTOWER_CUDA=$cuda_mode "$venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation \
  -C build-dir="build/$kind" -w "$root/dist/$kind" "$root"
"${pip[@]}" --no-deps --force-reinstall "$root"/dist/"$kind"/twotower_ext-*.whl
"$venv/bin/python" -c "import twotower_ext, json; print(json.dumps(twotower_ext.build_info(), indent=1))"
