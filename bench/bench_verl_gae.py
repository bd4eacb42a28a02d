"""verl's advantage step, GAE: verl's own `compute_advantage(adv_estimator="gae")` (a Python loop over
tokens, then whitening) against the plugin's `adv_estimator="sveb_gae"` (the fused scan, then the
same whitening), side by side in one run, on CPU tensors as verl's driver holds them.

    pytest bench/bench_verl_gae.py --benchmark-only        # pytest-benchmark groups, side by side
    python bench/bench_verl_gae.py [--threads 1]           # prints the times and the ratio

Needs the verl extra (`pip install 'sveb_kernels[verl]'`). Nothing is written to bench/results.
"""

import argparse
import time
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="needs the verl extra")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import verl  # noqa: F401  (loads the plugin)
    from verl import DataProto
    from verl.trainer.ppo import ray_trainer

SHAPES = [(64, 4096), (32, 8192)]
ESTIMATORS = ["gae", "sveb_gae"]


def make_data(batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]) & (torch.rand(batch, length, generator=generator) > 0.1)
    mask = mask.float()
    rewards = torch.randn(batch, length, generator=generator) * mask
    values = torch.randn(batch, length, generator=generator)
    uid = np.array([str(i // 8) for i in range(batch)], dtype=object)
    return DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "values": values, "response_mask": mask}, non_tensors={"uid": uid})


def step(data, estimator):
    return ray_trainer.compute_advantage(data, adv_estimator=estimator, gamma=1.0, lam=0.95, config={})


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("batch,length", SHAPES)
def test_verl_advantage_step(benchmark, estimator, batch, length):
    data = make_data(batch, length)
    benchmark.group = f"verl compute_advantage B={batch} T={length}"
    benchmark.pedantic(lambda: step(data, estimator), rounds=3, warmup_rounds=1)


def _best_of(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    for batch, length in SHAPES:
        data = make_data(batch, length)
        step(data, "sveb_gae")  # warm-up (first call resolves the backend)
        times = {name: _best_of(lambda: step(data, name), args.repeats) for name in ESTIMATORS}
        print(f"B={batch} T={length}: verl gae {times['gae'] * 1e3:.1f} ms, sveb_gae {times['sveb_gae'] * 1e3:.1f} ms, "
              f"ratio {times['gae'] / times['sveb_gae']:.1f}x")


if __name__ == "__main__":
    main()
