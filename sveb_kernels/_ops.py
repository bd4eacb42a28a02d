"""The `torch.ops.sveb.*` custom ops: schemas and fake (meta) implementations, defined once.

Each op takes a concrete `backend` name (already resolved from "auto" by the public function), so a
graph captured by torch.compile calls the same kernel that eager mode would. The op body only looks
the implementation up in `_backend`; it knows nothing of the algorithms.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backend import backward_backend, implementation


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


# The backward of hista_values (docs/DESIGN.md "Hista backward"): its own op, so torch.compile sees one
# opaque node with a fake impl, and each backend registers its kernels like the forward's. p is
# recomputed from the saved lse: the op takes the forward's outputs, never an [N, N] buffer.
@torch.library.custom_op("sveb::hista_values_backward", mutates_args=())
def hista_values_backward(
    grad_values: Tensor,
    grad_lse: Tensor,
    hidden: Tensor,
    returns: Tensor,
    rollout_ids: Tensor,
    group_offsets: Tensor,
    values: Tensor,
    lse: Tensor,
    temperature: float,
    similarity: str,
    key_mask: Optional[Tensor],
    key_bias: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    return implementation("hista_values_backward", backend)(
        grad_values, grad_lse, hidden, returns, rollout_ids, group_offsets, values, lse, temperature, similarity,
        key_mask, key_bias,
    )


@hista_values_backward.register_fake
def _hista_values_backward_fake(grad_values, grad_lse, hidden, returns, rollout_ids, group_offsets, values, lse,
                                temperature, similarity, key_mask, key_bias, backend):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format), \
        torch.empty_like(returns, memory_format=torch.contiguous_format)


def _hista_setup_context(ctx, inputs, output):
    (hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask, key_bias, _empty_value,
     backend) = inputs
    values, lse = output
    ctx.save_for_backward(hidden, returns, rollout_ids, group_offsets, values, lse, key_mask, key_bias)
    ctx.options = (temperature, similarity, backend)


def _hista_backward(ctx, grad_values, grad_lse):
    hidden, returns, rollout_ids, group_offsets, values, lse, key_mask, key_bias = ctx.saved_tensors
    temperature, similarity, backend = ctx.options
    # An output that did not reach the loss has no gradient (None): it contributes zero.
    grad_values = torch.zeros_like(values) if grad_values is None else grad_values
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_hidden = grad_returns = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_hidden, grad_returns = hista_values_backward(
            grad_values, grad_lse, hidden, returns, rollout_ids, group_offsets, values, lse, temperature, similarity,
            key_mask, key_bias, backward_backend("hista_values", backend, hidden.device.type))
    # Gradients flow to hidden and returns only (docs/CONTRACT.md §1): integer inputs, masks,
    # temperature and key_bias are constants of the op.
    return (grad_hidden if ctx.needs_input_grad[0] else None, grad_returns if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None, None, None)


torch.library.register_autograd("sveb::hista_values", _hista_backward, setup_context=_hista_setup_context)


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
