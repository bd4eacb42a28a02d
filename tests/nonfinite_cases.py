"""Non-finite inputs for every backend's tests (docs/DESIGN.md, "GPU readiness: NaN and inf").

docs/CONTRACT.md "Common rules": without validation, the outputs that *depend on* a NaN/inf input
are non-finite (NaN for a NaN input), never a plausible number; all other outputs are unchanged.
"Depends on" is read off the formulas, written here independently of any backend:

- Hista (§1): values[i] depends on hidden[i] (only when K(i) is non-empty: an empty K(i) gives
  empty_value whatever the inputs) and, for every key j in K(i), on hidden[j], key_bias[j] and
  returns[j]; lse[i] on the same minus the returns. Keys outside K(i) (other groups, i's own
  rollout, key_mask False) never matter, whatever they hold.
- Numca (§2c): values[b, t] depends on returns[b'] for every b' in the support set S whose mean it
  takes, or in peers(b) when it takes their mean; masked tokens are 0 whatever the returns.
- GAE (§3): adv[b, t] depends on rewards and values of row b at the *valid* positions >= t;
  returns[b, t] = adv[b, t] + values[b, t] also on values[b, t]. Masked positions are skipped (never
  read), as the contract's "masked positions skipped" says: the loop's `m * x` is read as
  `where(m, x, 0)`, so that padding (often garbage: -inf log-probs, NaN) cannot poison a row.

The helpers build a clean case, poison some entries, and give the set of outputs that must be
non-finite; every other output must equal the oracle on the clean inputs.
"""

import math

import torch

from oracles import hista_oracle
from test_hista import make_batch, random_groups

POISONS = (float("nan"), float("inf"), float("-inf"))


def hista_key_sets(rollout_ids, offsets, key_mask=None):
    """K as a dense [N, N] bool matrix (tests only: small N)."""
    n = rollout_ids.numel()
    group = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    keys = (group[:, None] == group[None, :]) & (rollout_ids[:, None] != rollout_ids[None, :])
    if key_mask is not None:
        keys &= key_mask[None, :]
    return keys.reshape(n, n)


def hista_poison_case(poison, *, d=19, with_mask=True):
    """A random batch with one poisoned hidden state (a key that is in some K(i)), one poisoned
    hidden state of a masked-out key (must change nothing), one poisoned return and one poisoned
    key_bias entry. Returns (clean kwargs, poisoned kwargs, must-be-non-finite masks for values and lse).
    """
    while True:
        groups = random_groups(num_groups=4, max_rollouts=4, max_len=9) + [[5], []]
        if sum(len(g) > 1 for g in groups) >= 2:
            break
    hidden, returns, rollout_ids, offsets = make_batch(groups, d)
    n = hidden.shape[0]
    key_mask = torch.rand(n) > 0.2 if with_mask else torch.ones(n, dtype=torch.bool)
    key_bias = torch.randn(n) * 0.5
    keys = hista_key_sets(rollout_ids, offsets, key_mask)
    in_some_k = keys.any(dim=0).nonzero().flatten()
    picks = in_some_k[torch.randperm(in_some_k.numel())]
    bad_hidden, bad_return = int(picks[0]), int(picks[-1])
    bad_bias = int(picks[len(picks) // 2])
    clean = dict(hidden=hidden, returns=returns, rollout_ids=rollout_ids, group_offsets=offsets,
                 key_mask=key_mask, key_bias=key_bias, temperature=0.2)
    hidden_p, returns_p, bias_p = hidden.clone(), returns.clone(), key_bias.clone()
    hidden_p[bad_hidden, int(torch.randint(d, ()))] = poison
    returns_p[bad_return] = poison
    # -inf is a legitimate key_bias (a zero weight), so the bias is poisoned with NaN only.
    bias_p[bad_bias] = float("nan")
    masked = (~key_mask).nonzero().flatten()
    if masked.numel():  # a masked key is in no K(i): its hidden state must not matter
        hidden_p[int(masked[0])] = float("nan")
        clean_masked_ok = not keys[int(masked[0])].any()  # its own row depends on it when it has keys
    poisoned = dict(clean, hidden=hidden_p, returns=returns_p, key_bias=bias_p)
    bad_lse = keys[:, bad_hidden] | keys[:, bad_bias]
    bad_lse[bad_hidden] |= keys[bad_hidden].any()
    if masked.numel() and not clean_masked_ok:
        bad_lse[int(masked[0])] = True
    bad_values = bad_lse | keys[:, bad_return]
    return clean, poisoned, bad_values, bad_lse


def check_hista_nonfinite(out, clean, bad_values, bad_lse, poison):
    """Outputs in the bad sets are non-finite (NaN for a NaN poison); the rest match the clean oracle."""
    values, lse = out.values.cpu(), out.lse.cpu()
    assert bad_values.any()
    assert not torch.isfinite(values[bad_values]).any(), values[bad_values]
    assert not torch.isfinite(lse[bad_lse]).any() and not (lse[bad_lse] == -math.inf).any(), lse[bad_lse]
    if math.isnan(poison):
        assert torch.isnan(values[bad_values]).all()
    want_values, want_lse = hista_oracle(**clean)
    good = ~bad_values
    bound = 1e-4 * float(clean["returns"].abs().max())
    assert (values[good].double() - want_values[good]).abs().max() <= bound
    good_lse = ~bad_lse
    assert torch.equal(torch.isfinite(lse[good_lse]), torch.isfinite(want_lse[good_lse]))
    finite = good_lse & torch.isfinite(want_lse)
    if finite.any():
        err = (lse[finite].double() - want_lse[finite]).abs() / want_lse[finite].abs().clamp_min(1.0)
        assert err.max() <= 1e-5


def gae_poison_case(poison, batch=4, length=23):
    """Random rewards/values/mask with one poisoned reward and one poisoned value (possibly at masked
    positions). Returns (clean tensors, poisoned tensors, must-be-non-finite mask)."""
    rewards, values = torch.randn(batch, length), torch.randn(batch, length)
    mask = torch.rand(batch, length) > 0.3
    r_p, v_p = rewards.clone(), values.clone()
    bad_adv = torch.zeros(batch, length, dtype=torch.bool)
    bad_ret = torch.zeros(batch, length, dtype=torch.bool)
    for tensor in (r_p, v_p, r_p, v_p):  # each twice: at a valid and at a masked position
        b, t = int(torch.randint(batch, ())), int(torch.randint(length, ()))
        tensor[b, t] = poison
        if mask[b, t]:
            bad_adv[b, : t + 1] = True
        if tensor is v_p:
            bad_ret[b, t] = True
    return (rewards, values, mask), (r_p, v_p, mask), (bad_adv, bad_adv | bad_ret)


def check_gae_nonfinite(out, clean, bad, gamma, lam, poison):
    from oracles import gae_oracle

    adv, ret = (x.cpu() for x in out)
    bad_adv, bad_ret = bad
    assert not torch.isfinite(adv[bad_adv]).any() and not torch.isfinite(ret[bad_ret]).any()
    if math.isnan(poison):
        assert torch.isnan(adv[bad_adv]).all() and torch.isnan(ret[bad_ret]).all()
    want_adv, want_ret = gae_oracle(*clean, gamma, lam)
    length = clean[0].shape[1]
    bound = 1e-5 * (1 + float(want_adv.abs().max())) * math.log2(length + 1)
    assert (adv[~bad_adv].double() - want_adv[~bad_adv]).abs().max() <= bound
    assert (ret[~bad_ret].double() - want_ret[~bad_ret]).abs().max() <= bound * 4


def numca_poison_case(poison, batch=9, length=31, match="last", min_support=1):
    """Hand-built spans over groups of 1-4 rollouts with one or two poisoned returns. The outputs that
    depend on returns[p] are found by linearity, from the oracle alone: every value is a mean of
    returns (or 0 / empty_value), so it depends on returns[p] iff it is non-zero when returns is the
    p-th unit vector (empty_value 0)."""
    for _ in range(100):  # a draw where nobody averages a poisoned return checks nothing: draw again
        case = _numca_poison_draw(poison, batch, length, match, min_support)
        if case[2].any():
            return case
    raise AssertionError("no draw had an output depending on a poisoned return")


def _numca_poison_draw(poison, batch, length, match, min_support):
    from oracles import numca_values_oracle

    end = torch.rand(batch, length) < 0.25
    key = torch.where(end, torch.randint(1, 4, (batch, length)), torch.zeros(batch, length, dtype=torch.int64))
    group_index = torch.randint(0, 3, (batch,)).sort().values
    mask = torch.rand(batch, length) > 0.2
    returns = torch.randn(batch)
    poisoned_rows = torch.randperm(batch)[: int(torch.randint(1, 3, ()))]
    kw = dict(match=match, min_support=min_support, leave_one_out=True)
    bad = torch.zeros(batch, length, dtype=torch.bool)
    for p in poisoned_rows.tolist():
        unit = torch.zeros(batch, dtype=torch.float64)
        unit[p] = 1.0
        weight = torch.tensor(numca_values_oracle(end, key, unit, group_index, mask, empty_value=0.0, **kw),
                              dtype=torch.float64).reshape(batch, length)
        bad |= weight != 0
    returns_p = returns.clone()
    returns_p[poisoned_rows] = poison
    spans = (end, key, None, None)
    clean = dict(spans=spans, returns=returns, group_index=group_index, mask=mask, empty_value=-0.5, **kw)
    return clean, dict(clean, returns=returns_p), bad


def check_numca_nonfinite(out, clean, bad, poison):
    from oracles import numca_values_oracle

    out = out.cpu()
    assert bad.any()
    assert not torch.isfinite(out[bad]).any()
    if math.isnan(poison):
        assert torch.isnan(out[bad]).all()
    spans = clean["spans"]
    kw = {k: v for k, v in clean.items() if k not in ("spans", "returns", "group_index", "mask")}
    want = torch.tensor(numca_values_oracle(spans[0], spans[1], clean["returns"], clean["group_index"], clean["mask"],
                                            **kw), dtype=torch.float64).reshape(out.shape)
    torch.testing.assert_close(out[~bad].double(), want[~bad], rtol=1e-6, atol=1e-6)
