"""One state value estimator interface, shared by the SVEB harness (`sveb-kernels sveb eval`) and
the trainer integrations (`sveb_kernels.integrations`), so SVEB scores exactly what a trainer runs.

The batch (`RolloutBatch`): rollouts as padded tensors, row b one rollout:

    token_ids [B, T]      int, prompt and/or response tokens, any padding
    response_mask [B, T]  bool, the tokens the policy generated (Numca reads their text only)
    group_index [B]       int, the prompt each row answers (its group of peers)
    returns [B]           float, each rollout's return
    state_mask [B, T]     bool, the cells whose values are wanted (default: response_mask); cell
                          (b, t) is the state "prefix token_ids[b, :t+1]", i.e. *after* token t
    tokenizer / vocab     for Numca (a NumericVocab is built from the tokenizer once)
    hidden [N, D]         hidden states of the N state cells packed by `batch.packing`
                          (Packing.from_padded(state_mask, group_index): groups contiguous),
                          given or made on first access by `hidden_fn(batch)`
    cached(key, make)     per-batch memo (numeric spans, norms) shared by estimators

SVEB's `SvebBatch` extends it with the states' true values; its state cells are the response
tokens. A trainer wants V(s_t) of the state *before* each response token t, so it passes the
cells one to the left (the last prompt token, then the response tokens but the last) and reads
the values there: value t of its response is the value at cell t - 1.

An estimator (`Estimator`): `name`, `fit(train_batch)` (SVEB calls it with its train split),
`estimate(batch) -> [B, T]` float32 values (read at the state cells). Built-ins:

    GroupMean()                 GRPO's baseline, the group's mean return
    LeaveOneOutMean()           RLOO's baseline, the mean return of the other rollouts
    Numca(match, leave_one_out=, min_support=, vocab=, tokenizer=)    docs/CONTRACT.md §2
    Hista(similarity, temperature, equal_rollout_weight=)             docs/CONTRACT.md §1
    LinearCritic()              a ridge value head on hidden states (needs a train split)
    LearnedHista(dim=64)        Hista over a learned projection + temperature, trained online through
                                the op's backward (values first, then the update: no leakage)
    CallableEstimator / as_estimator(fn)    any fn(batch) -> [B, T] Tensor or ndarray

`make_estimator("numca" | "hista" | "group_mean" | "rloo" | callable | Estimator, **options)`
builds one by name; `advantages_from_values(values, returns, mask, mode=, gamma=, lam=, whiten=,
group_index=, scale=)` turns values into per-token advantages (R - V, or GAE through
`sveb_kernels.gae`), under the one token-advantage scaling rule the trainers use (`advantages.py`:
centred on the group mean, divided by the group/batch std, all-equal groups 0; `group_scale`).
"""

from __future__ import annotations

from .advantages import ADVANTAGE_MODES, SCALINGS, GroupScale, advantages_from_values, group_scale
from .base import CallableEstimator, Estimator, as_estimator
from .batch import HiddenFn, MissingInputError, RolloutBatch, Shard
from .builtin import GroupMean, Hista, LeaveOneOutMean, Numca, peer_mean
from .critic import LinearCritic
from .learned import LearnedHista

NAMED = {"group_mean": GroupMean, "rloo": LeaveOneOutMean, "numca": Numca, "hista": Hista,
         "learned_hista": LearnedHista}


def make_estimator(spec, **options) -> Estimator:
    """An Estimator from a name in `NAMED` (options go to its constructor), an Estimator, or a
    callable fn(batch) -> [B, T] (then no options)."""
    if isinstance(spec, str):
        if spec not in NAMED:
            raise ValueError(f"unknown estimator {spec!r}: expected one of {sorted(NAMED)}, an Estimator "
                             f"or a callable fn(batch) -> [B, T]")
        return NAMED[spec](**options)
    if options:
        raise TypeError(f"estimator options {sorted(options)} only apply to a named estimator, not {spec!r}")
    return as_estimator(spec)


__all__ = [
    "ADVANTAGE_MODES", "SCALINGS", "GroupScale", "group_scale", "CallableEstimator", "Estimator", "GroupMean",
    "HiddenFn", "Hista", "LeaveOneOutMean", "LearnedHista", "LinearCritic", "MissingInputError", "NAMED", "Numca",
    "RolloutBatch", "Shard", "advantages_from_values", "as_estimator", "make_estimator", "peer_mean",
]
