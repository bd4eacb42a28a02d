#!/usr/bin/env bash
# compute-sanitizer over the cuda backend's kernels (csrc/), for a machine with a GPU:
# memcheck (out-of-bounds / misaligned global and shared accesses) on all GPU tests of
# tests/test_cuda_backend.py, racecheck (shared-memory hazards) on a subset small enough for its
# ~100x slowdown. Logs go to OUT_DIR/sanitizer-<tool>-<gpu>-<date>.log (default OUT_DIR:
# bench/results); exit status 1 if any tool reports an error.
#
#   bench/cuda_sanitizer.sh [OUT_DIR]        # memcheck + racecheck
#   SANITIZER_TOOLS="memcheck synccheck" bench/cuda_sanitizer.sh
set -uo pipefail
out_dir=$(realpath -m "${1:-$(dirname "$0")/results}")
cd "$(dirname "$0")/.."

SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer ||
  echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
if [ ! -x "$SANITIZER" ]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 2
fi
TOOLS=${SANITIZER_TOOLS:-memcheck racecheck}
PYTHON=${PYTHON:-python}

# Without the caching allocator every tensor is its own cudaMalloc, so an out-of-bounds access lands
# outside any allocation (and is reported) instead of in a neighbouring tensor of the same pool.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

# Only our kernels are instrumented when the sanitizer supports filtering (they live in namespace
# sveb, which every mangled name contains); torch's own kernels then run at full speed.
FILTER=()
if "$SANITIZER" --help 2>&1 | grep -q -- "--kernel-name"; then
  FILTER=(--kernel-name "kns=sveb")
fi

gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo unknown)
stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$out_dir"
status=0
for tool in $TOOLS; do
  case "$tool" in
    racecheck)
      selection=(-k "hista_matches_loop_oracle or hista_mask_bias or tile_edges or gae_matches_loop or gae_carries") ;;
    *) selection=() ;;
  esac
  log="$out_dir/sanitizer-$tool-$gpu-$stamp.log"
  echo "== $tool -> $log"
  "$SANITIZER" --tool "$tool" --error-exitcode 1 "${FILTER[@]}" \
    "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_cuda_backend.py "${selection[@]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $tool: exit status $rc" | tee -a "$log"
    status=1
  fi
  # a clean run ends with "ERROR SUMMARY: 0 errors"
  grep -h "ERROR SUMMARY" "$log" | tail -1
done
exit $status
