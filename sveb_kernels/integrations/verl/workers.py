"""The actor-worker side of the plugin: Hista values computed in verl's old-log-prob forward (a hook
on the chosen layer of the FSDP engine's model; the hidden states never leave the workers), and the
two worker-side wraps (see `patching.TOUCHPOINTS`). Each wrapper reads only the arguments it needs,
by name, and passes verl's call on unchanged."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from ... import _checks
from ...estimators import Hista, RolloutBatch
from ...packing import Packing
from .._layers import resolve_layer
from .driver import _bound, _required, group_index_from_uid, unavailable
from .options import Options, options_from_request

FSDP_CLASS, FSDP_METHOD = "FSDPEngineWithLMHead", "prepare_model_outputs"


class HiddenStateCapture:
    """Records, during a forward pass, exactly the tensor `output_hidden_states=True` would return at
    index `layer` (0 = embeddings, i = after decoder layer i, -1/L = after the final norm), by a
    hook at the place `sveb_kernels.integrations._layers` resolves (the one resolver both
    integrations use), so the other layers' states are never kept.

        with HiddenStateCapture(model, layer=-1) as capture:
            model(input_ids=..., attention_mask=...)
        hidden = capture.hidden          # [B, L, D] (or [1, nnz, D] for verl's packed forward)

    The hook keeps a reference to the activation the model computes anyway: no copy; the engine
    wrap copies each micro-batch's response rows out and drops the reference (`hidden = None`).
    """

    def __init__(self, model, layer: int = -1):
        self.site = resolve_layer(model, layer, name="layer")
        self.module = self.site.module
        self.hidden: Optional[Tensor] = None
        self._handle = None

    def _hook(self, hidden: Tensor) -> None:
        self.hidden = hidden

    def __enter__(self) -> "HiddenStateCapture":
        self.hidden = None
        self._handle = self.site.hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def response_hidden_states(hidden: Tensor, response_length: int) -> Tensor:
    """Padded layout (verl's `input_ids` = left-padded prompt + right-padded response of length T):
    [B, P+T, D] -> [B, T, D], row t being the state before response token t (position P+t-1, the
    one whose logits give that token's log-prob)."""
    _checks.tensor("hidden", hidden, ndim=3)
    if not 1 <= response_length < hidden.shape[1]:
        raise ValueError(f"response_length must be in [1, {hidden.shape[1] - 1}], got {response_length}")
    return hidden[:, -response_length - 1 : -1]


def packed_response_hidden_states(hidden: Tensor, cu_seqlens: Tensor, response_lengths: Tensor) -> Tensor:
    """Packed layout (verl's remove-padding forward: [1, nnz, D] or [nnz, D], sequence i holding its
    prompt then its `response_lengths[i]` response tokens at cu_seqlens[i] .. cu_seqlens[i+1]-1)
    -> [sum(response_lengths), D]: for each sequence in order, the states before its response tokens."""
    if hidden.dim() == 3 and hidden.shape[0] == 1:
        hidden = hidden[0]
    _checks.tensor("hidden", hidden, ndim=2)
    _checks.tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=_checks.INT_DTYPES)
    _checks.tensor("response_lengths", response_lengths, dtypes=_checks.INT_DTYPES, shape=(cu_seqlens.numel() - 1,))
    ends = cu_seqlens[1:].to(torch.int64).cpu()
    lengths = response_lengths.to(torch.int64).cpu()
    if bool((lengths < 0).any()) or bool((lengths >= ends - cu_seqlens[:-1].to(torch.int64).cpu()).any()):
        raise ValueError("response_lengths must be >= 0 and shorter than each sequence (a prompt token precedes them)")
    starts = ends - lengths - 1
    offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    index = torch.repeat_interleave(starts, lengths) + offsets
    return hidden[index.to(hidden.device)]


def hista_values_for_rollouts(hidden: Tensor, scores: Tensor, response_mask: Tensor, uid,
                              options: Optional[Options] = None) -> Tensor:
    """[B, T] float32 Hista values of the states before each response token, computed where the
    hidden states are (an actor worker), for whole groups: every rollout of a prompt must be in this
    call (keep uid groups on one rank, or use `sveb_kernels.distributed`).

    Args:
        hidden: [B, T, D] the state before each response token (`response_hidden_states`).
        scores: [B] each rollout's return (its summed token-level reward).
        response_mask: [B, T] the response tokens (0 at padding and masked observation tokens).
        uid: [B] prompt ids (verl's `non_tensor_batch["uid"]`) or an integer group index tensor.
    """
    options = options or Options()
    _checks.tensor("hidden", hidden, ndim=3)
    mask = response_mask.to(torch.bool)
    _checks.tensor("response_mask", mask, shape=tuple(hidden.shape[:2]))
    group_index = uid if isinstance(uid, Tensor) else group_index_from_uid(uid)
    device = hidden.device
    mask, group_index = mask.to(device), group_index.to(device)
    # Only the state cells (response tokens) are packed: [N, D], the one copy Hista reads.
    packed = Packing.from_padded(mask, group_index).pack(hidden.detach())
    rollouts = RolloutBatch(torch.zeros(mask.shape, dtype=torch.int64, device=device), mask, group_index,
                            scores.detach().to(device), hidden=packed)
    hista = Hista(options.hista.similarity, options.hista.temperature, backend=options.backend)
    return hista.estimate(rollouts).masked_fill(~mask, 0.0)


# The driver asks for Hista values by one non-tensor entry of the actor's log-prob batch (verl passes
# a KVBatchMeta's `extra_info` to the workers as non-tensor data); its value is the plain options dict.
HISTA_REQUEST_KEY = "sveb_hista"
# The response states travel between the two worker-side wrappers inside the engine's own
# model_output, so verl's micro-batch concatenation and dynamic-batch reordering apply to them too.
HIDDEN_KEY = "sveb_hidden"
VALUES_KEY = "values"


def _non_tensor(data, key, default=None):
    """A non-tensor entry of verl's TensorDict (`tu.get_non_tensor_data` without importing verl)."""
    if key not in data.keys():
        return default
    value = data[key]
    return getattr(value, "data", value)


def _stable_group_ids(uid) -> Tensor:
    """Prompt ids -> int64 ids that agree on every rank (a 63-bit hash of the uid's text; numpy's
    `unique` indices would differ from rank to rank)."""
    import hashlib

    return torch.tensor([int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little") >> 1
                         for u in uid], dtype=torch.int64)


def _per_row(x, rows: int, name: str) -> Tensor:
    """A verl field that is per response token (nested [b, r_i] or padded [b, T]) -> its row sums [b]."""
    if x.is_nested:
        return torch.stack([t.sum() for t in x.unbind()]) if rows else torch.zeros(0)
    if x.dim() == 1:
        return x
    if x.dim() != 2 or x.shape[0] != rows:
        raise ValueError(f"{name} must be [B] or [B, T] for B={rows} rollouts, got shape {tuple(x.shape)}")
    return x.sum(dim=-1)


def _uid_list(data) -> list:
    if "uid" not in data.keys():
        raise ValueError("sveb_hista needs the rollouts' `uid` (the prompt id of each rollout) in the log-prob batch")
    uid = data["uid"]
    uid = uid.tolist() if hasattr(uid, "tolist") else list(getattr(uid, "data", uid))
    return [u.item() if isinstance(u, Tensor) else u for u in uid]


def hista_values_on_worker(states, scores: Tensor, uid, options: Options, *, masks=None, group=None) -> list:
    """Hista values of one worker's rollouts, each a [r_i] float32 tensor (r_i = its response length).

    `states[i]` is [r_i, D], the state before each of rollout i's response tokens; `scores[i]` its
    return; `uid[i]` its prompt id; `masks[i]` ([r_i], optional) its response mask: tokens outside it
    (a multi-turn response's tool output) are neither queries nor keys and get 0. With `group` (a
    torch.distributed process group of more than one rank: the actor's data-parallel group) the
    values are those of all ranks' rollouts together, by `sveb_kernels.distributed.hista_values`, so
    a prompt's rollouts may be spread over ranks; without it every rollout of a prompt must be in
    this call.
    """
    rows = len(states)
    if scores.shape != (rows,) or len(uid) != rows or (masks is not None and len(masks) != rows):
        raise ValueError(f"scores, uid and masks must have one entry per rollout ({rows}), got "
                         f"{tuple(scores.shape)}, {len(uid)} and {None if masks is None else len(masks)}")
    if masks is not None:
        masks = [m.to(device=s.device, dtype=torch.bool) for s, m in zip(states, masks)]
        if any(m.shape != s.shape[:1] for s, m in zip(states, masks)):
            raise ValueError("masks[i] must be [r_i], one entry per response state of rollout i")
        values = hista_values_on_worker([s[m] for s, m in zip(states, masks)], scores, uid, options, group=group)
        return [torch.zeros(m.shape, dtype=v.dtype, device=v.device).masked_scatter_(m, v)
                for m, v in zip(masks, values)]
    lengths = torch.tensor([s.shape[0] for s in states], dtype=torch.int64)
    distributed = group is not None and torch.distributed.get_world_size(group) > 1
    if rows == 0 and not distributed:
        return []
    device = states[0].device if rows else torch.device("cpu")
    if distributed:
        order = torch.arange(rows)
        group_ids = _stable_group_ids(uid)
    else:
        # The single-process op wants each group's tokens contiguous.
        group_ids = group_index_from_uid(uid)
        order = torch.argsort(group_ids, stable=True)
    # Only the response states, packed once: [N, D], the one copy Hista reads.
    hidden = torch.cat([states[i] for i in order.tolist()]).detach() if rows else torch.zeros(0, 1, device=device)
    row = torch.repeat_interleave(order, lengths[order]).to(device)
    returns = scores.to(device=device, dtype=torch.float32)[row]
    temperature = float(options.hista.temperature)
    if options.hista.similarity == "dot":
        # As the Hista estimator does: in units of the mean squared norm of the states (all ranks').
        total = torch.stack([hidden.float().pow(2).sum(), torch.tensor(float(hidden.shape[0]), device=device)])
        if distributed:
            torch.distributed.all_reduce(total, group=group)
        temperature *= max(float(total[0] / total[1].clamp_min(1)), 1e-12)
    if not distributed:
        from ... import hista_values

        counts = torch.bincount(group_ids, weights=lengths.double()).to(torch.int64)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
        out = hista_values(hidden, returns, row.to(torch.int32), offsets, temperature=temperature,
                           similarity=options.hista.similarity, backend=options.backend)
        per_row = dict(zip(order.tolist(), out.values.split(lengths[order].tolist())))
        return [per_row[i] for i in range(rows)]
    from ... import distributed as sveb_distributed

    rollout_ids = row + (torch.distributed.get_rank(group) << 32)  # global: ranks never share a rollout
    out = sveb_distributed.hista_values(hidden, returns, rollout_ids, group_ids.to(device)[row], group=group,
                                        temperature=temperature, similarity=options.hista.similarity,
                                        backend=options.backend)
    return list(out.values.split(lengths.tolist()))


def _response_lengths(micro_batch) -> Tensor:
    mask = micro_batch["response_mask"] if "response_mask" in micro_batch.keys() else None
    if mask is None:
        raise ValueError("sveb_hista needs the rollouts' `response_mask` in the log-prob batch")
    if mask.is_nested:
        return mask.offsets().diff()
    return torch.full((mask.shape[0],), mask.shape[1], dtype=torch.int64)


def wrap_prepare_model_outputs(original: Callable) -> Callable:
    """verl's FSDP `prepare_model_outputs`, adding the response states of the micro-batch (nested
    [b, r_i, D], row t = the state before response token t) while a capture is active."""

    @functools.wraps(original)
    def prepare_model_outputs(*args, **kwargs):
        model_output = original(*args, **kwargs)
        call = _bound(original, args, kwargs)
        self = call["self"]
        capture = getattr(self, "_sveb_capture", None)
        if capture is not None:
            model_output[HIDDEN_KEY] = micro_batch_response_states(self, capture.hidden, call["output_args"],
                                                                   call["micro_batch"])
            capture.hidden = None  # the layer's full output is free once its response rows are copied
        return model_output

    prepare_model_outputs.__sveb_original__ = original
    return prepare_model_outputs


def micro_batch_response_states(engine, hidden: Tensor, output_args, micro_batch) -> Tensor:
    """The captured layer output of one micro-batch, in verl's forward layout, -> nested [b, r_i, D]."""
    if hidden is None:
        raise RuntimeError("sveb_hista: the hidden-state hook did not fire in this micro-batch's forward")
    input_ids = micro_batch["input_ids"]
    if not input_ids.is_nested:
        raise ValueError("sveb_hista supports verl's no-padding (nested) batches only")
    cu_seqlens = input_ids.offsets()
    use_remove_padding = _non_tensor(micro_batch, "use_remove_padding", True)
    if use_remove_padding:
        # [1, nnz/sp + pad, D]: gathered over the Ulysses group and unpadded exactly as the log-probs are.
        packed = engine._gather_and_unpad_packed(hidden.squeeze(0), output_args["pad_size"])
    else:
        # [b, L, D], each sequence from position 0: keep its first len_i rows.
        seq_lengths = cu_seqlens.diff().to(hidden.device)
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < seq_lengths[:, None]
        packed = hidden[keep]
    lengths = _response_lengths(micro_batch).to(cu_seqlens.device)
    states = packed_response_hidden_states(packed, cu_seqlens, lengths)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(states.device)
    return torch.nested.nested_tensor_from_jagged(states, offsets)


def wrap_engine_infer_batch(original: Callable) -> Callable:
    """verl's `BaseEngine.infer_batch`; when the batch asks for Hista, the chosen layer is captured in
    every micro-batch's forward and the values of the rollouts' response states are returned as the
    model output `values` (nested [b, r_i] float32, in the batch's order), which the actor worker
    stores in verl's TransferQueue next to the log-probs."""

    @functools.wraps(original)
    def infer_batch(*args, **kwargs):
        call = _bound(original, args, kwargs)
        self, data = call["self"], call["data"]
        request = _non_tensor(data, HISTA_REQUEST_KEY)
        if request is None:
            return original(*args, **kwargs)
        options = options_from_request(request)
        if getattr(type(self), FSDP_METHOD, None) is None or not hasattr(
                getattr(type(self), FSDP_METHOD), "__sveb_original__"):
            reason = unavailable("sveb_hista")
            raise RuntimeError(
                f"sveb_hista computes values in the actor's log-prob forward, which the plugin supports for "
                f"verl's FSDP engine ({FSDP_CLASS}); this actor runs {type(self).__name__}"
                + (f" ({reason})" if reason else ""))
        capture = HiddenStateCapture(self.module, options.hista.layer)
        self._sveb_capture = capture
        try:
            with capture:
                output = original(*args, **kwargs)
        finally:
            self._sveb_capture = None
        if output is None:  # not a rank that returns outputs (verl's model-parallel ranks)
            return output
        model_output = output["model_output"]
        if HIDDEN_KEY not in model_output:
            raise RuntimeError(f"sveb_hista: {type(self).__name__}'s forward did not pass through the patched "
                               f"{FSDP_CLASS}.{FSDP_METHOD}, so no hidden states were collected")
        states = model_output.pop(HIDDEN_KEY).unbind()
        scores = _per_row(_required(data, "rm_scores", "sveb_hista"), len(states), "rm_scores")
        masks = _required(data, "response_mask", "sveb_hista")
        masks = masks.unbind() if masks.is_nested else list(masks)
        values = hista_values_on_worker(states, scores, _uid_list(data), options, masks=masks,
                                        group=self.get_data_parallel_group())
        model_output[VALUES_KEY] = torch.nested.as_nested_tensor(
            [v.float() for v in values], layout=torch.jagged) if values else model_output.get(VALUES_KEY)
        return output

    infer_batch.__sveb_original__ = original
    return infer_batch
