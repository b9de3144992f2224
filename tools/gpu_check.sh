#!/usr/bin/env bash
# The prepared GPU check, made to finish on a bare GPU machine in one short window (README: "Checking on a GPU
# machine"): in order, with a time budget each,
#   env          torch, GPU, compute-sanitizer, the CUTLASS headers (unpacked from .cache/cutlass-include.tgz)
#   build        TWOTOWER_CUDA=ON for this GPU's arch only; errors printed in full; the WHILE node's availability
#   correctness  which attention / MoE kernel really runs (tools/gpu_check_report.py); every op on CUDA vs the fp64
#                oracle (tests marked `cuda` in the kernel test files); engine parity and CUDA graphs incl. bf16
#                (the other `cuda` tests); the decode core's bucketed graphs (tests marked `core_cuda`)
#   sanitize     compute-sanitizer memcheck on a few cases of every kernel, racecheck on attention and MoE
#                (tools/gpu_sanitize_cases.py)
#   bench        the GPU microbenchmarks (% of measured HBM bandwidth / tensor peak), saved even on a busy machine
# Each phase appends its section to ONE summary file and rewrites ONE log tarball in the output folder as soon as
# it ends, so a timeout keeps everything that ran (2 files: far under the device tool's 8). A phase that cannot
# run (no GPU, no compute-sanitizer, no time left, the build failed) is reported as skipped with its reason and
# does not fail the check; a failing build, test, sanitizer or benchmark does (exit 1).
#
#   bash tools/gpu_check.sh                  # the whole check (PYTHON, default python3, with a CUDA torch)
#   bash tools/gpu_check.sh --dry-run        # no GPU needed: everything up to the first GPU call (below)
#   bash tools/gpu_check.sh --pack-cutlass   # where the CUTLASS headers are installed: .cache/cutlass-include.tgz
# --dry-run unpacks the headers (if packed), configures and compiles the CUDA build, lists each phase's tests and
# sanitizer cases, checks the budgets add up to the limit and that the output folder holds what the device tool
# returns; it exits 0 when all of that holds. Environment: PYTHON; GPU_CHECK_OUT (default $OUT, else
# build/gpu_check_out); GPU_CHECK_BUILD_DIR (default build/gpu_check: CI points it at its own CUDA build);
# TWOTOWER_CUDA_ARCHS (default: the GPU's, e.g. 90a-real; a dry run: 90a-real, the lent machines' H100/H200);
# CUTLASS_DIR (headers to use instead of the pack); JOBS (default: all cores).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
mode=full
case "${1:-}" in
  "") ;;
  --dry-run) mode=dry ;;
  --pack-cutlass) mode=pack ;;
  *) echo "twotower: gpu_check.sh takes --dry-run, --pack-cutlass or nothing, got '$1'" >&2; exit 2 ;;
esac

if [ "$mode" = pack ]; then
  inc=$("$py" -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))") \
    || { echo "twotower: --pack-cutlass needs the CUTLASS headers: pip install --no-deps nvidia-cutlass (PYTHON=$py)" >&2; exit 1; }
  mkdir -p .cache && tar czf .cache/cutlass-include.tgz -C "$(dirname "$inc")" include/cutlass include/cute
  echo "packed $(du -h .cache/cutlass-include.tgz | cut -f1) of CUTLASS headers from $inc into .cache/cutlass-include.tgz"
  echo "send it along: run(command=\"bash tools/gpu_check.sh\", carry=[\".cache\"], timeout_s=480)"
  exit 0
fi

# ---------------------------------------------------------------------------------------------------
# Phases and budgets (seconds). Their sum is the limit: 7 minutes, so one rerun fits a 15-minute device window.
PHASES=(env build correctness sanitize bench)
declare -A BUDGET=([env]=15 [build]=150 [correctness]=135 [sanitize]=70 [bench]=50)
declare -A WHAT=([env]="torch, GPU, tools, CUTLASS headers" [build]="CUDA build for this GPU"
  [correctness]="kernels vs fp64 oracle, engine parity, graphs" [sanitize]="compute-sanitizer memcheck + racecheck"
  [bench]="GPU microbenchmarks")
LIMIT_S=420
RESERVE_S=5  # packing the last results

t0=$(date +%s)
now() { echo $(( $(date +%s) - t0 )); }
out=${GPU_CHECK_OUT:-${OUT:-$root/build/gpu_check_out}}
mkdir -p "$out"
rm -f "$out/gpu_check_summary.md" "$out/gpu_check_logs.tgz"
summary="$out/gpu_check_summary.md"
tarball="$out/gpu_check_logs.tgz"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
logs="$work/logs"
mkdir -p "$logs"
trap 'rm -rf "$work"' EXIT
build=${GPU_CHECK_BUILD_DIR:-$root/build/gpu_check}
failed=0
declare -A RESULT=()

say() { echo "[gpu_check +$(now)s] $*"; }
note() { echo "$*" >>"$summary"; }  # a line of the current phase's section
# The logs so far into the tarball (written aside, then moved: a kill mid-write keeps the previous one).
pack_logs() {
  cp -f "$summary" "$logs/" 2>/dev/null
  tar czf "$work/logs.tgz" -C "$work" logs && mv -f "$work/logs.tgz" "$tarball"
}
# Seconds phase $1 may take: its budget, or less when the 7-minute limit is closer (a dry run: its budget; its
# build, the one slow step here, is not limited).
allowed() {
  [ "$mode" = full ] || { echo "${BUDGET[$1]}"; return; }
  local left=$(( LIMIT_S - RESERVE_S - $(now) ))
  echo $(( BUDGET[$1] < left ? BUDGET[$1] : left ))
}
# phase NAME: runs phase_NAME with its time limit (a function reads $limit), then appends the verdict and packs.
# A phase function returns 0 ok, 1 failed, 2 skipped (its reason in $skip_reason).
phase() {
  local name=$1 start rc
  limit=$(allowed "$name")
  start=$(now)
  skip_reason=""
  note ""
  note "## $name: ${WHAT[$name]}"
  if [ "$limit" -lt 10 ]; then
    rc=2; skip_reason="no time left ($limit s of the ${LIMIT_S} s limit)"
  else
    say "phase $name (budget ${BUDGET[$name]} s, allowed $limit s)"
    "phase_$name"; rc=$?
  fi
  local took=$(( $(now) - start ))
  case $rc in
    0) RESULT[$name]="ok" ;;
    2) RESULT[$name]="skipped: $skip_reason" ;;
    *) RESULT[$name]="FAILED"; failed=1 ;;
  esac
  note ""
  note "**$name: ${RESULT[$name]}** (${took} s of ${BUDGET[$name]} s)"
  say "phase $name: ${RESULT[$name]} (${took} s)"
  pack_logs
}
# run_limited SECONDS LOG CMD...: the command with a hard time limit (a hang fails its step, not the window),
# output to LOG; returns its status (124 / 137: timed out).
run_limited() {
  local s=$1 log=$2; shift 2
  timeout -k 5 "$s" "$@" >"$log" 2>&1
}

# ---------------------------------------------------------------------------------------------------
has_gpu=0
phase_env() {
  "$py" - >"$logs/env.log" 2>&1 <<'PY'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory >> 30} GiB")
else:
    print("GPU none")
PY
  local rc=$?
  cat "$logs/env.log"
  sed 's/^/- /' "$logs/env.log" >>"$summary"
  [ $rc -eq 0 ] || { note "- $py cannot import torch"; return 1; }
  has_gpu=$("$py" -c "import torch; print(int(torch.cuda.is_available()))")
  { nvidia-smi -L 2>&1 || echo "no nvidia-smi"; nvcc --version 2>&1 | tail -n 1; } >>"$logs/env.log"
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  note "- compute-sanitizer: ${sanitizer:-none found}"
  # pytest-timeout and pytest-xdist where pytest has them (plugins load by their entry points; only options here).
  # xdist: the tests' fp64 oracles and tiny models run on the CPU, so 4 processes sharing the GPU finish sooner.
  local help
  help=$("$py" -m pytest --help 2>/dev/null)
  pytest_timeout=$(grep -q -- "--timeout=" <<<"$help" && echo "--timeout=100" || echo "")
  pytest_xdist=$(grep -q -- "--numprocesses" <<<"$help" && echo "-n 4" || echo "")
  if [ -n "$pytest_xdist" ]; then note "- pytest-xdist: yes (4 test processes)"
  else note "- pytest-xdist: no (each test group runs in one process)"; fi
  if [ -n "$pytest_timeout" ]; then note "- pytest-timeout: yes (a test stuck 100 s fails alone)"
  else note "- pytest-timeout: no (a stuck test ends its group at the time limit of the group)"; fi
  # The CUTLASS headers: only the opt-in sm_90a wgmma attention kernel needs them.
  if [ -n "${CUTLASS_DIR:-}" ]; then
    export TWOTOWER_CUTLASS=AUTO
    note "- CUTLASS headers: CUTLASS_DIR=$CUTLASS_DIR"
  elif [ -f .cache/cutlass-include.tgz ]; then
    # Unpacked once per pack (a rerun on a warm machine keeps the headers' times, so nothing rebuilds for them).
    local dest=build/gpu_check_cutlass
    if [ ! -f $dest/unpacked ] || [ .cache/cutlass-include.tgz -nt $dest/unpacked ]; then
      rm -rf $dest && mkdir -p $dest && tar xzf .cache/cutlass-include.tgz -C $dest && touch $dest/unpacked
    fi
    if [ -f $dest/include/cutlass/version.h ] && [ -f $dest/include/cute/tensor.hpp ]; then
      export CUTLASS_DIR="$root/build/gpu_check_cutlass/include" TWOTOWER_CUTLASS=AUTO
      local version
      version=$(grep -m3 -oE "CUTLASS_(MAJOR|MINOR|PATCH) [0-9]+" "$CUTLASS_DIR/cutlass/version.h" | cut -d' ' -f2 | paste -sd.)
      note "- CUTLASS headers: unpacked from .cache/cutlass-include.tgz (version $version)"
    else
      note "- .cache/cutlass-include.tgz did not unpack to include/cutlass/version.h and include/cute/tensor.hpp"
      return 1
    fi
  else
    # The same build a bare GPU machine makes (an installed nvidia-cutlass is not used either).
    export TWOTOWER_CUTLASS=OFF
    note "- CUTLASS headers: none (no .cache/cutlass-include.tgz, no CUTLASS_DIR): the wgmma kernel is not built" \
         "and its tests skip; make the pack with --pack-cutlass and carry .cache"
  fi
  [ "$mode" = dry ] || [ "$has_gpu" = 1 ] || { note "- no GPU is visible to torch"; return 1; }
  return 0
}

phase_build() {
  local arch
  if [ -n "${TWOTOWER_CUDA_ARCHS:-}" ]; then
    arch=$TWOTOWER_CUDA_ARCHS
  elif [ "$has_gpu" = 1 ]; then  # this GPU only (sm_90 gets 90a: the wgmma kernel's body is sm_90a code)
    arch=$("$py" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}' + ('a' if (a, b) == (9, 0) else '') + '-real')")
  else
    arch=90a-real
  fi
  note "- TWOTOWER_CUDA=ON TWOTOWER_CUDA_ARCHS=$arch TWOTOWER_CUTLASS=${TWOTOWER_CUTLASS:-AUTO} into ${build#"$root"/}"
  # A dry run checks that the build compiles, on whatever cores this machine has: its budget is the GPU
  # machine's (16 cores), so here it is not a limit.
  local s=$limit
  [ "$mode" = full ] || s=7200
  TWOTOWER_CUDA=ON TWOTOWER_CUDA_ARCHS=$arch JOBS=${JOBS:-$(nproc)} \
    run_limited "$s" "$logs/build.log" bash tools/dev_build.sh "$build" "$py"
  local rc=$?
  if [ $rc -ne 0 ]; then
    # In full, here and in the summary: the point of a build check is to read its errors.
    echo "----- build output (exit $rc$([ $rc -ge 124 ] && echo ", timed out after $s s")) -----"
    cat "$logs/build.log"
    note '```'
    grep -E -A12 "error|Error|FAILED" "$logs/build.log" | head -n 200 >>"$summary"
    note '```'
    return 1
  fi
  grep -E "twotower_ext: " "$logs/build.log" | sed 's/^-- /- /' | tee -a "$summary"
  [ "$mode" = full ] || note "- (a dry run: the build took what $(nproc) cores here take; the budget is the GPU machine's, 16 cores)"
  lib=$(ls "$build"/_C*.so)
  export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}" TWOTOWER_EXT_LIB="$lib"
  "$py" - >>"$logs/build.log" 2>&1 <<'PY'
import json, torch, twotower_ext as tt
from twotower_ext.runtime.graphs import while_supported
info = tt.build_info()
print("build_info", json.dumps(info))
assert info["cuda"], "the module was built without CUDA kernels"
loop = ("the WHILE node (device_loop=True runs the block loop on the device)" if while_supported() else
        f"no WHILE node in torch {torch.__version__} (needs begin_capture_to_while_node, torch >= 2.14): "
        "device_loop=True runs unrolled steps")
print(f"summary: built for {info['cuda_archs']}, CUTLASS {info['cutlass'] or 'none (no wgmma kernel)'}")
print(f"summary: block loop: {loop}")
PY
  rc=$?
  grep -E "^summary: " "$logs/build.log" | sed 's/^summary: /- /' | tee -a "$summary"
  [ $rc -eq 0 ] || { tail -n 20 "$logs/build.log"; note "- the built module does not import (see build.log)"; return 1; }
  return 0
}

# Test groups: the kernel files (every op vs the fp64 oracle), then every other file with CUDA tests (engine
# parity, graphs incl. bf16 and the WHILE node), then the decode core's bucketed graphs (marker core_cuda).
OPS_TESTS="tests/test_block_attention.py tests/test_block_attention_cuda.py tests/test_causal_attention.py
  tests/test_merge_state.py tests/test_mamba_scan.py tests/test_ssd.py tests/test_threshold_unmask.py
  tests/test_moe.py tests/test_moe_cuda.py tests/test_quant_cuda.py"
other_cuda_tests() {
  local f
  for f in $(grep -lE "mark\.cuda|devices\(\)" tests/test_*.py); do
    case " $(echo $OPS_TESTS) " in *" $f "*) ;; *) echo "$f" ;; esac
  done
}
core_tests() { grep -l "core_cuda" tests/test_*.py 2>/dev/null; }
declare -A GROUP_SHARE=([ops]=55 [engine]=35 [core]=10)  # % of the correctness budget after the kernel report

# pytest_group NAME MARKER LIMIT FILES...: one pytest run (PYTEST_EXTRA: more options); its per-test lines go to
# the log as they finish.
pytest_group() {
  local name=$1 marker=$2 s=$3; shift 3
  local log="$logs/tests_$name.log"
  [ $# -gt 0 ] || { note "- $name: no test files"; return 0; }
  if [ "$mode" = dry ]; then
    "$py" -m pytest -q --collect-only -p no:cacheprovider -m "$marker" "$@" >"$log" 2>&1
    local rc=$? n
    n=$(grep -cE "::" "$log")
    note "- $name: $n tests selected (-m $marker: $(echo "$@" | wc -w) files)"
    [ $rc -eq 0 ] || [ $rc -eq 5 ] || { tail -n 20 "$log"; note "- $name: collection failed (rc $rc)"; return 1; }
    return 0
  fi
  # shellcheck disable=SC2086
  timeout -k 10 "$s" "$py" -m pytest -rfE -v -p no:cacheprovider -o faulthandler_timeout=60 $pytest_timeout \
    ${PYTEST_EXTRA:-} -m "$marker" "$@" >"$log" 2>&1
  local rc=$?
  local passed failed skipped
  passed=$(grep -cE " PASSED" "$log"); failed=$(grep -cE " (FAILED|ERROR)" "$log"); skipped=$(grep -cE " SKIPPED" "$log")
  case $rc in
    0) note "- $name: $passed passed, $skipped skipped" ;;
    124|137) note "- $name: TIMED OUT after $s s ($passed passed, $failed failed so far; the last test started:" \
                  "$(grep -E '::' "$log" | tail -n 1 | cut -c1-120))"; return 1 ;;
    *) note "- $name: $passed passed, $failed FAILED, $skipped skipped (pytest rc $rc):"
       grep -E "^(FAILED|ERROR) " "$log" | head -n 25 | sed 's/^/  - /' >>"$summary"
       grep -E "^(FAILED|ERROR) " "$log" | head -n 25
       return 1 ;;
  esac
}

phase_correctness() {
  [ "$mode" = dry ] || [ -n "${lib:-}" ] || { skip_reason="the build failed"; return 2; }
  local bad=0 s others core
  if [ "$mode" = full ]; then
    s=$(( limit * 15 / 100 ))
    run_limited "$s" "$logs/kernel_report.log" "$py" tools/gpu_check_report.py || bad=1
    cat "$logs/kernel_report.log"
    grep -E "^(\||#)" "$logs/kernel_report.log" >>"$summary"
    [ $bad -eq 0 ] || note "- kernel report: FAILED (see kernel_report.log)"
  fi
  local rest=$(( limit - ($(now) - phase_t0) ))
  # shellcheck disable=SC2086
  PYTEST_EXTRA=$pytest_xdist pytest_group ops cuda $(( rest * GROUP_SHARE[ops] / 100 )) $OPS_TESTS || bad=1
  if [ "$mode" = full ]; then  # what kWgmmaByDefault (block_attention_cuda_plan.h) waits for
    local wl="$logs/tests_ops.log"
    note "- wgmma path tests (sm_90a): $(grep -cE 'wgmma.* PASSED|PASSED.*wgmma' "$wl") passed," \
         "$(grep -cE 'wgmma.* (FAILED|ERROR)|(FAILED|ERROR).*wgmma' "$wl") failed," \
         "$(grep -cE 'wgmma.* SKIPPED|SKIPPED.*wgmma' "$wl") skipped"
  fi
  others=$(other_cuda_tests)
  # shellcheck disable=SC2086
  PYTEST_EXTRA=$pytest_xdist pytest_group engine cuda $(( rest * GROUP_SHARE[engine] / 100 )) $others || bad=1
  core=$(core_tests)
  if [ -z "$core" ]; then
    note "- decode core's bucketed graphs (-m core_cuda): none yet (no test file marks core_cuda)"
  else
    # shellcheck disable=SC2086
    pytest_group core core_cuda $(( limit - ($(now) - phase_t0) - 2 )) $core || bad=1
  fi
  return $bad
}

# sanitize_tool TOOL CASES LIMIT: compute-sanitizer TOOL over tools/gpu_sanitize_cases.py --cases CASES.
sanitize_tool() {
  local tool=$1 cases=$2 s=$3 log="$logs/sanitize_$1.log"
  if [ "$mode" = dry ]; then
    "$py" tools/gpu_sanitize_cases.py --cases "$cases" --list >"$log" 2>&1 || { cat "$log"; return 1; }
    note "- $tool: $(grep -c . "$log") cases ($cases): $(tr '\n' ';' <"$log" | cut -c1-300)"
    return 0
  fi
  timeout -k 10 "$s" "$sanitizer" --tool "$tool" --error-exitcode 9 "$py" tools/gpu_sanitize_cases.py \
    --cases "$cases" >"$log" 2>&1
  local rc=$? line
  line=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tail -n 1 | sed -E 's/^=+ *//')
  case $rc in
    0) note "- $tool ($cases): ok, $(grep -c '^sanitize:' "$log") cases: ${line:-no errors}" ;;
    124|137)  # slow under the sanitizer is not wrong: the cases that finished count, the rest is reported
      local done total
      done=$(grep -c '^sanitize:' "$log"); total=$("$py" tools/gpu_sanitize_cases.py --cases "$cases" --list | wc -l)
      if grep -qE "^========= +(Invalid|Error|Race|Program hit|Uninitialized)" "$log"; then
        note "- $tool ($cases): FAILED: errors reported before the time limit ($s s) ended it ($done of $total cases)"
        grep -m 20 -E "^=========" "$log" | tee -a "$summary"; return 1
      fi
      note "- $tool ($cases): incomplete: the time limit ($s s) ended it after $done of $total cases, no error before" ;;
    *) note "- $tool ($cases): FAILED (rc $rc): ${line:-see sanitize_$tool.log}; last output:"
       { grep -m 20 -E "^========= +[A-Z]" "$log" | grep -v "SUMMARY"; grep -vE "^=========" "$log" | tail -n 4; } \
         | sed 's/^/    /' | tee -a "$summary"; return 1 ;;
  esac
}

phase_sanitize() {
  [ "$mode" = dry ] || [ -n "${lib:-}" ] || { skip_reason="the build failed"; return 2; }
  if [ "$mode" = full ] && [ -z "${sanitizer:-}" ]; then skip_reason="no compute-sanitizer on this machine"; return 2; fi
  local bad=0
  sanitize_tool memcheck all $(( limit * 55 / 100 )) || bad=1
  sanitize_tool racecheck attention,moe $(( limit - ($(now) - phase_t0) - 2 )) || bad=1
  return $bad
}

# In this order, --quick (moe: T = 1 and 16, bf16 / fp8 / int4 weights; attention: B = 1 at 4K, every path):
# the full sweeps make their inputs on the CPU and would not fit the window.
BENCHES="moe block_attention merge_states mamba_scan threshold_unmask"
phase_bench() {
  [ "$mode" = dry ] || [ -n "${lib:-}" ] || { skip_reason="the build failed"; return 2; }
  if [ "$mode" = dry ]; then
    # shellcheck disable=SC2086
    "$py" -c "import sys, bench.__main__ as b; missing = [n for n in sys.argv[1:] if n not in b.BENCHES]; \
print('unknown benchmarks:', missing) if missing else print('benchmarks:', *sys.argv[1:]); sys.exit(bool(missing))" \
      $BENCHES >"$logs/bench.log" 2>&1 || { cat "$logs/bench.log"; return 1; }
    note "- $(cat "$logs/bench.log") (python -m bench NAME --device cuda --quick --allow-busy)"
    return 0
  fi
  # The machine runs nothing else that matters, but the harness's CPU-load check would refuse to save:
  # --allow-busy keeps the results (marked busy if it was).
  local b rc bad=0
  for b in $BENCHES; do
    local s=$(( limit - ($(now) - phase_t0) - 2 ))
    [ "$s" -ge 10 ] || { note "- $b: not run (bench budget spent)"; continue; }
    timeout -k 5 "$s" "$py" -m bench "$b" --device cuda --quick --allow-busy >"$logs/bench_$b.log" 2>&1
    rc=$?
    case $rc in
      0) note "- $b: saved (bench/results/$b-cuda.md)"
         cp -f "bench/results/$b-cuda.md" "bench/results/$b-cuda.json" "$logs/" 2>/dev/null
         note ""; cat "bench/results/$b-cuda.md" >>"$summary"; note "" ;;
      124|137) note "- $b: TIMED OUT after $s s (partial output in bench_$b.log)" ;;
      *) note "- $b: FAILED (rc $rc): $(grep -v '^\s*$' "$logs/bench_$b.log" | tail -n 1 | cut -c1-200)"
         tail -n 15 "$logs/bench_$b.log"; bad=1 ;;
    esac
  done
  return $bad
}

# ---------------------------------------------------------------------------------------------------
{
  echo "# gpu_check ($mode) $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| phase | budget (s) | what |"
  echo "|---|---|---|"
  for p in "${PHASES[@]}"; do echo "| $p | ${BUDGET[$p]} | ${WHAT[$p]} |"; done
} >"$summary"
total=0
for p in "${PHASES[@]}"; do total=$(( total + BUDGET[$p] )); done
note "| total | $total | limit $LIMIT_S s (7 minutes: a rerun fits a 15-minute device window) |"
if [ "$total" -gt "$LIMIT_S" ]; then
  echo "twotower: gpu_check.sh's phase budgets add up to $total s, over the $LIMIT_S s limit" >&2
  exit 1
fi

lib=""
for p in "${PHASES[@]}"; do
  phase_t0=$(now)
  phase "$p"
  if [ "$p" = env ] && [ "${RESULT[env]}" = FAILED ]; then break; fi
done

note ""
note "## result"
note ""
note "| phase | result |"
note "|---|---|"
for p in "${PHASES[@]}"; do note "| $p | ${RESULT[$p]:-not reached} |"; done
note "| wall | $(now) s of $LIMIT_S s |"
pack_logs

# What the device tool brings back: at most 8 files, 2 folders deep, plain names.
layout_ok=1
n=$(find "$out" -type f | wc -l)
deep=$(find "$out" -mindepth 4 | wc -l)
odd=$(find "$out" -mindepth 1 | sed "s|^$out/||" | grep -cvE '^[A-Za-z0-9._/-]+$')
if [ "$n" -gt 8 ] || [ "$deep" -gt 0 ] || [ "$odd" -gt 0 ]; then
  echo "twotower: $out holds $n files ($deep too deep, $odd oddly named): the device tool returns at most 8" >&2
  layout_ok=0
fi
if [ "$mode" = dry ]; then
  listing=$(tar tzf "$tarball")  # (not piped into grep -q: with pipefail, tar's SIGPIPE would fail the test)
  grep -q "logs/gpu_check_summary.md" <<<"$listing" || { echo "twotower: the log tarball lacks the summary" >&2; layout_ok=0; }
  echo
  echo "dry run: output folder $out: $(ls "$out" | tr '\n' ' ')($n files; the tarball holds $(grep -c '\.log$' <<<"$listing") logs)"
fi
echo
cat "$summary"
[ $layout_ok = 1 ] || exit 1
exit $failed
