"""Differential fuzzer: every path that computes an op, against the float64 oracles (tests/oracles.py)
and the non-finite dependency rule (tests/nonfinite_cases.py, docs/DESIGN.md "NaN and inf").

Paths on a CPU machine: the public op on each CPU backend (reference, cpp), the raw op
`torch.ops.sveb.*`, `torch.compile(fullgraph=True)`, the distributed ops on 2 gloo ranks, the
estimators the trainer integrations call, and Triton under the interpreter in a process of its own
(`test_triton_paths_under_the_interpreter`, which reruns this file with TRITON_INTERPRET=1).

Draws: odd sizes, empty groups, one-rollout groups, one-token rollouts, holes in masks, every dtype the
contract admits (float64 included), strided views, NaN/inf anywhere, key_mask/key_bias (-inf included),
extreme temperatures. Budget: SVEB_FUZZ_EXAMPLES examples per test (default a CI budget of about a
minute in all on 2 cores; raise it for a long run). A failing draw found once is kept as an
`@example` regression below its test.
"""

import math
import os
import sys

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sveb_kernels as sk  # noqa: E402
from oracles import gae_oracle, hista_oracle, numca_values_oracle  # noqa: E402
from sveb_kernels import _backend  # noqa: E402
from sveb_kernels.numca import NumericSpans  # noqa: E402

EXAMPLES = int(os.environ.get("SVEB_FUZZ_EXAMPLES", "30"))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Under the interpreter only Triton is fuzzed (the other paths run in the main process).
BACKENDS = (["triton"] if INTERPRETED else
            [b for b in ("reference", "cpp") if _backend.why_unavailable("gae", b, "cpu") is None])


def fuzz_settings(scale=1.0):
    return settings(max_examples=max(1, int(EXAMPLES * scale)), deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# ------------------------------------------------------------------------------------------ Hista
@st.composite
def hista_cases(draw, max_tokens=60):
    groups = draw(st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=4), min_size=1, max_size=5))
    lengths = [length for group in groups for length in group]
    if sum(lengths) > max_tokens:
        groups = [[1, 1]]
    n = sum(sum(g) for g in groups)
    d = draw(st.sampled_from([1, 2, 3, 7, 16, 33]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    similarity = draw(st.sampled_from(["cosine", "dot"]))
    extreme = draw(st.integers(0, 9)) == 0
    if similarity == "cosine":
        temperature = draw(st.sampled_from([1e-30, 1e-9, 1e4])) if extreme else draw(
            st.floats(0.02, 5.0))
    else:
        temperature = draw(st.sampled_from([1e-3, 1e6])) if extreme else draw(st.floats(0.5, 50.0))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    rollout_ids, next_id = [], draw(st.integers(-3, 10))
    for group in groups:
        for length in group:
            rollout_ids += [next_id] * length
            next_id += draw(st.integers(1, 3))
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + sum(group))
    scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 30.0]))
    hidden = (torch.randn(n, d, generator=gen) * scale + 0.5 * torch.randn(1, d, generator=gen) * scale)
    if draw(st.booleans()):
        hidden[torch.rand(n, generator=gen) < 0.1] = 0.0            # zero rows: the eps of the cosine norm
    hidden = hidden.to(dtype)
    returns = torch.randn(n, generator=gen, dtype=torch.float64).to(draw(st.sampled_from(
        [torch.float32, torch.float64, torch.bfloat16])))
    key_mask = (torch.rand(n, generator=gen) < 0.75) if draw(st.booleans()) else None
    key_bias = None
    if draw(st.booleans()):
        key_bias = torch.randn(n, generator=gen)
        if draw(st.booleans()):
            key_bias[torch.rand(n, generator=gen) < 0.2] = -math.inf
    poison = draw(st.sampled_from([None, None, None, "hidden", "returns", "key_bias"])) if n else None
    poison_value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    poison_at = draw(st.integers(0, max(0, n - 1)))
    strided = draw(st.booleans())
    return dict(n=n, hidden=hidden, returns=returns, rollout_ids=torch.tensor(rollout_ids, dtype=draw(
        st.sampled_from([torch.int32, torch.int64]))), offsets=torch.tensor(offsets), temperature=temperature,
        similarity=similarity, key_mask=key_mask, key_bias=key_bias, empty_value=draw(st.sampled_from([0.0, -1.5])),
        poison=poison, poison_value=poison_value, poison_at=poison_at, strided=strided, extreme=extreme)


def poisoned(case):
    """The case's tensors with its poison applied (if any), and the [N] masks of the values and lse that
    must be non-finite by the dependency rule (tests/nonfinite_cases.py)."""
    from nonfinite_cases import hista_key_sets

    hidden, returns, key_bias = case["hidden"].clone(), case["returns"].clone(), case["key_bias"]
    n = case["n"]
    bad_values = torch.zeros(n, dtype=torch.bool)
    bad_lse = torch.zeros(n, dtype=torch.bool)
    if case["poison"] is None:
        return hidden, returns, key_bias, bad_values, bad_lse
    j = case["poison_at"]
    if case["poison"] == "key_bias":
        key_bias = (torch.zeros(n) if key_bias is None else key_bias).clone()
        key_bias[j] = math.nan            # -inf is a legitimate zero weight; NaN poisons
    # K(i) of the poisoned inputs: a NaN bias where -inf was makes j a key again (the fuzzer's first
    # long run drew exactly that and the rule, read off the clean bias, expected no NaN)
    keys = hista_key_sets(case["rollout_ids"].long(), case["offsets"], case["key_mask"])
    if key_bias is not None:
        keys &= (key_bias != -math.inf)[None, :]
    if case["poison"] == "hidden":
        hidden[j, 0] = case["poison_value"]
        bad_lse = keys[:, j].clone()
        bad_lse[j] |= keys[j].any()
        bad_values = bad_lse.clone()
    elif case["poison"] == "returns":
        returns[j] = case["poison_value"]
        bad_values = keys[:, j].clone()
    else:
        bad_lse = keys[:, j].clone()
        bad_values = bad_lse.clone()
    return hidden, returns, key_bias, bad_values, bad_lse


def check_hista_case(case, values, lse, hidden, returns, key_bias, bad_values, bad_lse, what):
    """values/lse of one path against the oracle on the clean inputs, the dependency rule on the poisoned."""
    n = case["n"]
    assert values.shape == (n,) and lse.shape == (n,) and values.dtype == lse.dtype == torch.float32, what
    values, lse = values.detach().cpu(), lse.detach().cpu()
    clean_bias = None if key_bias is None else torch.where(torch.isnan(key_bias), 0.0, key_bias)
    clean_hidden = torch.where(torch.isfinite(hidden), hidden, torch.zeros((), dtype=hidden.dtype))
    clean_returns = torch.where(torch.isfinite(returns), returns, torch.zeros((), dtype=returns.dtype))
    if case["poison"] is not None:
        assert not torch.isfinite(values[bad_values]).any(), (what, "poisoned values became finite")
        assert not torch.isfinite(lse[bad_lse]).any() or case["poison"] == "returns", (what, "poisoned lse finite")
        if case["poison"] == "hidden" and math.isnan(case["poison_value"]):
            assert torch.isnan(values[bad_values]).all(), (what, "a NaN input must give NaN")
    ok_values, ok_lse = ~bad_values, ~bad_lse
    want_v, want_l = hista_oracle(clean_hidden.double(), clean_returns, case["rollout_ids"], case["offsets"],
                                  case["temperature"], case["similarity"], case["key_mask"], clean_bias,
                                  case["empty_value"])
    has_keys = torch.isfinite(want_l)
    # rows without keys: exactly (empty_value, -inf), never NaN
    empty = ok_values & ~has_keys
    assert (values[empty] == torch.tensor(case["empty_value"], dtype=torch.float32)).all(), (what, "empty rows")
    assert (lse[ok_lse & ~has_keys] == -math.inf).all(), (what, "empty rows lse")
    rows = ok_values & has_keys
    assert not torch.isnan(values[rows]).any(), (what, "NaN from finite inputs")
    assert not torch.isnan(lse[ok_lse & has_keys]).any(), (what, "NaN lse from finite inputs")
    scale = max(float(clean_returns.double().abs().max()) if n else 0.0, 1e-30)
    if case["extreme"]:
        # Logits of 1e30 (or of 1e-6): the float32 rounding of a score may legitimately reorder near-ties
        # against the oracle, so only the convexity of the average is checked: within the returns' range.
        assert (values[rows].abs() <= scale * (1 + 1e-5)).all(), (what, "outside the returns' range")
        return
    if hidden.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        # The oracle sees the same rounded hidden states, so the fp32 bound holds for every input dtype
        # (products are exact in fp32); dot logits scale with |h|^2 / temperature, hence the term.
        bound = 1e-4 * scale
        if case["similarity"] == "dot":
            logit = float((clean_hidden.double().norm(dim=1) ** 2).max()) / case["temperature"] if n else 0.0
            bound = max(bound, 4e-7 * logit * scale)
        err = (values[rows].double() - want_v[rows]).abs()
        assert err.numel() == 0 or float(err.max()) <= bound, (what, float(err.max()), bound)
        lrows = ok_lse & has_keys
        lerr = (lse[lrows].double() - want_l[lrows]).abs() / want_l[lrows].abs().clamp_min(1.0)
        lbound = 1e-5
        if case["similarity"] == "dot":
            lbound = max(lbound, 4e-7 * logit)
        else:
            lbound = max(lbound, 1e-6 / case["temperature"])
        assert lerr.numel() == 0 or float(lerr.max()) <= lbound, (what, "lse", float(lerr.max()))


def hista_paths(case, hidden, returns, key_bias):
    """(name, values, lse) of every Hista path available here."""
    args = (hidden, returns, case["rollout_ids"], case["offsets"])
    kw = dict(temperature=case["temperature"], similarity=case["similarity"], key_mask=case["key_mask"],
              key_bias=key_bias, empty_value=case["empty_value"])
    if case["strided"]:
        args = (hidden.T.contiguous().T, torch.stack([returns, returns], 1)[:, 0]) + args[2:]
    for backend in BACKENDS:
        out = sk.hista_values(*args, backend=backend, **kw)
        yield f"public {backend}", out.values, out.lse
        values, lse = torch.ops.sveb.hista_values(*args, kw["temperature"], kw["similarity"], kw["key_mask"],
                                                  kw["key_bias"], kw["empty_value"], backend)
        yield f"raw {backend}", values, lse


def hista_example(hidden, returns, rollout_ids, offsets, **options):
    """A found draw, written out as a case (the regressions below)."""
    case = dict(hidden=torch.tensor(hidden), returns=torch.tensor(returns),
                rollout_ids=torch.tensor(rollout_ids, dtype=torch.int32), offsets=torch.tensor(offsets),
                temperature=0.1, similarity="cosine", key_mask=None, key_bias=None, empty_value=0.0, poison=None,
                poison_value=math.nan, poison_at=0, strided=False, extreme=False)
    case.update(options)
    case["n"] = case["hidden"].shape[0]
    return case


@fuzz_settings()
@given(hista_cases())
# cpp: a -inf logit (dot, D=1, a +inf hidden state times a negative one) was a silent zero weight, not NaN
@example(hista_example([[0.9987], [-0.8357], [-2.7211], [0.0262]], [-1.3986, 0.4033, 0.8380, -0.7193], [0, 1, 2, 3],
                       [0, 4], temperature=1e-3, similarity="dot", poison="hidden", poison_value=math.inf,
                       extreme=True))
# cpp: the NaN return of the query's own rollout leaked in through 0 * NaN (any temperature)
@example(hista_example([[0.4516], [-1.3828]], [0.5684, -1.0845], [0, 1], [0, 2], temperature=1e-30, poison="returns",
                       poison_value=math.nan, extreme=True))
@example(hista_example([[0.4516], [-1.3828]], [0.5684, -1.0845], [0, 1], [0, 2], poison="returns"))
# test's own rule: a NaN key_bias where the clean one was -inf makes the token a key again
@example(hista_example([[-1.6149], [2.2759], [-1.5720], [0.9545]], [1.2268, 0.8196, -1.0267, -1.6151], [0, 1, 2, 3],
                       [0, 3, 4], key_bias=torch.tensor([-math.inf, 1.0253, -math.inf, 0.0931]), poison="key_bias"))
def test_hista_every_path_matches_the_oracle(case):
    hidden, returns, key_bias, bad_values, bad_lse = poisoned(case)
    for what, values, lse in hista_paths(case, hidden, returns, key_bias):
        check_hista_case(case, values, lse, hidden, returns, key_bias, bad_values, bad_lse, what)


@pytest.mark.skipif(INTERPRETED, reason="compiled in the main process")
@fuzz_settings(scale=0.1)
@given(hista_cases(max_tokens=30))
def test_hista_compiled_fullgraph_matches_the_oracle(case):
    torch._dynamo.reset()
    hidden, returns, key_bias, bad_values, bad_lse = poisoned(case)

    @torch.compile(fullgraph=True, backend="eager")
    def compiled(h, r, ids, offsets, mask, bias):
        out = sk.hista_values(h, r, ids, offsets, temperature=case["temperature"], similarity=case["similarity"],
                              key_mask=mask, key_bias=bias, empty_value=case["empty_value"], backend=BACKENDS[0])
        return out.values, out.lse

    values, lse = compiled(hidden, returns, case["rollout_ids"], case["offsets"], case["key_mask"], key_bias)
    check_hista_case(case, values, lse, hidden, returns, key_bias, bad_values, bad_lse, "compiled")


# -------------------------------------------------------------------------------------------- GAE
@st.composite
def gae_cases(draw):
    b, t = draw(st.integers(0, 5)), draw(st.integers(0, 70))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["random", "critic"]))
    rewards = torch.randn(b, t, generator=gen, dtype=torch.float64)
    values = torch.randn(b, t, generator=gen, dtype=torch.float64) * draw(st.sampled_from([1.0, 1e3]))
    if kind == "critic":   # small advantages, |values| ~ 1e3: the tight case of the bound
        rewards = torch.zeros(b, t, dtype=torch.float64)
        if t:
            rewards[:, -1] = 1e3
        values = rewards.flip(1).cumsum(1).flip(1) + 1e-3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < draw(st.sampled_from([0.5, 0.9, 1.0]))
    mask_dtype = draw(st.sampled_from([torch.bool, torch.float32, torch.int64, torch.uint8]))
    rdtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    vdtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
    if vdtype == torch.float16:
        values = values.clamp(-6e4, 6e4)
    poison = draw(st.sampled_from([None, None, "rewards", "values"])) if b * t else None
    return dict(rewards=rewards.to(rdtype), values=values.to(vdtype), mask=mask.to(mask_dtype),
                gamma=draw(st.sampled_from([1.0, 0.99, 0.0, 0.5])), lam=draw(st.sampled_from([1.0, 0.95, 0.0])),
                poison=poison, poison_value=draw(st.sampled_from([math.nan, math.inf])),
                at=(draw(st.integers(0, max(0, b - 1))), draw(st.integers(0, max(0, t - 1)))),
                strided=draw(st.booleans()))


@fuzz_settings()
@given(gae_cases())
def test_gae_every_path_matches_the_oracle(case):
    rewards, values, mask = case["rewards"].clone(), case["values"].clone(), case["mask"]
    bad = torch.zeros(rewards.shape, dtype=torch.bool)
    if case["poison"] is not None:
        b, t = case["at"]
        (rewards if case["poison"] == "rewards" else values)[b, t] = case["poison_value"]
        valid = mask[b] != 0
        if valid[t]:    # masked positions are skipped: a poison there changes nothing
            bad[b, : t + 1] = True
    want_adv, want_ret = gae_oracle(case["rewards"], case["values"], mask, case["gamma"], case["lam"])
    length = rewards.shape[1]
    bound = 1e-5 * (1 + float(want_adv.abs().max() if want_adv.numel() else 0)) * math.log2(length + 1)
    args = (rewards, values, mask)
    if case["strided"]:
        args = tuple(x.T.contiguous().T for x in args)
    for backend in BACKENDS:
        for what, (adv, ret) in ((f"public {backend}", sk.gae(*args, gamma=case["gamma"], lam=case["lam"],
                                                               backend=backend)),
                                 (f"raw {backend}", torch.ops.sveb.gae(*args, case["gamma"], case["lam"], backend))):
            assert adv.shape == rewards.shape and adv.dtype == ret.dtype == torch.float32, what
            assert not torch.isfinite(adv[bad]).any(), (what, "poisoned advantages finite")
            ok = ~bad
            # rows after the poison (positions > t) do not depend on it; positions <= t of the row do
            err = (adv[ok].double() - want_adv[ok]).abs()
            assert err.numel() == 0 or float(err.max()) <= bound, (what, float(err.max()), bound)
            rerr = (ret[ok].double() - want_ret[ok]).abs()
            rbound = bound + 1e-7 * float(want_ret.abs().max() if want_ret.numel() else 0)
            if case["poison"] == "values":   # returns = adv + values also depends on values[b, t] itself
                rerr = (ret[ok & ~_at(case, rewards.shape)].double() - want_ret[ok & ~_at(case, rewards.shape)]).abs()
            assert rerr.numel() == 0 or float(rerr.max()) <= rbound, (what, "returns", float(rerr.max()), rbound)


def _at(case, shape):
    out = torch.zeros(shape, dtype=torch.bool)
    if out.numel():
        out[case["at"]] = True
    return out


# ------------------------------------------------------------------------------------------ Numca
@st.composite
def numca_cases(draw):
    b, t = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    end = torch.rand(b, t, generator=gen) < draw(st.sampled_from([0.1, 0.4, 0.8]))
    pool = torch.tensor(draw(st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1).filter(lambda k: k != 0), min_size=1,
                                      max_size=4)))
    key = torch.where(end, pool[torch.randint(0, len(pool), (b, t), generator=gen)], 0)
    mask = torch.rand(b, t, generator=gen) < draw(st.sampled_from([0.6, 1.0]))
    returns = torch.randn(b, generator=gen, dtype=torch.float64).to(draw(st.sampled_from([torch.float32,
                                                                                          torch.float64])))
    group_index = torch.randint(0, draw(st.integers(1, 4)), (b,), generator=gen) * draw(
        st.sampled_from([1, 7919, -(2 ** 40)]))
    return dict(end=end, key=key, mask=mask, returns=returns, group_index=group_index,
                match=draw(st.sampled_from(["last", "prefix"])), leave_one_out=draw(st.booleans()),
                min_support=draw(st.sampled_from([1, 1, 2, 3])), empty_value=draw(st.sampled_from([0.0, 3.5])),
                strided=draw(st.booleans()))


@fuzz_settings()
@given(numca_cases())
def test_numca_values_every_path_matches_the_oracle(case):
    opts = dict(match=case["match"], leave_one_out=case["leave_one_out"], min_support=case["min_support"],
                empty_value=case["empty_value"])
    want = torch.tensor(numca_values_oracle(case["end"], case["key"], case["returns"], case["group_index"],
                                            case["mask"], **opts), dtype=torch.float64)
    end, key, mask = case["end"], case["key"], case["mask"]
    if case["strided"]:
        end, key, mask = (x.T.contiguous().T for x in (end, key, mask))
    for backend in BACKENDS:
        outs = [(f"public {backend}", sk.numca_values(NumericSpans(end, key, None, None), case["returns"],
                                                      case["group_index"], mask, backend=backend, **opts)),
                (f"raw {backend}", torch.ops.sveb.numca_values(end, key, case["returns"], case["group_index"], mask,
                                                               opts["match"], opts["leave_one_out"],
                                                               opts["min_support"], opts["empty_value"], backend))]
        for what, out in outs:
            assert out.shape == end.shape and out.dtype == torch.float32, what
            err = float((out.double() - want).abs().max())
            assert err <= 1e-6 * (1 + float(want.abs().max())), (what, err)


# --------------------------------------------------------------------------- estimators (integrations)
@st.composite
def padded_batches(draw):
    b, t = draw(st.integers(1, 7)), draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    mask = torch.rand(b, t, generator=gen) < draw(st.sampled_from([0.5, 0.9, 1.0]))
    group_index = torch.randint(0, draw(st.integers(1, 3)), (b,), generator=gen)
    returns = torch.randn(b, generator=gen)
    d = draw(st.sampled_from([1, 4, 9]))
    n = int(mask.sum())
    hidden = torch.randn(n, d, generator=gen).to(draw(st.sampled_from([torch.float32, torch.bfloat16])))
    return dict(mask=mask, group_index=group_index, returns=returns, hidden=hidden,
                similarity=draw(st.sampled_from(["cosine", "dot"])), temperature=draw(st.floats(0.05, 3.0)),
                equal=draw(st.booleans()))


@pytest.mark.skipif(INTERPRETED, reason="run in the main process")
@fuzz_settings(scale=0.5)
@given(padded_batches())
def test_hista_estimator_matches_the_oracle(case):
    """The Hista estimator the integrations call (estimators.builtin.Hista on a RolloutBatch): padded
    rows -> packed state cells -> the op -> [B, T], against the oracle on the same packed cells."""
    from sveb_kernels.estimators import Hista, RolloutBatch

    mask, returns = case["mask"], case["returns"]
    batch = RolloutBatch(torch.zeros(mask.shape, dtype=torch.int64), mask, case["group_index"], returns,
                         hidden=case["hidden"])
    for backend in BACKENDS:
        est = Hista(case["similarity"], case["temperature"], backend=backend, equal_rollout_weight=case["equal"])
        values = est.estimate(batch)
        packing = batch.packing
        rollout_ids = packing.rollout_ids.long()
        key_bias = None
        if case["equal"]:
            lengths = torch.bincount(rollout_ids, minlength=mask.shape[0]).to(torch.float32)
            key_bias = -torch.log(lengths.clamp_min(1))[rollout_ids]
        want, _ = hista_oracle(case["hidden"].double(), returns[rollout_ids], rollout_ids, packing.group_offsets,
                               est.last_temperature, case["similarity"], None, key_bias, 0.0)
        want = packing.unpack(want.to(torch.float32))
        assert values.shape == mask.shape
        err = float((values.double() - want.double()).abs().max())
        bound = 1e-4 * float(returns.abs().max())
        if case["similarity"] == "dot":   # logits ~ |h|^2 / temperature in float32
            bound = max(bound, 4e-7 * float(returns.abs().max()) * float(
                (case["hidden"].double().norm(dim=1) ** 2).max() if len(case["hidden"]) else 0) /
                est.last_temperature)
        assert err <= bound, (backend, err, bound)


# ------------------------------------------------------------------------------------ distributed
def _distributed_worker(rank, world, init_file, out_file, cases):
    import datetime
    import json

    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sveb_kernels import distributed as skd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    log = []
    try:
        for i, case in enumerate(cases):
            hidden, returns, key_bias, bad_values, bad_lse = poisoned(case)
            n = case["n"]
            group_ids = torch.repeat_interleave(torch.arange(len(case["offsets"]) - 1) * 13 - 5,
                                                case["offsets"].diff())
            gen = torch.Generator().manual_seed(i)
            ranks = torch.randint(0, world, (n,), generator=gen)
            mine = torch.nonzero(ranks == rank).reshape(-1)
            mine = mine[torch.randperm(len(mine), generator=gen)]        # unsorted shards
            out = skd.hista_values(hidden[mine], returns[mine], case["rollout_ids"][mine], group_ids[mine],
                                   temperature=case["temperature"], similarity=case["similarity"],
                                   key_mask=None if case["key_mask"] is None else case["key_mask"][mine],
                                   key_bias=None if key_bias is None else key_bias[mine],
                                   empty_value=case["empty_value"], backend="reference")
            single = sk.hista_values(hidden, returns, case["rollout_ids"], case["offsets"],
                                     temperature=case["temperature"], similarity=case["similarity"],
                                     key_mask=case["key_mask"], key_bias=key_bias, empty_value=case["empty_value"],
                                     backend="reference")
            scale = max(float(torch.nan_to_num(returns.double(), 0, 0, 0).abs().max()) if n else 0, 1e-30)
            torch.testing.assert_close(out.values, single.values[mine], atol=2e-5 * scale if not case["extreme"]
                                       else scale, rtol=0, equal_nan=True)
            assert torch.equal(torch.isnan(out.values), torch.isnan(single.values[mine])), "NaN pattern"
            assert torch.equal(torch.isfinite(out.lse), torch.isfinite(single.lse[mine])), "lse pattern"
            log.append(i)
    except BaseException:
        import traceback
        log.append("FAILED " + traceback.format_exc())
        raise
    finally:
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump(log, f)
        dist.destroy_process_group()


@pytest.mark.skipif(INTERPRETED, reason="run in the main process")
@fuzz_settings(scale=1 / 30)   # one spawn of two processes costs ~20 s here: few examples, many cases each
@given(st.lists(hista_cases(max_tokens=50), min_size=6, max_size=12))
def test_distributed_hista_equals_the_single_process_op(tmp_path_factory, cases):
    """2 gloo ranks, tokens of each draw scattered unsorted; the plan cuts large groups into query
    blocks, so the block path (reference.attend) and the whole-group path both run."""
    import json

    import torch.multiprocessing as mp

    from sveb_kernels.distributed import hista as distributed_hista

    tmp = tmp_path_factory.mktemp("fuzz_dist")
    world = 2
    try:
        mp.spawn(_distributed_worker, args=(world, str(tmp / "init"), str(tmp / "log"), cases), nprocs=world,
                 join=True)
    except Exception:
        failures = [line for r in range(world) if (tmp / f"log.{r}").exists()
                    for line in json.loads((tmp / f"log.{r}").read_text()) if isinstance(line, str)]
        pytest.fail("\n\n".join(failures) or "a rank died without a log")
    del distributed_hista


# ---------------------------------------------------------------------------- Triton (interpreter)
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="this is the process that starts it")
def test_triton_paths_under_the_interpreter():
    """This file's Hista/GAE/Numca fuzz tests on the triton backend, in a process of its own under
    TRITON_INTERPRET=1 (a fifth of the budget: the interpreter runs each kernel op in numpy)."""
    pytest.importorskip("triton")
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1", SVEB_FUZZ_EXAMPLES=str(max(1, EXAMPLES // 5)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                           "every_path"], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
