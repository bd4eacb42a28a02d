"""The cuda backend (compiled extension, csrc/): registration and host-side argument checks on any
machine where the extension is built; the kernels themselves on a GPU (`pytest -m gpu`), against the
float64 oracles and against the reference and Triton backends.

The kernels' logic also runs on the CPU in test_cuda_emulation.py; these GPU tests are what checks
the real thing (PTX fragment layouts, cp.async, the ATen preparation in csrc/*.cu).
"""

import math
import os
import random

import pytest
import torch

import sveb_kernels as sk
from sveb_kernels import _backend, _build_info
from kernel_checks import check_gae, check_hista, check_hista_against
from numca_cases import FAMILIES, assert_spans_equal, oracle_for, tokenizer_and_vocab
from numca_cases import make_batch as numca_batch
from sveb_kernels.numca import NumericSpans
from test_hista import make_batch, plain_pytorch_in_dtype, random_groups
from test_numca_spans import BYTES, MIXED, MIXED_PIECES, dense_random_ids, mixed_decode
from oracles import numca_values_oracle, numeric_spans_oracle

# Public op -> the private op of the extension that implements it.
CUDA_OPS = {"hista_values": "sveb::_cuda_hista_values", "gae": "sveb::_cuda_gae",
            "numeric_spans": "sveb::_cuda_numeric_spans", "numca_values": "sveb::_cuda_numca_values"}

_module, _reason = _build_info.load_extension()
if _module is not None and not (_build_info.built_against() or {}).get("cuda", True):
    _module, _reason = None, "the extension was built without CUDA kernels (CPU-only build)"
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def extension_loaded():
    """Every test here needs the extension. CI builds it (SVEB_FORCE_CUDA_BUILD=1) and sets
    SVEB_REQUIRE_CUDA_EXTENSION=1, so that a build that silently did not happen fails, not skips."""
    if _module is None:
        if os.environ.get("SVEB_REQUIRE_CUDA_EXTENSION", "0") == "1":
            pytest.fail(f"SVEB_REQUIRE_CUDA_EXTENSION=1 but the CUDA extension is not available: {_reason}")
        pytest.skip(f"CUDA extension not available: {_reason}")


# --------------------------------------------------------------------------------------------------
# Without a GPU: registration and host code.

@pytest.mark.parametrize("op", sorted(CUDA_OPS))
def test_cuda_kernels_are_registered(op):
    private = CUDA_OPS[op]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(private, "CUDA"), f"{private} has no CUDA kernel"
    # the CPU registration exists only to refuse CPU tensors clearly (test below)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(private, "CPU")
    assert _backend.why_unavailable(op, "cuda", "cuda") is None  # backend="cuda"/"auto" can pick it


def test_private_hista_schema_matches_public_op():
    public = torch.ops.sveb.hista_values.default._schema
    private = torch.ops.sveb._cuda_hista_values.default._schema
    public_args = [(a.name, str(a.type)) for a in public.arguments if a.name != "backend"]
    private_args = [(a.name, str(a.type)) for a in private.arguments if a.name != "key_splits"]
    assert public_args == private_args
    public_gae = [(a.name, str(a.type)) for a in torch.ops.sveb.gae.default._schema.arguments if a.name != "backend"]
    assert public_gae == [(a.name, str(a.type)) for a in torch.ops.sveb._cuda_gae.default._schema.arguments]
    public_spans = [(a.name, str(a.type)) for a in torch.ops.sveb.numeric_spans.default._schema.arguments
                    if a.name != "backend"]
    private_spans = torch.ops.sveb._cuda_numeric_spans.default._schema
    assert public_spans == [(a.name, str(a.type)) for a in private_spans.arguments]
    assert [r.name for r in private_spans.returns] == list(NumericSpans._fields)
    public_values = [(a.name, str(a.type)) for a in torch.ops.sveb.numca_values.default._schema.arguments
                     if a.name != "backend"]
    private_values = torch.ops.sveb._cuda_numca_values.default._schema
    assert public_values == [(a.name, str(a.type)) for a in private_values.arguments]


def hista_args(**changes):
    n = 5
    args = dict(hidden=torch.randn(n, 3), returns=torch.randn(n), rollout_ids=torch.tensor([0, 0, 1, 1, 2]),
                group_offsets=torch.tensor([0, 5]), temperature=0.1, similarity="cosine",
                key_mask=torch.ones(n, dtype=torch.bool), key_bias=torch.zeros(n), empty_value=0.0, key_splits=0)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,error,match", [
    (dict(hidden=torch.zeros(5)), ValueError, "hidden must have shape"),
    (dict(hidden=torch.zeros(5, 3, dtype=torch.int32)), TypeError, "hidden must have dtype"),
    (dict(hidden=torch.zeros(5, 0)), ValueError, "hidden must have D >= 1"),
    (dict(returns=torch.zeros(4)), ValueError, "returns must have shape"),
    (dict(returns=torch.zeros(5, dtype=torch.int64)), TypeError, "returns must have dtype"),
    (dict(rollout_ids=torch.zeros(5)), TypeError, "rollout_ids must have dtype"),
    (dict(rollout_ids=torch.zeros(6, dtype=torch.int64)), ValueError, "rollout_ids must have shape"),
    (dict(group_offsets=torch.tensor([5])), ValueError, "group_offsets"),
    (dict(group_offsets=torch.tensor([0.0, 5.0])), TypeError, "group_offsets must have dtype"),
    (dict(key_mask=torch.ones(5)), TypeError, "key_mask must have dtype"),
    (dict(key_mask=torch.ones(4, dtype=torch.bool)), ValueError, "key_mask must have shape"),
    (dict(key_bias=torch.zeros(5, dtype=torch.int64)), TypeError, "key_bias must have dtype"),
    (dict(key_bias=torch.zeros(5, 1)), ValueError, "key_bias must have shape"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=math.inf), ValueError, "temperature must be finite"),
    (dict(similarity="l2"), ValueError, "similarity must be one of"),
    (dict(key_splits=-1), ValueError, "key_splits"),
    (dict(key_splits=65), ValueError, "key_splits"),
    ({}, ValueError, "needs CUDA tensors"),  # every argument valid: the CPU tensors are refused
    (dict(key_mask=None, key_bias=None, similarity="dot"), ValueError, "needs CUDA tensors"),
])
def test_private_hista_op_checks_arguments(changes, error, match):
    with pytest.raises(error, match=match):
        torch.ops.sveb._cuda_hista_values(**hista_args(**changes))


def gae_args(**changes):
    args = dict(rewards=torch.randn(2, 7), values=torch.randn(2, 7), mask=torch.ones(2, 7, dtype=torch.bool),
                gamma=0.99, lam=0.95)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,error,match", [
    (dict(rewards=torch.zeros(7)), ValueError, "rewards must have shape"),
    (dict(rewards=torch.zeros(2, 7, dtype=torch.int32)), TypeError, "rewards must have dtype"),
    (dict(values=torch.zeros(2, 6)), ValueError, "values must have the shape of rewards"),
    (dict(values=torch.zeros(2, 7, dtype=torch.int64)), TypeError, "values must have dtype"),
    (dict(mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "mask must have the shape of rewards"),
    (dict(mask=torch.ones(2, 7, dtype=torch.complex64)), TypeError, "mask must have dtype"),
    (dict(gamma=1.5), ValueError, "gamma must be <= 1"),
    (dict(lam=-0.1), ValueError, "lam must be >= 0"),
    (dict(gamma=math.nan), ValueError, "gamma must be finite"),
    ({}, ValueError, "needs CUDA tensors"),
    (dict(mask=torch.ones(2, 7, dtype=torch.float16)), ValueError, "needs CUDA tensors"),
])
def test_private_gae_op_checks_arguments(changes, error, match):
    with pytest.raises(error, match=match):
        torch.ops.sveb._cuda_gae(**gae_args(**changes))


def spans_args(**changes):
    args = dict(token_ids=torch.tensor([[49, 50, 32, 51]]), table=BYTES.table, mask=torch.ones(1, 4, dtype=torch.bool))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,error,match", [
    (dict(token_ids=torch.tensor([1, 2])), ValueError, "token_ids must have shape"),
    (dict(token_ids=torch.tensor([[1.0, 2.0]])), TypeError, "token_ids must have dtype"),
    (dict(token_ids=torch.tensor([[1, 2]], dtype=torch.int16)), TypeError, "token_ids must have dtype"),
    (dict(table=BYTES.table.int()), TypeError, "table must have dtype"),
    (dict(table=BYTES.table[:, :2]), ValueError, "table must have shape"),
    (dict(table=BYTES.table[0]), ValueError, "table must have shape"),
    (dict(mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, "mask must have the shape of token_ids"),
    (dict(mask=torch.ones(1, 4, dtype=torch.complex64)), TypeError, "mask must have dtype"),
    ({}, ValueError, "needs CUDA tensors"),
    (dict(mask=None, token_ids=torch.tensor([[49, 50]], dtype=torch.int32)), ValueError, "needs CUDA tensors"),
])
def test_private_spans_op_checks_arguments(changes, error, match):
    with pytest.raises(error, match=match):
        torch.ops.sveb._cuda_numeric_spans(**spans_args(**changes))


def values_args(**changes):
    end = torch.tensor([[True, False, True], [False, True, True]])
    args = dict(end=end, key=torch.tensor([[5, 0, 6], [0, 5, 7]]), returns=torch.tensor([1.0, -1.0]),
                group_index=torch.tensor([3, 3]), mask=torch.ones(2, 3, dtype=torch.bool), match="last",
                leave_one_out=True, min_support=1, empty_value=0.0)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,error,match", [
    (dict(end=torch.ones(3, dtype=torch.bool)), ValueError, "spans.end must have shape"),
    (dict(end=torch.ones(2, 3, dtype=torch.int64)), TypeError, "spans.end must have dtype"),
    (dict(key=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "spans.key must have dtype"),
    (dict(key=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "spans.key must have the shape of spans.end"),
    (dict(returns=torch.zeros(3)), ValueError, "returns must have shape"),
    (dict(returns=torch.zeros(2, dtype=torch.int64)), TypeError, "returns must have dtype"),
    (dict(group_index=torch.zeros(2)), TypeError, "group_index must have dtype"),
    (dict(group_index=torch.zeros(1, dtype=torch.int64)), ValueError, "group_index must have shape"),
    (dict(mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "mask must have the shape of spans.end"),
    (dict(mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "mask must have dtype"),
    (dict(match="first"), ValueError, "match must be one of"),
    (dict(min_support=0), ValueError, "min_support must be >= 1"),
    ({}, ValueError, "needs CUDA tensors"),
    (dict(match="prefix", mask=torch.ones(2, 3), group_index=torch.tensor([1, 2], dtype=torch.uint8)), ValueError,
     "needs CUDA tensors"),
])
def test_private_values_op_checks_arguments(changes, error, match):
    with pytest.raises(error, match=match):
        torch.ops.sveb._cuda_numca_values(**values_args(**changes))


def test_public_functions_refuse_cuda_backend_on_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA tensors"):
        sk.hista_values(**{k: v for k, v in hista_args().items() if k != "key_splits"}, backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        sk.gae(**gae_args(), backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        sk.numeric_spans(torch.tensor([[49, 50]]), BYTES, backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        a = values_args()
        sk.numca_values((a["end"], a["key"], None, None), a["returns"], a["group_index"], a["mask"], backend="cuda")


# --------------------------------------------------------------------------------------------------
# On a GPU: the kernels.

def on_gpu(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


def cuda_hista(hidden, returns, rollout_ids, offsets, *, temperature=0.1, similarity="cosine", key_mask=None,
               key_bias=None, empty_value=0.0, key_splits=0):
    hidden, returns, rollout_ids, offsets, key_mask, key_bias = on_gpu(hidden, returns, rollout_ids, offsets,
                                                                       key_mask, key_bias)
    values, lse = torch.ops.sveb._cuda_hista_values(hidden, returns, rollout_ids, offsets, temperature, similarity,
                                                     key_mask, key_bias, empty_value, key_splits)
    torch.cuda.synchronize()
    return values.cpu(), lse.cpu()


def dense_hista_fp64(hidden, returns, rollout_ids, offsets, *, temperature=0.1, similarity="cosine", key_mask=None,
                     key_bias=None, empty_value=0.0):
    """The §1 formula with an [N, N] float64 score matrix on the GPU: an oracle for sizes the loop
    oracle is too slow for (tests only; the kernels never build [N, N])."""
    device = "cuda"
    h = hidden.to(device, torch.float64)
    n = h.shape[0]
    offsets = offsets.to(device)
    group = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=device), offsets.diff(), output_size=n)
    if similarity == "cosine":
        h = h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(1e-6)
    scores = (h @ h.T) / temperature
    ids = rollout_ids.to(device)
    usable = (group[:, None] == group[None, :]) & (ids[:, None] != ids[None, :])
    if key_bias is not None:
        bias = key_bias.to(device, torch.float64)
        usable &= torch.isfinite(bias)[None, :]
        scores = scores + torch.where(torch.isfinite(bias), bias, 0.0)[None, :]
    if key_mask is not None:
        usable &= key_mask.to(device)[None, :]
    scores = scores.masked_fill(~usable, -math.inf)
    top = scores.amax(dim=1)
    has_keys = torch.isfinite(top)
    weights = torch.exp(scores - torch.where(has_keys, top, 0.0)[:, None])
    total = weights.sum(dim=1)
    safe = torch.where(has_keys, total, 1.0)
    values = torch.where(has_keys, (weights @ returns.to(device, torch.float64)) / safe, empty_value)
    lse = torch.where(has_keys, top + torch.log(safe), -math.inf)
    return values.cpu(), lse.cpu()


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_hista_matches_loop_oracle(seed, dtype, similarity):
    groups = random_groups(5, 6, 60) + [[], [9], [1, 1]]
    d = int(torch.randint(1, 300, ()))  # odd sizes: padded to whole 16-byte vectors on the host
    hidden, returns, rollout_ids, offsets = make_batch(groups, d, dtype=dtype)
    temperature = 0.1 if similarity == "cosine" else 2.0 * math.sqrt(d)
    values, lse = cuda_hista(hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity)
    check_hista(values, lse, hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_hista_low_precision_within_twice_plain_pytorch_error(seed, dtype, similarity):
    """docs/CONTRACT.md §1 for 16-bit inputs, stated as in test_hista.py."""
    d = 129
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(4, 6, 15), d, dtype=dtype)
    temperature = 0.1 if similarity == "cosine" else float(d)
    values, lse = cuda_hista(hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity)
    want, want_lse = dense_hista_fp64(hidden, returns, rollout_ids, offsets, temperature=temperature,
                                      similarity=similarity)
    plain = plain_pytorch_in_dtype(hidden.cuda(), returns.cuda(), rollout_ids.cuda(), offsets.cuda(), temperature,
                                   similarity).cpu()
    has_keys = torch.isfinite(want_lse)
    ours = (values.double() - want)[has_keys].abs().max()
    theirs = (plain.double() - want)[has_keys].abs().max()
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [896, 4096])
def test_hista_llm_sizes_match_dense_oracle(seed, dtype, d):
    """LLM hidden sizes, groups of several query and key tiles, every key split count."""
    groups = [[int(torch.randint(150, 400, ()))for _ in range(4)] for _ in range(3)]
    hidden, returns, rollout_ids, offsets = make_batch(groups, d, dtype=dtype)
    want_values, want_lse = dense_hista_fp64(hidden, returns, rollout_ids, offsets)
    for key_splits in (0, 1, 3, 16):
        values, lse = cuda_hista(hidden, returns, rollout_ids, offsets, key_splits=key_splits)
        check_hista_against(values, lse, want_values, want_lse, returns)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("key_splits", [1, 2, 7])
def test_hista_mask_bias_and_empty_rows(seed, dtype, key_splits):
    groups = random_groups(5, 5, 70) + [[130]]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 72, dtype=dtype)
    n = hidden.shape[0]
    key_mask = torch.rand(n) > 0.3
    key_mask[offsets[0]:offsets[1]] = False  # the first group has no keys
    key_bias = torch.randn(n) * 2
    key_bias[torch.rand(n) < 0.05] = -math.inf  # -inf bias: not a key either
    kw = dict(temperature=0.3, empty_value=-2.5)
    values, lse = cuda_hista(hidden, returns, rollout_ids, offsets, key_mask=key_mask, key_bias=key_bias,
                             key_splits=key_splits, **kw)
    finite = torch.isfinite(key_bias)  # the loop oracle is told the same without infinities
    check_hista(values, lse, hidden, returns, rollout_ids, offsets, key_mask=key_mask & finite,
                key_bias=torch.where(finite, key_bias, 0.0), **kw)
    assert (values[offsets[0]:offsets[1]] == -2.5).all() and (lse[offsets[0]:offsets[1]] == -math.inf).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_hista_tile_edges_and_rollout_layouts(seed, dtype):
    """Tiles inside one rollout (skipped key tiles), query tiles spanning dozens of groups, rollouts
    interleaved inside a group, int64 ids equal in their low 32 bits, N just past a tile."""
    groups = [[300], [128, 128, 1], [200, 150]] + [[int(torch.randint(1, 4, ()))] * 3 for _ in range(60)]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 40, dtype=dtype)
    ids = rollout_ids.to(torch.int64)
    start, end = int(offsets[3]), int(offsets[8])
    ids[start:end] = (torch.arange(end - start) % 2) << 32  # two rollouts: ids 0 and 2^32, interleaved
    values, lse = cuda_hista(hidden, returns, ids, offsets, empty_value=0.5)
    check_hista(values, lse, hidden, returns, ids, offsets, empty_value=0.5)
    for n in (127, 128, 129, 257):
        h, r, i, o = make_batch([[n - n // 3, n // 3]], 24, dtype=dtype)
        values, lse = cuda_hista(h, r, i, o, key_splits=2)
        check_hista(values, lse, h, r, i, o)


@gpu
@pytest.mark.parametrize("scale,temperature", [(300.0, 0.05), (3000.0, 0.05), (1.0, 1e-3), (1.0, 1e3)])
def test_hista_fp32_extremes(seed, scale, temperature):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 5, 60), 257, scale=scale)
    values, lse = cuda_hista(hidden, returns, rollout_ids, offsets, temperature=temperature)
    check_hista(values, lse, hidden, returns, rollout_ids, offsets, temperature=temperature)


@gpu
def test_hista_layouts_dtypes_and_inputs_untouched(seed):
    """Hidden states the kernels cannot stream directly (misaligned, non-contiguous, D not a whole
    number of 16-byte vectors, fp64) get a prepared copy; int32 ids/offsets and fp16 returns work;
    the inputs are not modified."""
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(4, 4, 50), 64)
    n = hidden.shape[0]
    misaligned = torch.empty(n * 64 + 1, dtype=torch.bfloat16)[1:].view(n, 64)  # contiguous, 2 bytes off
    misaligned.copy_(hidden)
    cases = {
        "misaligned bf16": misaligned,
        "column-major fp32": hidden.T.contiguous().T,
        "fp64": hidden.double(),
        "D = 61 fp16": hidden[:, :61].half(),
        "strided rows bf16": hidden.to(torch.bfloat16)[:, ::2],
    }
    for what, h in cases.items():
        h_gpu = h.cuda() if what != "misaligned bf16" else torch.empty(n * 64 + 1, dtype=torch.bfloat16,
                                                                       device="cuda")[1:].view(n, 64).copy_(h)
        before = h_gpu.clone()
        values, lse = torch.ops.sveb._cuda_hista_values(h_gpu, returns.half().cuda(), rollout_ids.int().cuda(),
                                                         offsets.int().cuda(), 0.1, "cosine", None, None, 0.0)
        assert torch.equal(before, h_gpu), what
        check_hista(values.cpu(), lse.cpu(), h, returns.half().float(), rollout_ids, offsets)


@gpu
def test_hista_no_tokens_and_no_keys():
    values, lse = cuda_hista(torch.zeros(0, 8), torch.zeros(0), torch.zeros(0, dtype=torch.int32),
                             torch.zeros(1, dtype=torch.int64))
    assert values.shape == lse.shape == (0,)
    hidden, returns, rollout_ids, offsets = make_batch([[5], [], [200], [1]], 16, dtype=torch.bfloat16)
    values, lse = cuda_hista(hidden, returns, rollout_ids, offsets, empty_value=0.25)
    assert (values == 0.25).all() and (lse == -math.inf).all()


def backend_available(op, backend):
    return _backend.why_unavailable(op, backend, "cuda") is None


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("other", ["reference", "triton"])
def test_hista_agrees_with_other_backends(seed, dtype, other):
    if not backend_available("hista_values", other):
        pytest.skip(f"{other} backend unavailable: {_backend.why_unavailable('hista_values', other, 'cuda')}")
    groups = [[int(torch.randint(50, 300, ())) for _ in range(int(torch.randint(2, 8, ())))] for _ in range(5)]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 1024, dtype=dtype)
    args = on_gpu(hidden, returns, rollout_ids, offsets)
    ours = sk.hista_values(*args, temperature=0.1, backend="cuda")
    theirs = sk.hista_values(*args, temperature=0.1, backend=other)
    # each within 1e-4 * max|returns| of the truth (fp32 bound; 16-bit products are exact in fp32)
    bound = 2e-4 * float(returns.abs().max())
    assert float((ours.values - theirs.values).abs().max()) <= bound
    assert torch.equal(torch.isfinite(ours.lse), torch.isfinite(theirs.lse))


@gpu
def test_hista_public_op_compiles_and_passes_opcheck(seed):
    hidden, returns, rollout_ids, offsets = on_gpu(*make_batch(random_groups(3, 4, 40), 64, dtype=torch.bfloat16))
    n = hidden.shape[0]
    key_mask, key_bias = (torch.rand(n) > 0.2).cuda(), torch.randn(n).cuda()
    torch.library.opcheck(torch.ops.sveb.hista_values.default,
                          [hidden, returns, rollout_ids, offsets, 0.2, "cosine", key_mask, key_bias, 0.5, "cuda"])

    def f(hidden, returns, rollout_ids, offsets):
        return sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=0.2, backend="cuda").values * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(hidden, returns, rollout_ids, offsets),
                               f(hidden, returns, rollout_ids, offsets))


def cuda_gae(rewards, values, mask, gamma, lam):
    adv, ret = torch.ops.sveb._cuda_gae(*on_gpu(rewards, values, mask), gamma, lam)
    torch.cuda.synchronize()
    return adv.cpu(), ret.cpu()


def random_mask(batch, length):
    lengths = torch.randint(0, length + 1, (batch,))
    return (torch.arange(length)[None, :] < lengths[:, None]) & (torch.rand(batch, length) > 0.2)


SEGMENT = 2048  # csrc/gae_kernel.cuh: positions per segment


@gpu
@pytest.mark.parametrize("length", [1, 37, SEGMENT - 1, SEGMENT, SEGMENT + 1, 5 * SEGMENT + 3])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.7, 0.0)])
def test_gae_matches_loop(seed, length, gamma, lam):
    batch = int(torch.randint(1, 9, ()))
    rewards, values, mask = torch.randn(batch, length), torch.randn(batch, length), random_mask(batch, length)
    mask[0] = False
    check_gae(*cuda_gae(rewards, values, mask, gamma, lam), rewards, values, mask, gamma, lam)


@gpu
@pytest.mark.parametrize("length", [4096, 32768])
def test_gae_long_rows(seed, length):
    mask = random_mask(4, length)
    rewards, values = torch.randn(4, length), torch.randn(4, length)
    for gamma, lam in [(1.0, 1.0), (0.999, 0.97)]:
        check_gae(*cuda_gae(rewards, values, mask, gamma, lam), rewards, values, mask, gamma, lam)


@gpu
def test_gae_carries_across_segments(seed):
    length = 3 * SEGMENT + 5
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[0, [0, 7, 8, SEGMENT - 1, 3 * SEGMENT + 1]] = True
    mask[1, [SEGMENT, 2 * SEGMENT - 1, length - 1]] = True
    rewards, values = torch.randn(2, length), torch.randn(2, length)
    check_gae(*cuda_gae(rewards, values, mask, 0.9, 0.8), rewards, values, mask, 0.9, 0.8)


@gpu
@pytest.mark.parametrize("rewards_dtype,values_dtype,mask_dtype", [
    (torch.bfloat16, torch.bfloat16, torch.bool), (torch.float16, torch.float16, torch.uint8),
    (torch.bfloat16, torch.float16, torch.float32), (torch.float64, torch.float32, torch.int64),
    (torch.float64, torch.float64, torch.bool)])
def test_gae_dtypes(seed, rewards_dtype, values_dtype, mask_dtype):
    rewards, values = torch.randn(3, 300).to(rewards_dtype), torch.randn(3, 300).to(values_dtype)
    mask = random_mask(3, 300).to(mask_dtype)
    check_gae(*cuda_gae(rewards, values, mask, 0.95, 0.9), rewards, values, mask, 0.95, 0.9)


@gpu
def test_gae_non_contiguous_and_empty(seed):
    rewards, values, mask = torch.randn(40, 6).T, torch.randn(6, 80)[:, ::2], random_mask(40, 6).T
    check_gae(*cuda_gae(rewards, values, mask, 0.9, 0.8), rewards, values, mask, 0.9, 0.8)
    for shape in [(0, 5), (3, 0)]:
        adv, ret = cuda_gae(torch.zeros(shape), torch.zeros(shape), torch.zeros(shape, dtype=torch.bool), 1.0, 1.0)
        assert adv.shape == ret.shape == shape


@gpu
@pytest.mark.parametrize("other", ["reference", "triton"])
def test_gae_agrees_with_other_backends(seed, other):
    if not backend_available("gae", other):
        pytest.skip(f"{other} backend unavailable: {_backend.why_unavailable('gae', other, 'cuda')}")
    rewards, values, mask = on_gpu(torch.randn(64, 4096), torch.randn(64, 4096), random_mask(64, 4096))
    ours = sk.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="cuda")
    theirs = sk.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=other)
    bound = 2e-5 * (1 + float(theirs[0].abs().max())) * math.log2(4096 + 1)
    for a, b in zip(ours, theirs):
        assert float((a - b).abs().max()) <= bound


@gpu
def test_gae_public_op_compiles_and_passes_opcheck(seed):
    rewards, values, mask = on_gpu(torch.randn(4, 23), torch.randn(4, 23), torch.rand(4, 23) > 0.3)
    torch.library.opcheck(torch.ops.sveb.gae.default, [rewards, values, mask, 0.9, 0.95, "cuda"])

    def f(rewards, values, mask):
        adv, ret = sk.gae(rewards, values, mask, gamma=1.0, lam=0.95, backend="cuda")
        return adv * mask, ret

    for a, b in zip(torch.compile(f, fullgraph=True)(rewards, values, mask), f(rewards, values, mask)):
        torch.testing.assert_close(a, b)


# ---- Numca numeric_spans -------------------------------------------------------------------------
def cuda_spans(token_ids, vocab, mask=None):
    spans = sk.numeric_spans(token_ids.cuda(), vocab.to("cuda"), None if mask is None else mask.cuda(),
                             backend="cuda")
    torch.cuda.synchronize()
    return NumericSpans(*(t.cpu() for t in spans))


@gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_spans_match_reference_and_regex_oracle(seed, family):
    rng = random.Random(seed)
    _, vocab = tokenizer_and_vocab(family)
    for _ in range(3):
        ids, mask = numca_batch(family, rng, rows=int(rng.randint(1, 70)), pieces=30)
        got = cuda_spans(ids, vocab, mask)
        want = sk.numeric_spans(ids, vocab, mask, backend="reference")
        assert_spans_equal(got, [x.tolist() for x in want], ids, value_ulps=1)
        assert_spans_equal(got, oracle_for(family, ids, mask), ids, value_ulps=1)


@gpu
def test_spans_dense_grammar_int32_and_out_of_vocab_ids(seed):
    rng = random.Random(seed)
    ids = dense_random_ids(rng, 130, 97)  # 130 rows, one CTA each
    mask = (torch.rand(ids.shape) > 0.05).to(torch.uint8)  # a 0/1 mask
    assert_spans_equal(cuda_spans(ids.int(), MIXED, mask), numeric_spans_oracle(mixed_decode, ids, set(), mask),
                       ids, value_ulps=1)
    holes = torch.rand(ids.shape) < 0.05
    bad = torch.where(holes, torch.where(torch.rand(ids.shape) < 0.5, -3, 10 ** 6), ids)
    got = NumericSpans(*(t.cpu() for t in sk.numeric_spans(bad.cuda(), MIXED.to("cuda"), backend="cuda",
                                                            validate=False)))
    assert_spans_equal(got, numeric_spans_oracle(mixed_decode, ids, set(), ~holes), ids, value_ulps=1)


@gpu
def test_spans_empty_and_non_contiguous_inputs_untouched(seed):
    _, vocab = tokenizer_and_vocab("llama3")
    for shape in [(0, 5), (3, 0)]:
        out = cuda_spans(torch.zeros(shape, dtype=torch.int64), vocab)
        assert out.end.shape == shape and out.value.dtype == torch.float64 and out.start.dtype == torch.int32
    ids, mask = numca_batch("llama3", random.Random(seed), rows=5, pieces=20)
    ids_nc = torch.stack([ids, ids], dim=2)[:, :, 1].cuda()
    mask_nc = mask.T.contiguous().T.cuda()
    before = (ids_nc.clone(), mask_nc.clone())
    got = sk.numeric_spans(ids_nc, vocab.to("cuda").table, mask_nc, backend="cuda")
    assert torch.equal(before[0], ids_nc) and torch.equal(before[1], mask_nc)
    assert_spans_equal(NumericSpans(*(t.cpu() for t in got)), oracle_for("llama3", ids, mask), ids, value_ulps=1)


@gpu
def test_spans_agree_with_triton_on_long_rows(seed):
    if not backend_available("numeric_spans", "triton"):
        pytest.skip("triton backend unavailable")
    rng = random.Random(seed)
    _, vocab = tokenizer_and_vocab("qwen2")
    ids, mask = numca_batch("qwen2", rng, rows=8, pieces=900)  # a few thousand tokens a row
    vocab = vocab.to("cuda")
    ours = sk.numeric_spans(ids.cuda(), vocab, mask.cuda(), backend="cuda")
    theirs = sk.numeric_spans(ids.cuda(), vocab, mask.cuda(), backend="triton")
    assert_spans_equal(NumericSpans(*(t.cpu() for t in ours)), [t.cpu().tolist() for t in theirs], ids, value_ulps=2)


@gpu
def test_spans_chunk_carries_at_training_shapes(seed):
    """B = 256 rows of T = 2048 tokens (8 chunks of the kernel's 256 tokens) over the dense grammar, with
    stretches of zero-length tokens (the backward carry then comes from chunks further right) and masked
    holes: against the reference backend."""
    rng = random.Random(seed)
    ids = dense_random_ids(rng, 256, 2048)
    empty = MIXED_PIECES.index(b"")
    for row in range(0, 256, 3):
        first = rng.randrange(2048)
        ids[row, first:first + rng.randint(200, 700)] = empty
    mask = torch.rand(ids.shape) > 0.02
    got = cuda_spans(ids, MIXED, mask)
    want = sk.numeric_spans(ids, MIXED, mask, backend="reference")
    assert_spans_equal(got, [x.tolist() for x in want], ids, value_ulps=1)


@gpu
def test_spans_public_op_compiles_and_passes_opcheck(seed):
    """As test_numca_spans.test_opcheck: the AOT check is redone with equal_nan (value is NaN off numbers)."""
    ids, mask = numca_batch("gpt2", random.Random(seed), rows=3, pieces=10)
    _, vocab = tokenizer_and_vocab("gpt2")
    ids, mask, table = ids.cuda(), mask.cuda(), vocab.to("cuda").table
    op = torch.ops.sveb.numeric_spans.default
    for args in ((ids, table, mask, "cuda"), (ids.int(), table, None, "cuda")):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        compiled = torch.compile(lambda *a: op(*a), backend="aot_eager", fullgraph=True, dynamic=True)(*args)
        for a, b in zip(compiled, op(*args)):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)

    cuda_vocab = vocab.to("cuda")

    def f(ids, mask):
        spans = sk.numeric_spans(ids, cuda_vocab, mask, backend="cuda")
        return spans.value.nan_to_num(0.0).sum(), spans.key

    for a, b in zip(torch.compile(f, fullgraph=True)(ids, mask), f(ids, mask)):
        torch.testing.assert_close(a, b)


# ---- Numca numca_values --------------------------------------------------------------------------
def values_batch(batch, length, match):
    """Groups of different sizes (some of one rollout), keys shared between peers, masked holes."""
    group_index = torch.randint(0, max(1, batch // 3), (batch,)) * 11 - 4
    end = torch.rand(batch, length) < 0.2
    if match == "prefix":
        key = torch.randint(0, 3, (length,))[None, :].expand(batch, length) + 10 * (torch.rand(batch, length) < 0.1)
    else:
        key = torch.randint(-(2 ** 63), 2 ** 63 - 1, (5,), dtype=torch.int64)[torch.randint(0, 5, (batch, length))]
    key = torch.where(end, key, torch.zeros_like(key))
    return NumericSpans(end, key, None, None), torch.randn(batch), group_index, torch.rand(batch, length) > 0.1


@gpu
@pytest.mark.parametrize("match", ["last", "prefix"])
@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("min_support", [1, 2, 3])
def test_values_match_reference_and_oracle(seed, match, leave_one_out, min_support):
    kw = dict(match=match, leave_one_out=leave_one_out, min_support=min_support, empty_value=-0.5)
    for batch, length in [(1, 1), (7, 37), (13, 300), (40, 1100)]:
        spans, returns, group_index, mask = values_batch(batch, length, match)
        got = sk.numca_values(NumericSpans(*on_gpu(*spans)), *on_gpu(returns, group_index, mask), backend="cuda",
                              **kw).cpu()
        want = sk.numca_values(spans, returns, group_index, mask, backend="reference", **kw)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if batch * length <= 4000:
            oracle = torch.tensor(numca_values_oracle(spans.end, spans.key, returns, group_index, mask, **kw))
            torch.testing.assert_close(got.double(), oracle.reshape(got.shape), rtol=1e-6, atol=1e-6)


@gpu
def test_values_dtypes_empty_and_inputs_untouched(seed):
    spans, returns, group_index, mask = values_batch(9, 50, "last")
    end, key = on_gpu(spans.end, spans.key)
    ret, groups, m = on_gpu(returns.half(), group_index.to(torch.int16), mask.to(torch.uint8))
    before = [t.clone() for t in (end, key, ret, groups, m)]
    got = torch.ops.sveb._cuda_numca_values(end, key, ret, groups, m, "last", True, 1, 0.0).cpu()
    torch.testing.assert_close(got, sk.numca_values(spans, returns.half().float(), group_index, mask,
                                                    backend="reference"), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, (end, key, ret, groups, m)))
    key_nc = torch.stack([key, key], 2)[:, :, 0]
    assert torch.equal(sk.numca_values((end, key_nc, None, None), *on_gpu(returns, group_index, mask),
                                       backend="cuda").cpu(), sk.numca_values((end, key, None, None),
                                       *on_gpu(returns, group_index, mask), backend="cuda").cpu())
    for shape in [(0, 4), (3, 0)]:
        out = sk.numca_values((torch.zeros(shape, dtype=torch.bool, device="cuda"),
                               torch.zeros(shape, dtype=torch.int64, device="cuda"), None, None),
                              torch.zeros(shape[0], device="cuda"), torch.zeros(shape[0], dtype=torch.int64,
                                                                                 device="cuda"),
                              torch.ones(shape, dtype=torch.bool, device="cuda"), backend="cuda")
        assert out.shape == shape and out.dtype == torch.float32


@gpu
@pytest.mark.parametrize("match", ["last", "prefix"])
def test_values_agree_with_triton(seed, match):
    if not backend_available("numca_values", "triton"):
        pytest.skip("triton backend unavailable")
    spans, returns, group_index, mask = values_batch(64, 2000, match)
    args = (NumericSpans(*on_gpu(*spans)), *on_gpu(returns, group_index, mask))
    ours = sk.numca_values(*args, match=match, min_support=2, backend="cuda")
    theirs = sk.numca_values(*args, match=match, min_support=2, backend="triton")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@gpu
def test_values_public_op_compiles_and_passes_opcheck(seed):
    spans, returns, group_index, mask = values_batch(6, 40, "prefix")
    end, key, returns, group_index, mask = on_gpu(spans.end, spans.key, returns, group_index, mask)
    for match in ("last", "prefix"):
        torch.library.opcheck(torch.ops.sveb.numca_values.default,
                              [end, key, returns, group_index, mask, match, True, 2, 0.25, "cuda"])

    def f(end, key, returns, group_index, mask):
        return sk.numca_values((end, key, None, None), returns, group_index, mask, match="prefix", backend="cuda") * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(end, key, returns, group_index, mask),
                               f(end, key, returns, group_index, mask))
