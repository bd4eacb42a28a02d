#!/usr/bin/env bash
# The one script a session runs on a lent GPU machine (see the device tool's METHOD.md):
#   bash bench/gpu_suite.sh "$OUT"
# Builds the CUDA extension there (its torch differs from ours: build there, never carry a .so),
# runs the GPU tests, then the benchmarks, and leaves logs, JSON, CSVs and plots in the folder given.
set -uo pipefail
out="${1:?usage: bench/gpu_suite.sh OUTPUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}" SVEB_CUDA_ARCHS="${SVEB_CUDA_ARCHS:-9.0}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1

echo "== build" | tee "$out/summary.txt"
SVEB_FORCE_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
echo "build rc=$?" | tee -a "$out/summary.txt"
sveb-kernels info -v > "$out/info.txt" 2>&1; cat "$out/info.txt" >> "$out/summary.txt"

echo "== GPU tests" | tee -a "$out/summary.txt"
python -m pytest -m gpu -q -p no:cacheprovider tests > "$out/pytest_gpu.log" 2>&1
echo "pytest -m gpu rc=$?: $(tail -n 1 "$out/pytest_gpu.log")" | tee -a "$out/summary.txt"
python -m pytest -q -p no:cacheprovider tests -x --ignore=tests/test_triton_interpreter.py > "$out/pytest_all.log" 2>&1
echo "pytest (all, on GPU) rc=$?: $(tail -n 1 "$out/pytest_all.log")" | tee -a "$out/summary.txt"

echo "== compute-sanitizer (memcheck, racecheck)" | tee -a "$out/summary.txt"
bash bench/cuda_sanitizer.sh "$out/sanitizer" > "$out/sanitizer.log" 2>&1
echo "sanitizer rc=$?" | tee -a "$out/summary.txt"

echo "== benchmarks" | tee -a "$out/summary.txt"
sveb-kernels bench --json "$out/bench.json" --csv "$out/sveb_bench.csv" --plot "$out/hista_d4096.png" \
    > "$out/bench.txt" 2>&1
echo "bench rc=$?" | tee -a "$out/summary.txt"
sveb-kernels bench --ops hista --hidden 256 --sizes 4096,16384 --csv "$out/sveb_bench.csv" \
    > "$out/bench_d256_flex.txt" 2>&1
for script in bench/hista_gpu.py bench/numca_vs_regex.py; do
    [ -f "$script" ] && python "$script" --out "$out" > "$out/$(basename "$script" .py).txt" 2>&1
done
python -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json "$out/pytest_benchmark.json" \
    > "$out/pytest_benchmark.txt" 2>&1
echo "pytest-benchmark rc=$?" | tee -a "$out/summary.txt"
cat "$out/bench.txt" | tail -n 40
