#!/usr/bin/env bash
# Everything a GPU machine should tell us, in one command of at most 8 minutes.
#
#   benchmarks/gpu_check.sh OUTDIR            # on a CUDA machine (H100/H200), no network needed
#   benchmarks/gpu_check.sh --dry-run OUTDIR  # anywhere: lists the steps, checks the imports
#
# Steps run in order of value, each under its own time limit, all within GPU_CHECK_BUDGET_S
# (default 480 s): a step that would start with less than its minimum left is skipped, so a
# time-out never costs the figures of the steps before it. Each step logs to OUTDIR/STEP.log;
# OUTDIR/steps.tsv records status, exit code and seconds. At the end
# benchmarks/gpu_check_report.py writes OUTDIR/results.json and OUTDIR/results.md and prints a
# short summary. PYTHON (default python3) is the interpreter; the extension is built for the
# GPU's own architecture only (fast). The whole-model baseline "pytorch_best" compiles with
# MSID_BENCH_COMPILE_MODE (default here: reduce-overhead, CUDA graphs without max-autotune's
# minutes of tuning).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
DRY=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) usage ;;
        -*) echo "unknown option $arg" >&2; usage ;;
        *) OUT="$arg" ;;
    esac
done
[ -n "$OUT" ] || usage
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
export MSID_BENCH_COMPILE_MODE="${MSID_BENCH_COMPILE_MODE:-reduce-overhead}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
: > "$OUT/steps.tsv"

KERNEL_TESTS="tests/test_triton_attention.py tests/test_triton_embedding.py tests/test_triton_model.py"
OP_TESTS="tests/test_ops_haar.py tests/test_ops_regions.py"
# Under a sanitizer every kernel runs many times slower: the parity tests only.
SANITIZED="forward_and_gradients or token_padded or matches_reference or cuda_matches or low_precision"
SANITIZED_TESTS="tests/test_triton_attention.py tests/test_triton_embedding.py $OP_TESTS"
BENCH="$PY -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-columns=median,min,rounds"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
SAN="$SANITIZER --error-exitcode 1 --target-processes all"

# name | minimum seconds to start | maximum seconds | command
STEPS=(
"build|40|150|TORCH_CUDA_ARCH_LIST=\$($PY -c 'import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())') MAX_JOBS=16 $PY -m pip install -q --no-build-isolation --no-deps -e . && $PY -c 'from msidtrans_fast import ops; c = ops.compiled(); print(c); assert c[\"haar_split\"][\"cuda\"]'"
"tests|60|150|$PY -m pytest -q -p no:cacheprovider --junitxml=$OUT/tests.xml $KERNEL_TESTS $OP_TESTS"
"eval_forward|60|150|$BENCH benchmarks/bench_model.py -k 'eval_fwd and (520x1 or 1024x1) and (triton or pytorch_best)' --benchmark-json=$OUT/eval_forward.bench.json"
"agreement|20|90|$PY benchmarks/decision_agreement.py --device cuda --out $OUT/agreement.json"
"train_step|30|90|$BENCH benchmarks/bench_model.py -k 'train_step and (triton or reference)' --benchmark-json=$OUT/train_step.bench.json"
"memcheck|30|60|PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SAN --tool memcheck $PY -m pytest -q -p no:cacheprovider $SANITIZED_TESTS -k '$SANITIZED'"
"racecheck|30|60|$SAN --tool racecheck $PY -m pytest -q -p no:cacheprovider $SANITIZED_TESTS -k '$SANITIZED'"
"kernels|30|120|$BENCH benchmarks/bench_attention.py -k '1024 and not materialized' --benchmark-json=$OUT/attention.bench.json && $BENCH benchmarks/bench_ops.py -k cuda --benchmark-json=$OUT/ops.bench.json"
)

if [ "$DRY" = 1 ]; then
    echo "gpu_check dry run: steps in order (minimum to start / limit, seconds), budget ${BUDGET} s"
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name min max cmd <<< "$s"
        printf '  %-12s %3s/%3s  %s\n' "$name" "$min" "$max" "$cmd"
    done
    [ -x "$SANITIZER" ] || echo "note: no compute-sanitizer here ($SANITIZER; the GPU machine has one)"
    echo "imports:"
    "$PY" benchmarks/gpu_check_report.py --check-imports || { echo "dry run: imports FAILED"; exit 1; }
    echo "dry run: ok"
    exit 0
fi

"$PY" - "$OUT/env.json" <<'EOF'
import json, platform, subprocess, sys
import torch, triton
env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA",
       "torch": torch.__version__, "triton": triton.__version__,
       "python": platform.python_version()}
try:
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip()
except OSError:
    pass
json.dump(env, open(sys.argv[1], "w"))
print(env)
EOF

for s in "${STEPS[@]}"; do
    IFS='|' read -r name min max cmd <<< "$s"
    left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt "$min" ]; then
        printf '%s\tskipped\t0\t0\t%s\n' "$name" "$cmd" >> "$OUT/steps.tsv"
        echo "== $name: skipped (${left} s left, needs ${min})"
        continue
    fi
    limit=$(( left < max ? left : max ))
    echo "== $name (limit ${limit} s)"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$cmd" >> "$OUT/steps.tsv"
    echo "   $status (exit $rc, ${secs} s): $(tail -n 1 "$OUT/$name.log")"
done

"$PY" benchmarks/gpu_check_report.py "$OUT"
