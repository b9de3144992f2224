#!/usr/bin/env bash
# Make a virtual environment with torch and the build tools, build twotower_ext as a wheel and install it.
#   bash tools/bootstrap.sh VENV cpu    # CPU torch 2.13.0 (local disk); CUDA kernels skipped
#   bash tools/bootstrap.sh VENV cuda   # CUDA torch 2.14.1 + CUTLASS headers; builds every .cu (no GPU needed)
#   bash tools/bootstrap.sh VENV cpu ray   # and the ray extra (Ray Serve: twotower serve --ray, tests/test_ray.py)
# On a GPU machine that already has torch, build in place instead (see README: "Building on a GPU machine").
# Each step says what it does when it starts and how long it took when it ends (a first run takes minutes).
set -euo pipefail
venv=${1:?usage: bootstrap.sh VENV cpu|cuda}
kind=${2:?usage: bootstrap.sh VENV cpu|cuda [ray]}
extra=${3:-}
[ -z "$extra" ] || [ "$extra" = ray ] || { echo "bootstrap.sh: the third argument can only be 'ray', got '$extra'" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
case "$kind" in
  cpu)  torch_req="torch==2.13.0"; cuda_mode=${TWOTOWER_CUDA:-AUTO} ;;
  cuda) torch_req="torch==2.14.1"; cuda_mode=${TWOTOWER_CUDA:-ON} ;;
  *) echo "bootstrap.sh: kind must be cpu or cuda, got '$kind'" >&2; exit 2 ;;
esac
t_all=$SECONDS
step() {  # step "what" cmd...: announce, run, report the time
  local what=$1 t0=$SECONDS; shift
  echo "bootstrap: $what ..." >&2
  "$@"
  echo "bootstrap: $what: done in $((SECONDS - t0)) s" >&2
}
make_venv() { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; }
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
step "virtual environment $venv" make_venv
step "install $torch_req and the build tools (first run: a large download)" \
  "${pip[@]}" "$torch_req" numpy pytest tokenizers "scikit-build-core>=0.10" "cmake>=3.26" ninja pybind11
# the serve extra (fastapi, uvicorn, jinja2, prometheus_client) and the clients tests/test_serve*.py drive it
# with (openai, httpx)
step "install the serve extra and its test clients" "${pip[@]}" "fastapi>=0.100" "uvicorn>=0.29" "jinja2>=3.1" \
  "prometheus_client>=0.20" openai httpx
if [ "$kind" = cuda ]; then
  # Headers only; its declared dependencies would pull ~350 MB and downgrade torch's cuda-bindings.
  step "install the CUTLASS headers" "${pip[@]}" --no-deps nvidia-cutlass==4.2.0.0
fi
rm -rf "$root/dist/$kind"
step "build the wheel (CMake + compiler, TWOTOWER_CUDA=$cuda_mode) into dist/$kind" \
  env TWOTOWER_CUDA="$cuda_mode" "$venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation \
  -C build-dir="build/$kind" -w "$root/dist/$kind" "$root"
step "install the wheel" "${pip[@]}" --no-deps --force-reinstall "$root"/dist/"$kind"/twotower_ext-*.whl
if [ "$extra" = ray ]; then
  # the wheel's [ray] extra (its other requirements are installed by now); --no-compile: Ray is thousands of
  # modules, byte-compiling them all would double the install time, and only the few imported get compiled
  step "install the ray extra (ray[serve])" "${pip[@]}" --no-compile "$(ls "$root"/dist/"$kind"/twotower_ext-*.whl)[ray]"
fi
"$venv/bin/python" -c "import twotower_ext, json; print(json.dumps(twotower_ext.build_info(), indent=1))"
echo "bootstrap: ready in $((SECONDS - t_all)) s: $venv/bin/twotower generate --prompt 'def '" >&2
