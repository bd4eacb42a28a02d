"""Hista: a token's value is the softmax-weighted mean of the returns of the *other* rollouts of its
prompt, weighted by similarity of the LLM's hidden states (docs/CONTRACT.md §1).

For query token i of group g the keys are K(i) = {j in g : rollout_ids[j] != rollout_ids[i], key_mask[j]},
the logits s(i, j) = sim(h_i, h_j) / temperature + key_bias[j], and

    values[i] = sum_{j in K(i)} softmax_j(s(i, .)) * returns[j],   lse[i] = logsumexp_{j in K(i)} s(i, j).

This is attention with Q = K = hidden states, a scalar value and a varlen block mask that drops the
query's own rollout. Every backend uses O(N*D) memory: no [N, N] buffer is ever built.
Files: `reference.py` (plain PyTorch, any device), `triton.py` (fused Triton kernels for CUDA tensors),
`cuda.py` (the compiled kernel of csrc/hista.cu, from the optional extension).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend, _checks, _ops
from . import reference as _reference

SIMILARITIES = ("cosine", "dot")


class HistaOutput(NamedTuple):
    """values[N] float32: the Hista estimate per token; lse[N] float32: logsumexp of its logits (-inf if no keys)."""

    values: Tensor
    lse: Tensor


_backend.register("hista_values", "reference", lambda: _reference.hista_values)
_backend.register("hista_values", "triton", lambda: importlib.import_module(".triton", __name__).hista_values)
_backend.register("hista_values", "cuda", lambda: importlib.import_module(".cuda", __name__).hista_values)
_backend.register("hista_values", "cpp", lambda: importlib.import_module(".cpp", __name__).hista_values)
# The backward (docs/DESIGN.md "Hista backward"): a forward on cpp/cuda is differentiated by the
# Triton kernel on CUDA and by the reference on CPU (`_backend.backward_backend`).
def _checked_backward(implementation):
    """The backward op's shape checks, before any backend indexes by them: the raw op
    (torch.ops.sveb.hista_values_backward) may be called directly with any tensors the schema admits."""
    def run(grad_values, grad_lse, hidden, returns, rollout_ids, group_offsets, values, lse, *options):
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [N, D], got shape {tuple(hidden.shape)}")
        n = hidden.shape[0]
        for name, t in (("grad_values", grad_values), ("grad_lse", grad_lse), ("returns", returns),
                        ("rollout_ids", rollout_ids), ("values", values), ("lse", lse)):
            if tuple(t.shape) != (n,):
                raise ValueError(f"{name} must have shape [N={n}], got {tuple(t.shape)}")
        for name, t in zip(("key_mask", "key_bias"), options[2:4]):
            if t is not None and tuple(t.shape) != (n,):
                raise ValueError(f"{name} must have shape [N={n}], got {tuple(t.shape)}")
        if group_offsets.dim() != 1 or group_offsets.numel() < 1:
            raise ValueError(f"group_offsets must be [G+1], got shape {tuple(group_offsets.shape)}")
        return implementation(grad_values, grad_lse, hidden, returns, rollout_ids, group_offsets, values, lse,
                              *options)
    return run


_backend.register("hista_values_backward", "reference", lambda: _checked_backward(_reference.hista_values_backward))
_backend.register("hista_values_backward", "triton", lambda: _checked_backward(
    importlib.import_module(".triton", __name__).hista_values_backward))


# The smallest temperature admitted: 1/temperature times the largest cosine factor 1/eps (1e6) must
# stay below the float32 maximum with room for rounding, so no cosine logit overflows to inf
# (docs/DESIGN.md, "Temperature range"). 1e-30 is far below any useful temperature.
MIN_TEMPERATURE = 1e-30


def check_arguments(hidden, returns, rollout_ids, *, temperature, similarity, key_mask, key_bias, empty_value,
                    validate) -> tuple[float, float]:
    """The argument checks of Hista, the one home that `hista_values`, `distributed.hista_values` and
    the estimators (through them) call: metadata always, the NaN/inf scans with validation.
    Returns the normalised (temperature, empty_value)."""
    _checks.tensor("hidden", hidden, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    n, d = hidden.shape
    device = hidden.device
    if d < 1:
        raise ValueError(f"hidden must have D >= 1 columns, got shape {tuple(hidden.shape)}")
    _checks.tensor("returns", returns, dtypes=_checks.FLOAT_DTYPES, shape=(n,), device=device)
    _checks.tensor("rollout_ids", rollout_ids, dtypes=(torch.int32, torch.int64), shape=(n,), device=device)
    temperature = _checks.finite_float("temperature", temperature, low=0.0, low_open=True)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be at least {MIN_TEMPERATURE:g} (1/temperature and the cosine norms "
                         f"are applied in float32), got {temperature}")
    _checks.choice("similarity", similarity, SIMILARITIES)
    if key_mask is not None:
        _checks.tensor("key_mask", key_mask, dtypes=(torch.bool,), shape=(n,), device=device)
    if key_bias is not None:
        _checks.tensor("key_bias", key_bias, dtypes=_checks.FLOAT_DTYPES, shape=(n,), device=device)
    empty_value = _checks.real("empty_value", empty_value)
    if _checks.validate_requested(validate):
        _checks.all_finite("hidden", hidden)
        _checks.all_finite("returns", returns)
        # -inf is a legitimate zero weight (like key_mask); NaN and +inf would poison whole rows.
        if key_bias is not None and bool((torch.isnan(key_bias) | (key_bias == float("inf"))).any()):
            raise ValueError("key_bias contains NaN or +inf")
    return temperature, empty_value


def hista_values(
    hidden: Tensor,
    returns: Tensor,
    rollout_ids: Tensor,
    group_offsets: Tensor,
    *,
    temperature: float = 0.1,
    similarity: str = "cosine",
    key_mask: Optional[Tensor] = None,
    key_bias: Optional[Tensor] = None,
    empty_value: float = 0.0,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> HistaOutput:
    """Hista state values of packed tokens (see the module docstring for the formula).

    Args:
        hidden: [N, D] bf16/fp16/fp32 (fp64 is accepted and computed in fp32) hidden states of the
            packed tokens; products accumulate in fp32.
        returns: [N] float, the return of each token's rollout (used as fp32).
        rollout_ids: [N] int32/int64, which rollout each token belongs to (only equality matters).
        group_offsets: [G+1] int64/int32, 0 = o_0 <= ... <= o_G = N; group g is tokens o_g..o_{g+1}-1.
        temperature: > 0, divides the similarity.
        similarity: "cosine" (norms in fp32, eps 1e-6) or "dot".
        key_mask: optional [N] bool; False removes the token from every key set.
        key_bias: optional [N] float, added to the logit of key j (e.g. -log len(rollout of j)).
        empty_value: the value of a token with no keys (single-rollout group, all keys masked).
        backend: "auto" (SVEB_BACKEND, else the fastest for the device), "reference", "triton", "cuda", "cpp".
        validate: also scan the tensors for NaN/inf (default: SVEB_VALIDATE=1).

    Returns:
        HistaOutput(values [N] float32, lse [N] float32). Both are differentiable with respect to
        `hidden` and `returns` (not the masks, temperature or key_bias): the backward recomputes the
        softmax weights from `lse`, in O(N*D) memory (docs/DESIGN.md "Hista backward"). Estimators
        that use the values as targets detach their inputs.
    """
    temperature, empty_value = check_arguments(hidden, returns, rollout_ids, temperature=temperature,
                                               similarity=similarity, key_mask=key_mask, key_bias=key_bias,
                                               empty_value=empty_value, validate=validate)
    device = hidden.device
    _checks.group_offsets("group_offsets", group_offsets, hidden.shape[0], device)
    backend = _backend.resolve("hista_values", backend, device)
    # Differentiable in hidden and returns (docs/CONTRACT.md §1, "Autograd"); key_bias is a constant
    # of the op, detached so that its graph is not kept alive for nothing.
    values, lse = _ops.hista_values(
        hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask,
        None if key_bias is None else key_bias.detach(), empty_value, backend,
    )
    return HistaOutput(values, lse)
