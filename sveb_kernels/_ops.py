"""The `torch.ops.sveb.*` custom ops: schemas and fake (meta) implementations, defined once.

Each op takes a concrete `backend` name (already resolved from "auto" by the public function), so a
graph captured by torch.compile calls the same kernel that eager mode would. The op body only looks
the implementation up in `_backend`; it knows nothing of the algorithms.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backend import implementation


# Why a custom op: it makes Hista opaque to torch.compile (the kernels are not traceable) while its
# fake impl still gives shapes, so trainers can compile the surrounding step with fullgraph=True.
@torch.library.custom_op("sveb::hista_values", mutates_args=())
def hista_values(
    hidden: Tensor,
    returns: Tensor,
    rollout_ids: Tensor,
    group_offsets: Tensor,
    temperature: float,
    similarity: str,
    key_mask: Optional[Tensor],
    key_bias: Optional[Tensor],
    empty_value: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return implementation("hista_values", backend)(
        hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask, key_bias, empty_value
    )


@hista_values.register_fake
def _hista_values_fake(hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask, key_bias,
                       empty_value, backend):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


# Why a custom op: the Triton/CUDA scans are single kernels that the compiler must not trace into.
@torch.library.custom_op("sveb::gae", mutates_args=())
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, backend: str) -> tuple[Tensor, Tensor]:
    return implementation("gae", backend)(rewards, values, mask, gamma, lam)


@gae.register_fake
def _gae_fake(rewards, values, mask, gamma, lam, backend):
    return rewards.new_empty(rewards.shape, dtype=torch.float32), rewards.new_empty(rewards.shape, dtype=torch.float32)


# Why a custom op: span detection is a data-dependent pipeline (reference) or one scan kernel
# (Triton) that the compiler must not trace; the fake impl gives the four [B, T] outputs. The vocab
# enters as its int64 table tensor, never as a Python object.
@torch.library.custom_op("sveb::numeric_spans", mutates_args=())
def numeric_spans(token_ids: Tensor, table: Tensor, mask: Optional[Tensor], backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return implementation("numeric_spans", backend)(token_ids, table, mask)


@numeric_spans.register_fake
def _numeric_spans_fake(token_ids, table, mask, backend):
    shape = token_ids.shape
    return (token_ids.new_empty(shape, dtype=torch.bool), token_ids.new_empty(shape, dtype=torch.int64),
            token_ids.new_empty(shape, dtype=torch.float64), token_ids.new_empty(shape, dtype=torch.int32))


# Why a custom op: counting peers that share a milestone sorts and scatters data-dependent sizes
# (reference) or runs one kernel per row (Triton); to the compiler it is one [B, T] -> [B, T] node.
@torch.library.custom_op("sveb::numca_values", mutates_args=())
def numca_values(end: Tensor, key: Tensor, returns: Tensor, group_index: Tensor, mask: Tensor, match: str,
                 leave_one_out: bool, min_support: int, empty_value: float, backend: str) -> Tensor:
    return implementation("numca_values", backend)(end, key, returns, group_index, mask, match, leave_one_out,
                                                   min_support, empty_value)


@numca_values.register_fake
def _numca_values_fake(end, key, returns, group_index, mask, match, leave_one_out, min_support, empty_value,
                       backend):
    return mask.new_empty(mask.shape, dtype=torch.float32)
