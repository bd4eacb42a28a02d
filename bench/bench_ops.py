"""pytest-benchmark suite over the cases of `sveb-kernels bench`: `pytest bench/ --benchmark-only`.

Each op's implementations share a benchmark group, so pytest-benchmark prints them side by side in
one run; peak added memory goes to extra_info. GPU cases run only where CUDA is visible.
"""

import pytest
import torch

import sveb_kernels as sk
from sveb_kernels.benchmark import baselines, cases
from sveb_kernels.benchmark.timing import peak_added_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = sk.available_backends(DEVICE)


def _run(benchmark, fn, rounds):
    benchmark.extra_info["peak_added_mib"] = (peak_added_bytes(fn, DEVICE) or 0) / 2**20
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["per-token loop"] + BACKENDS["gae"])
def test_gae_64x4096(benchmark, impl):
    """GAE at B=64, T=4096: each backend against the per-token loop (the CPU reference was written to be >= 20x faster)."""
    case = cases.gae_case(64, 4096, DEVICE)
    args, options = (case.rewards, case.values, case.mask), dict(gamma=1.0, lam=0.95)
    benchmark.group = "gae B=64 T=4096"
    fn = ((lambda: baselines.gae_loop(*args, **options)) if impl == "per-token loop"
          else (lambda: sk.gae(*args, **options, backend=impl)))
    _run(benchmark, fn, rounds=5)


HISTA_TOKENS = [4096, 16384] if DEVICE.type == "cuda" else [1024, 2048]
HISTA_D = 4096 if DEVICE.type == "cuda" else 256


@pytest.mark.parametrize("tokens", HISTA_TOKENS)
@pytest.mark.parametrize("impl", ["naive PyTorch"] + BACKENDS["hista_values"])
def test_hista(benchmark, impl, tokens):
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    case = cases.hista_case(2, 8, tokens, HISTA_D, dtype, DEVICE)
    args = (case.hidden, case.returns, case.rollout_ids, case.group_offsets)
    benchmark.group = f"hista {case.label}"
    if impl == "naive PyTorch":
        def fn():
            return baselines.naive_hista(*args, 0.1, "cosine")
    else:
        def fn():
            return sk.hista_values(*args, temperature=0.1, backend=impl)
    _run(benchmark, fn, rounds=3)


@pytest.mark.parametrize("impl", ["naive PyTorch", "reference"])
def test_hista_memory_12288x128(benchmark, impl):
    """Hista at N=12288 tokens, D=128: time, and the memory each backend adds (extra_info; the reference stays well under 200 MiB)."""
    case = cases.hista_case(1, 8, 12288, 128, torch.float32, DEVICE)
    args = (case.hidden, case.returns, case.rollout_ids, case.group_offsets)
    benchmark.group = "hista memory N=12288 D=128"
    fn = (lambda: baselines.naive_hista(*args, 0.1, "cosine")) if impl == "naive PyTorch" else \
        (lambda: sk.hista_values(*args, backend="reference"))
    _run(benchmark, fn, rounds=1)
