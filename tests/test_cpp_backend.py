"""The cpp backend's own promises, beyond the shared contract tests (which take the `backend` fixture):
results bit-identical for any thread count, `auto` picking it on CPU, the private ops' argument checks,
and its tiling knobs."""

import random

import pytest
import torch

import sveb_kernels as sk
from sveb_kernels import _backend
from conftest import _CPP_MARKS
from test_hista import assert_close_fp32, make_batch, random_groups
from test_numca_spans import make_batch as token_batch, tokenizer_and_vocab

pytestmark = list(_CPP_MARKS)


def with_threads(count, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def assert_identical(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y) or torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(
            x.nan_to_num(0.0), y.nan_to_num(0.0)), "results differ between thread counts"


@pytest.fixture
def split_small_work():
    """Lets the kernels split even small inputs over threads (by default they keep them on one)."""
    before = torch.ops.sveb._cpp_set_min_work_per_thread(64)
    yield
    torch.ops.sveb._cpp_set_min_work_per_thread(before)


def test_auto_picks_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("SVEB_BACKEND", raising=False)
    for op in ("gae", "hista_values", "numeric_spans", "numca_values"):
        assert _backend.resolve(op, "auto", "cpu") == "cpp"
        assert "cpp" in sk.available_backends("cpu")[op]
    assert "cpp" in _backend.why_unavailable("gae", "cpp", "meta")


@pytest.mark.parametrize("shape", [(3, 50), (64, 4096), (9, 20000)])
def test_gae_identical_for_any_thread_count(seed, shape, split_small_work):
    rewards, values = torch.randn(*shape), torch.randn(*shape) * 100
    mask = torch.rand(*shape) > 0.2
    runs = [with_threads(n, lambda: sk.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="cpp")) for n in (1, 2, 3)]
    assert_identical(runs[0], runs[1])
    assert_identical(runs[0], runs[2])


@pytest.mark.parametrize("groups", [[[5, 7]], [[200] * 8, [150] * 8], [[40, 60, 50]] * 30])
def test_hista_identical_for_any_thread_count(seed, groups, split_small_work):
    hidden, returns, rollout_ids, offsets = make_batch(groups, 96)
    run = lambda: sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=0.1, backend="cpp")  # noqa: E731
    runs = [with_threads(n, run) for n in (1, 2, 3)]
    assert_identical(runs[0], runs[1])
    assert_identical(runs[0], runs[2])


def test_numca_identical_for_any_thread_count(seed, split_small_work):
    ids, mask = token_batch("llama3", random.Random(seed), rows=40, pieces=60)
    _, vocab = tokenizer_and_vocab("llama3")
    spans = [with_threads(n, lambda: sk.numeric_spans(ids, vocab, mask, backend="cpp")) for n in (1, 2)]
    assert_identical(spans[0], spans[1])
    returns, groups = torch.randn(ids.shape[0]), torch.randint(0, 5, (ids.shape[0],))
    for match in ("last", "prefix"):
        values = [with_threads(n, lambda: sk.numca_values(spans[0], returns, groups, mask, match=match,
                                                          backend="cpp")) for n in (1, 2)]
        assert torch.equal(values[0], values[1])


@pytest.mark.parametrize("query_block,key_block", [(1, 0), (3, 0), (16, 0), (1, 1), (3, 5), (16, 7), (1000, 1000)])
def test_hista_blocks_cross_rollouts(seed, query_block, key_block):
    """Tiny blocks: many block pairs per group (key_block 0), or every group streaming its keys in many
    steps through the online softmax (key_block > 0)."""
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(4, 4, 11) + [[30, 25, 41]], 19)
    key_bias = torch.randn(hidden.shape[0])
    values, lse = torch.ops.sveb._cpp_hista_values(hidden, returns, rollout_ids, offsets, 0.2, "cosine", None,
                                                   key_bias, 0.0, query_block, key_block)
    assert_close_fp32(sk.HistaOutput(values, lse), hidden, returns, rollout_ids, offsets, temperature=0.2,
                      key_bias=key_bias)


def test_hista_nan_hidden_gives_nan_not_a_number():
    hidden, returns, rollout_ids, offsets = make_batch([[3, 4], [2, 2]], 8)
    hidden[1, 2] = float("nan")
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, backend="cpp")
    # token 1 and the other rollout's queries (whose keys include token 1) depend on the NaN
    depends = torch.tensor([False, True, False, True, True, True, True, False, False, False, False])
    assert torch.isnan(out.values[depends]).all() and torch.isnan(out.lse[depends]).all()
    assert torch.isfinite(out.values[~depends]).all()


def hista_direct_args():
    hidden, returns, rollout_ids, offsets = make_batch([[3, 4], [2]], 8)
    return [hidden, returns, rollout_ids, offsets, 0.1, "cosine", None, None, 0.0]


@pytest.mark.parametrize("index,bad,exc,word", [
    (3, torch.tensor([0, 5, 4, 9]), ValueError, "group_offsets"),      # decreasing
    (3, torch.tensor([1, 7, 9]), ValueError, "group_offsets"),         # not starting at 0
    (3, torch.tensor([0, 7, 12]), ValueError, "group_offsets"),        # not ending at N
    (3, torch.tensor([0, 7, 9.0]), TypeError, "group_offsets"),
    (0, torch.zeros(9, 8, dtype=torch.int64), TypeError, "hidden"),
    (1, torch.zeros(8), ValueError, "returns"),
    (2, torch.zeros(9, dtype=torch.int16), TypeError, "rollout_ids"),
    (4, 0.0, ValueError, "temperature"),
    (5, "l2", ValueError, "similarity"),
    (0, torch.zeros(9, 8, device="meta"), ValueError, "CPU"),
])
def test_hista_private_op_checks(index, bad, exc, word):
    args = hista_direct_args()
    args[index] = bad
    with pytest.raises(exc, match=word):
        torch.ops.sveb._cpp_hista_values(*args)


def test_other_private_op_checks():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="gamma"):
        torch.ops.sveb._cpp_gae(r, r, r > 0, 1.5, 1.0)
    with pytest.raises(ValueError, match="values"):
        torch.ops.sveb._cpp_gae(r, torch.zeros(3, 2), r > 0, 1.0, 1.0)
    with pytest.raises(TypeError, match="token_ids"):
        torch.ops.sveb._cpp_numeric_spans(r, torch.zeros(4, 3, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="vocab table"):
        torch.ops.sveb._cpp_numeric_spans(r.long(), torch.zeros(4, 2, dtype=torch.int64), None)
    end, key = torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="match"):
        torch.ops.sveb._cpp_numca_values(end, key, torch.zeros(2), torch.zeros(2, dtype=torch.int64), end, "first",
                                         True, 1, 0.0)
    with pytest.raises(ValueError, match="group_index"):
        torch.ops.sveb._cpp_numca_values(end, key, torch.zeros(2), torch.zeros(3, dtype=torch.int64), end, "last",
                                         True, 1, 0.0)


def test_min_work_per_thread_setter():
    """The default split threshold is ~4M element-operations (milliseconds of work); the setter checks."""
    before = torch.ops.sveb._cpp_set_min_work_per_thread(1 << 22)
    assert torch.ops.sveb._cpp_set_min_work_per_thread(before) == 1 << 22
    with pytest.raises(ValueError, match="work"):
        torch.ops.sveb._cpp_set_min_work_per_thread(0)


def test_extension_reports_its_cpp_kernels():
    assert torch.__version__.split("+")[0] in torch.ops.sveb._cpp_extension_info()
