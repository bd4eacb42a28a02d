#!/usr/bin/env bash
# The one script a session runs on a lent GPU machine (about 15 minutes in all, at most 10 minutes a
# command, a fresh machine each time):
#   bash bench/gpu_suite.sh OUTPUT_DIR [BUDGET_SECONDS]     (default budget 540: one 10-minute command)
#
# Stages run in order of value; each has its own timeout, cut to what is left of the budget (a stage
# with under 20 s left is skipped, and says so). Every stage streams its log to OUTPUT_DIR/<n>_<stage>.log
# and appends its line (stage, rc, seconds, status) to OUTPUT_DIR/summary.tsv the moment it ends, so a
# timeout, or the command's own limit, loses only the stage that was running. The first three stages
# are sized to end within about 6 minutes on one H100/H200.
#
# STAGES (name:timeout_seconds, in the order they run; tests/test_gpu_readiness.py checks this line):
STAGES="build:150 correctness:150 headline:60 sanitizer:150 sweeps:240"
#   build        the CUDA extension for the one arch present (nvidia-smi's compute capability, no PTX)
#   correctness  GPU correctness of every op and backend: tests/test_cuda_backend.py, tests/triton
#                (compiled on the GPU), then every other test marked gpu
#   headline     the headline benchmark table (sveb-kernels bench --quick: all ops, every backend)
#   sanitizer    compute-sanitizer memcheck + racecheck over the CUDA kernels
#   sweeps       the full benchmark grid, the Hista config sweep, Numca vs regex, pytest-benchmark
#
# SVEB_SUITE_DRY_RUN=1 runs the schedule with every stage's command replaced by `true` (the CPU test).
set -uo pipefail
out="${1:?usage: bench/gpu_suite.sh OUTPUT_DIR [BUDGET_SECONDS]}"
budget="${2:-540}"
mkdir -p "$out"
out=$(realpath "$out")
cd "$(dirname "$0")/.."
start=$SECONDS
dry="${SVEB_SUITE_DRY_RUN:-0}"
export MAX_JOBS="${MAX_JOBS:-16}"
printf 'stage\trc\tseconds\tstatus\n' > "$out/summary.tsv"

# Versions first: a result is worth little without them.
{
    date -u
    python - <<'EOF'
import torch
try:
    import triton
    triton_version = triton.__version__
except Exception as e:  # noqa: BLE001
    triton_version = f"unavailable ({e})"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
EOF
    command -v nvcc > /dev/null && nvcc --version | tail -n 2
    nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2> /dev/null
} 2>&1 | tee "$out/versions.txt"

stage_build() {
    # Only the arch present: one SASS target compiles in a fraction of the default list's time.
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' ')
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${cap:-9.0}}"
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    SVEB_FORCE_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e . || return $?
    sveb-kernels info -v
}

stage_correctness() {
    local rc=0
    python -m pytest -q -p no:cacheprovider --durations=10 tests/test_cuda_backend.py tests/triton || rc=$?
    python -m pytest -q -p no:cacheprovider -m gpu tests --ignore=tests/triton \
        --ignore=tests/test_cuda_backend.py || rc=$((rc ? rc : $?))
    return $rc
}

stage_headline() {
    sveb-kernels bench --quick --json "$out/headline.json" --csv "$out/headline.csv"
}

stage_sanitizer() {
    bash bench/cuda_sanitizer.sh "$out/sanitizer"
}

stage_sweeps() {
    local rc=0
    sveb-kernels bench --json "$out/bench.json" --csv "$out/sveb_bench.csv" --plot "$out/hista_d4096.png" || rc=$?
    sveb-kernels bench --ops hista --hidden 256 --sizes 4096,16384 --csv "$out/sveb_bench.csv" || rc=$?
    for script in bench/hista_gpu.py bench/numca_vs_regex.py; do
        [ -f "$script" ] && { python "$script" --out "$out" || rc=$?; }
    done
    python -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$out/pytest_benchmark.json" || rc=$?
    return $rc
}

n=0
for entry in $STAGES; do
    name=${entry%%:*}
    limit=${entry##*:}
    n=$((n + 1))
    log="$out/${n}_${name}.log"
    left=$((budget - (SECONDS - start)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        printf '%s\t-\t0\tskipped (budget spent)\n' "$name" | tee -a "$out/summary.tsv"
        continue
    fi
    echo "== $name (timeout ${limit}s)" | tee -a "$out/stages.txt"
    began=$SECONDS
    if [ "$dry" = "1" ]; then
        timeout "$limit" true > "$log" 2>&1
    else
        # export -f: the stage functions run in the child shell that timeout starts.
        export -f "stage_$name"
        export out
        timeout --kill-after=10 "$limit" bash -c "stage_$name" > "$log" 2>&1
    fi
    rc=$?
    status=ok
    [ "$rc" -ne 0 ] && status=failed
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timed out after ${limit}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - began))" "$status" | tee -a "$out/summary.tsv"
    tail -n 3 "$log" | sed 's/^/    /'
done
echo "total $((SECONDS - start))s of a ${budget}s budget" | tee -a "$out/summary.tsv"
