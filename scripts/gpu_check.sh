#!/usr/bin/env bash
# The GPU check (the Triton kernels, CUDA-graph decode and `mistral bench` at full size), in one call of at most ~8 minutes on one H100, with nothing to download:
#
#   1. the tests marked `gpu` (kernels at 7B sizes, CUDA-graph decode against eager and transformers)
#   2. `mistral bench` on a full-size v0.3 model with random bf16 weights made on the GPU
#   3. the bench table, printed last
#
# Run from the repository root:  scripts/gpu_check.sh
# Everything goes to $OUT (a temporary folder if unset): gpu_check.log (all output), pytest.log,
# bench.json (every figure, machine-readable) and bench.md (the table), written as the run goes,
# so a stage cut off by its time limit still leaves what it measured.
#
# On a machine without a GPU, GPU_CHECK_CPU=1 runs the same stages on the small preset (the gpu
# tests are then skipped): that is how this script is tested.
#
# Time limits per stage (seconds; each stage is killed at its limit and the script goes on):
#   PYTEST_LIMIT (150)  BENCH_LIMIT (320, of which COMPILE_BUDGET (150) for transformers' torch.compile)
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
PYTEST_LIMIT="${PYTEST_LIMIT:-150}"
BENCH_LIMIT="${BENCH_LIMIT:-320}"
COMPILE_BUDGET="${COMPILE_BUDGET:-150}"
BENCH_ARGS=(--compile-budget "$COMPILE_BUDGET")
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  BENCH_ARGS=(--preset small --device cpu --quick)
fi

exec > >(tee "$OUT/gpu_check.log") 2>&1
started=$SECONDS
stage() { echo; echo "=== [$((SECONDS - started)) s] $*"; }

stage "environment"
date -u
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
"$PY" -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| triton", triton.__version__, "| transformers", transformers.__version__, "| cuda", torch.cuda.is_available())'

stage "1/2 GPU tests (limit ${PYTEST_LIMIT} s)"
# Only the files that hold gpu tests: the others may need packages this machine lacks (fastapi, mistral-common).
mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
echo "files: ${files[*]}"
timeout -k 10 "$PYTEST_LIMIT" "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rs "${files[@]}" 2>&1 | tee "$OUT/pytest.log"
pytest_rc=$?

stage "2/2 mistral bench ${BENCH_ARGS[*]} (limit ${BENCH_LIMIT} s)"
timeout -k 10 "$BENCH_LIMIT" "$PY" -m mistral.cli bench "${BENCH_ARGS[@]}" --json "$OUT/bench.json" >/dev/null
bench_rc=$?

stage "done: pytest exit $pytest_rc, bench exit $bench_rc (124 = cut off at its limit); files in $OUT"
if [ -f "$OUT/bench.md" ]; then
  cat "$OUT/bench.md"
else
  echo "no bench table was written"
fi
[ "$pytest_rc" = 0 ] && [ "$bench_rc" = 0 ]
