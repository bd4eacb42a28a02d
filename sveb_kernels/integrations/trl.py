"""`SvebGRPOTrainer`: `trl.GRPOTrainer` with token-level advantages from Hista, Numca or any value
estimator (docs/CONTRACT.md §5). Needs `pip install "sveb_kernels[trl]"` (trl >= 1.16; tested with 1.16, other versions warn).

    from sveb_kernels.integrations.trl import SvebGRPOTrainer
    trainer = SvebGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                              value_estimator="numca")          # or "hista", or fn(batch) -> [B, T]
    trainer.train()

GRPO gives every token of a completion the same advantage, (R - mean of the group) / std. Here
token t of a completion gets `A_t = R - V(s_t)` (or GAE over V with `gamma`, `lam`), where
V(s_t) is the estimator's value of the state *before* token t (prompt plus the completion's first
t tokens), computed over whole groups. Scaled as GRPO scales (the rule of
`sveb_kernels.estimators.advantages`): returns and values centred on the group's mean reward and
divided by TRL's reward std of the group (`scale_rewards="group"`) or batch (`"batch"`) + 1e-4, or
not divided (`"none"`), or whitened over the tokens (`whiten_advantages=True`); a group whose
rewards are all equal (an eval group of one generation too) gets 0, as GRPO gives it. With the
`"group_mean"` estimator this is exactly GRPO.

The estimator sees a `sveb_kernels.estimators.RolloutBatch` of the whole generation batch (all
processes): `token_ids` [B, C + 1] = the last prompt token then the completion; `response_mask`
the completion tokens; `state_mask` the cells 0..C-1 of each completion's tokens, cell t standing
for the state before completion token t; `group_index` the prompt; `returns` the summed weighted
rewards. It returns values [B, C + 1]; value t of a completion is the value at cell t. The same
estimator objects are what `sveb-kernels sveb eval` scores.

Hidden states (Hista, or an estimator with `needs_hidden = True`): `hidden_states[hidden_layer]`
(0 the embeddings, -1 the last, after the final norm; found by `sveb_kernels.integrations._layers`,
the resolver the verl plugin uses too), at the position before each real completion token (not
tool output), copied out by a hook during the no-grad forward TRL already runs for the old
log-probs when it runs one; otherwise TRL's own `_get_per_token_logps_and_entropies` is run once
more, as TRL runs it (wrapped model, autocast, chunks, multimodal inputs). `output_hidden_states`
is never used.

Checkpoints: an estimator with `state_dict()` / `load_state_dict()` is saved as
`sveb_estimator.pt` in each checkpoint folder and restored by `train(resume_from_checkpoint=...)`.

Groups that span processes (TRL spreads a prompt's generations over processes): the built-in
estimators (numca, hista, group_mean, rloo) value each process's own rows with
`sveb_kernels.distributed` (Hista regroups tokens with all_to_all, Numca exchanges milestone keys;
no process receives all hidden states), through a `Shard` batch. A callable gets the whole
generation batch: token ids, masks and, when it reads them, the hidden states at the state cells
are gathered. Values are then gathered ([B, C] floats) so scaling, whitening and logging see the
whole batch, and each process keeps its rows.

Logged: TRL's per-completion `advantages` (the completions table) become the mean token
advantage of each completion, with the token-level numbers in the extra columns
`sveb_token_advantages` and `sveb_token_values`; metrics `sveb/value/*`, `sveb/advantage/*`
(mean, std, min, max, within-completion std) and `sveb/estimate_seconds`.

TRL internals relied on (trl 1.16; every one is exercised by tests/test_integration_trl.py):
`GRPOTrainer._generate_and_score_completions` (overridden; its output keys `prompt_ids`,
`prompt_mask`, `completion_ids`, `completion_mask`, `tool_mask`, the multimodal inputs of
`FORWARD_KEYS`; its `advantages` entry replaced by a [B, T] tensor, which `_compute_loss` accepts),
`_calculate_rewards` (overridden to keep all processes' rewards per function),
`_get_per_token_logps_and_entropies` (overridden to hook its first no-grad policy forward; called
for the fallback forward), `trl.trainer.grpo_trainer.disable_gradient_checkpointing`,
`trl.trainer.utils.nanstd`, the attributes `reward_weights`, `num_generations(_eval)`,
`scale_rewards`, `multi_objective_aggregation`, `use_vllm`, `vllm_importance_sampling_correction`,
`num_iterations`, `_logs`, `_metrics`, `_tokenizer`, and the rule deciding when TRL computes old
log-probs (`gradient_accumulation_steps % (steps_per_generation * num_iterations)`, or vLLM
importance sampling).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

try:
    import trl
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('sveb_kernels.integrations.trl needs TRL: pip install "sveb_kernels[trl]"') from e

from ..estimators import (
    ADVANTAGE_MODES,
    Estimator,
    GroupMean,
    Hista,
    LeaveOneOutMean,
    LinearCritic,
    Numca,
    RolloutBatch,
    Shard,
    advantages_from_values,
    make_estimator,
)
from ..estimators.advantages import group_scale
from ._layers import HiddenLayer, resolve_layer

__all__ = ["SvebGRPOTrainer", "TESTED_TRL", "resolve_layer"]

# The entries of `_generate_and_score_completions`' output that TRL passes to its own policy forward
# (multimodal inputs); the fallback forward passes them the same way.
FORWARD_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images", "num_tiles")

TESTED_TRL = (">=1.16", "<1.17")
# estimators that value a process's rows of a sharded batch through sveb_kernels.distributed
SHARDABLE = (GroupMean, LeaveOneOutMean, Numca, Hista)


def _check_trl_version() -> None:
    parts = trl.__version__.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # pragma: no cover - unusual version strings
        return
    if (major, minor) != (1, 16):
        import warnings

        warnings.warn(f"SvebGRPOTrainer is tested with trl {','.join(TESTED_TRL)}, found {trl.__version__}; it relies "
                      f"on GRPOTrainer internals (see sveb_kernels.integrations.trl)", stacklevel=3)


class SvebGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` (same arguments) with token-level advantages from a value estimator.

    Keyword arguments beyond GRPOTrainer's:
        value_estimator: "numca" (default), "hista", "group_mean", "rloo", a
            `sveb_kernels.estimators.Estimator`, or a callable fn(batch) -> values [B, T]
            (see the module docstring for the batch).
        advantage_mode: "r_minus_v" (A_t = R - V(s_t)) or "gae" (`sveb_kernels.gae` over V).
        gamma, lam: GAE's discount and lambda (mode "gae"; 1, 1 equals "r_minus_v").
        whiten_advantages: whiten the token advantages over the batch instead of TRL's
            `scale_rewards` division.
        hidden_layer: the layer Hista reads (`hidden_states` index; -1 the last).
        hista_temperature, hista_similarity: Hista's options (docs/CONTRACT.md §1).
        numca_match, numca_leave_one_out, numca_min_support: Numca's options (docs/CONTRACT.md §2).
        numeric_vocab: a `sveb_kernels.NumericVocab` for Numca (default: built from the tokenizer).
        estimator_backend: the ops' backend ("auto").
    """

    def __init__(self, *args, value_estimator="numca", advantage_mode: str = "r_minus_v", gamma: float = 1.0,
                 lam: float = 1.0, whiten_advantages: bool = False, hidden_layer: int = -1,
                 hista_temperature: float = 0.1, hista_similarity: str = "cosine", numca_match: str = "last",
                 numca_leave_one_out: bool = True, numca_min_support: int = 1, numeric_vocab=None,
                 estimator_backend: str = "auto", **kwargs):
        _check_trl_version()
        if advantage_mode not in ADVANTAGE_MODES:
            raise ValueError(f"advantage_mode must be one of {ADVANTAGE_MODES}, got {advantage_mode!r}")
        for name, value in (("gamma", gamma), ("lam", lam)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        named = value_estimator if isinstance(value_estimator, str) else None
        if named == "numca":
            estimator = Numca(numca_match, leave_one_out=numca_leave_one_out, min_support=numca_min_support,
                              vocab=numeric_vocab, backend=estimator_backend)
        elif named == "hista":
            estimator = Hista(hista_similarity, hista_temperature, backend=estimator_backend)
        else:
            estimator = make_estimator(value_estimator)
        super().__init__(*args, **kwargs)
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("SvebGRPOTrainer needs multi_objective_aggregation='sum_then_normalize' (the return R "
                             f"is the weighted sum of the rewards), got {self.multi_objective_aggregation!r}")
        if isinstance(estimator, Numca) and estimator.tokenizer is None:
            estimator.tokenizer = self._tokenizer
        self.value_estimator: Estimator = estimator
        self.advantage_mode = advantage_mode
        self.gamma, self.lam = float(gamma), float(lam)
        self.whiten_advantages = bool(whiten_advantages)
        self.estimator_backend = estimator_backend
        self._sveb_needs_hidden = isinstance(estimator, (Hista, LinearCritic)) or bool(
            getattr(estimator, "needs_hidden", False) or getattr(value_estimator, "needs_hidden", False))
        self._sveb_hidden_layer = hidden_layer
        self._sveb_layer_module: Optional[HiddenLayer] = None
        if self._sveb_needs_hidden:  # a bad hidden_layer fails here, not at the first step
            self._sveb_layer_module = resolve_layer(self.accelerator.unwrap_model(self.model), hidden_layer)
        self._sveb_rewards_per_func: Optional[Tensor] = None
        self._sveb_capture: Optional[_StateCapture] = None
        self.sveb_last: Optional[SimpleNamespace] = None  # the last batch's estimate, for inspection and tests

    @property
    def _sveb_layer(self) -> HiddenLayer:
        """Where the hidden states the estimator reads are hooked (`sveb_kernels.integrations._layers`)."""
        if self._sveb_layer_module is None:
            self._sveb_layer_module = resolve_layer(self.accelerator.unwrap_model(self.model), self._sveb_hidden_layer)
        return self._sveb_layer_module

    # -- checkpoints: a stateful estimator (one with state_dict/load_state_dict) resumes with the run

    ESTIMATOR_STATE_FILE = "sveb_estimator.pt"

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        estimator = self.value_estimator
        if not callable(getattr(estimator, "state_dict", None)) or not self.args.should_save:
            return
        import os

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        # the folder TRL's and transformers' own _save_checkpoint just wrote
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        torch.save(estimator.state_dict(), os.path.join(folder, self.ESTIMATOR_STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        # transformers calls this on every resume, with the resolved checkpoint folder (TRL restores
        # its own adaptive-entropy state here too)
        super()._load_optimizer_and_scheduler(checkpoint)
        estimator = self.value_estimator
        if checkpoint is None or not callable(getattr(estimator, "load_state_dict", None)):
            return
        import os
        import warnings

        path = os.path.join(checkpoint, self.ESTIMATOR_STATE_FILE)
        if not os.path.exists(path):
            warnings.warn(f"{checkpoint} has no {self.ESTIMATOR_STATE_FILE}: the value estimator "
                          f"{estimator.name!r} starts from its initial state", RuntimeWarning, stacklevel=2)
            return
        estimator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # -- what TRL computes on the way ---------------------------------------------------------------

    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._sveb_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _trl_runs_policy_forward(self) -> bool:
        """Whether `_generate_and_score_completions` runs its no-grad policy forward (old log-probs)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return bool(self.args.gradient_accumulation_steps % generate_every != 0
                    or (self.use_vllm and self.vllm_importance_sampling_correction))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        capture = self._sveb_capture
        if capture is None or model is not self.model or torch.is_grad_enabled():
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        self._sveb_capture = None  # only the first no-grad policy forward: the old log-probs
        # TRL's attention mask is [prompt_mask | completion_mask]: its last C columns say which
        # completion positions are real, so the hook copies out only their states.
        capture.start(attention_mask[:, -logits_to_keep:].to(torch.bool))
        handle = self._sveb_layer.hook(capture)
        try:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        finally:
            handle.remove()

    def _hidden_by_forward(self, output: dict) -> Tensor:
        """When TRL ran no policy forward: one, exactly as TRL runs its own old-log-prob forward (the
        wrapped model, under the accelerator's autocast, in TRL's chunks, with the batch's multimodal
        inputs), through `_get_per_token_logps_and_entropies` with the hook. Returns the states before
        the real completion tokens, [n, D] in row-major order."""
        from trl.trainer.grpo_trainer import disable_gradient_checkpointing

        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        step = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        forward_kwargs = {k: output[k] for k in FORWARD_KEYS if k in output}
        capture = _StateCapture()
        self._sveb_capture = capture
        try:
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                self._get_per_token_logps_and_entropies(self.model, ids, attention, output["completion_ids"].shape[1],
                                                        batch_size=step, **forward_kwargs)
        finally:
            self._sveb_capture = None
        return capture.states()

    # -- token-level advantages ---------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        self._sveb_rewards_per_func = None
        captured = _StateCapture() if self._sveb_needs_hidden and self._trl_runs_policy_forward() else None
        self._sveb_capture = captured
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._sveb_capture = None
        if self._sveb_rewards_per_func is None:
            raise RuntimeError("SvebGRPOTrainer did not see the rewards: GRPOTrainer._calculate_rewards was not called "
                               f"(trl {trl.__version__} is not a tested version)")
        if captured is not None and not captured.started:  # TRL did not run the forward after all
            captured = None
        output["advantages"] = self._token_advantages(output, captured, mode)
        return output

    def _gather_padded(self, x: Tensor, pad) -> Tensor:
        if self.accelerator.num_processes == 1:
            return x
        return self.accelerator.gather(self.accelerator.pad_across_processes(x, dim=1, pad_index=pad))

    def _token_advantages(self, output: dict, captured: Optional["_StateCapture"], mode: str) -> Tensor:
        started = time.perf_counter()
        device = self.accelerator.device
        prompt_ids = output["prompt_ids"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        local_rows, local_length = completion_ids.shape
        pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0

        rewards_per_func = self._sveb_rewards_per_func.to(device)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(device)[None, :]).nansum(dim=1)
        rewards[unscorable] = torch.nan
        generations = self.num_generations if mode == "train" else self.num_generations_eval
        total_rows = rewards.numel()
        if total_rows % generations:
            raise RuntimeError(f"{total_rows} completions do not split into groups of {generations}")
        group_index = torch.arange(total_rows, device=device) // generations
        grouped = rewards.view(-1, generations)
        group_mean = torch.nan_to_num(torch.nanmean(grouped, dim=1), nan=0.0)
        # An unscorable completion (every reward function returned None) stands at its group's mean
        # so it moves no peer's value; TRL gives it advantage 0, and so do we below.
        returns = torch.where(torch.isnan(rewards), group_mean.repeat_interleave(generations), rewards)

        # cells: [last prompt token | completion]; state cell t = before completion token t. Tool
        # output (TRL's `tool_mask` 0) is not the policy's: no query, key or milestone, advantage 0.
        real = completion_mask.to(torch.bool)
        tool_mask = output.get("tool_mask")
        valid = real if tool_mask is None else real & tool_mask.to(torch.bool)
        no = torch.zeros(local_rows, 1, dtype=torch.bool, device=device)
        local_ids = torch.cat([prompt_ids[:, -1:], completion_ids], dim=1)
        local_response, local_states = torch.cat([no, valid], dim=1), torch.cat([valid, no], dim=1)
        first = self.accelerator.process_index * local_rows

        def states_before_tokens() -> Tensor:  # [n, D]: this process's `valid` cells, row-major
            rows = captured.states() if captured is not None else self._hidden_by_forward(output)
            return rows if tool_mask is None else rows[valid[real]]  # the hook kept every real token

        def packed(batch: RolloutBatch, rows: Tensor) -> Tensor:
            """Row-major states of the batch's state cells -> the batch's packing order."""
            rank = batch.state_mask.flatten().cumsum(0) - 1
            return rows[rank[batch.packing.token_index.to(rank.device)].to(rows.device)]

        def gathered_states(batch: RolloutBatch) -> Tensor:  # all processes' states (callables only)
            rows = states_before_tokens()
            if self.accelerator.num_processes == 1:
                return packed(batch, rows)
            dense = rows.new_zeros(local_rows, local_length + 1, rows.shape[-1])
            dense[local_states] = rows
            everything = self._gather_padded(dense, 0.0)
            return batch.packing.pack(everything[:, :batch.shape[1]])

        if self.accelerator.num_processes > 1 and isinstance(self.value_estimator, SHARDABLE):
            # Each process values its own rows; the estimator's collectives keep groups whole.
            shard = Shard(row_ids=torch.arange(first, first + local_rows, device=device), all_returns=returns,
                          all_group_index=group_index)
            batch = RolloutBatch(local_ids, local_response, group_index[first:first + local_rows],
                                 returns[first:first + local_rows], state_mask=local_states,
                                 tokenizer=self._tokenizer, device=device, shard=shard,
                                 hidden_fn=lambda b: packed(b, states_before_tokens()))
            cell_values = self._estimate(batch)
            local_values = cell_values[:, :local_length].masked_fill(~valid, 0.0)
            values = self._gather_padded(local_values, 0.0)
            token_ids = self._gather_padded(local_ids, pad_id)
            token_mask = self._gather_padded(valid, False)
        else:
            # The whole generation batch on every process (gathered when there are several).
            token_ids = self._gather_padded(local_ids, pad_id)
            state_mask = self._gather_padded(local_states, False)
            batch = RolloutBatch(token_ids, self._gather_padded(local_response, False), group_index, returns,
                                 state_mask=state_mask, tokenizer=self._tokenizer, device=device,
                                 hidden_fn=gathered_states)
            length = token_ids.shape[1] - 1
            token_mask = state_mask[:, :length]
            values = self._estimate(batch)[:, :length].masked_fill(~token_mask, 0.0)
        # The scaling rule (sveb_kernels.estimators.advantages): TRL's group baseline and
        # `scale_rewards` std (+1e-4) applied to returns and values before the advantages; groups
        # with all-equal rewards (and eval groups of one generation) and unscorable completions
        # (NaN reward) get 0, as GRPO gives them.
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'batch', 'group' or 'none', got {self.scale_rewards!r}")
        scaling = group_scale(rewards, group_index, scale=self.scale_rewards, eps=1e-4, lone_rollout="no_signal")
        # TRL's own float32 statistics (so the group_mean estimator is TRL's GRPO to the bit); which
        # rollouts have signal is the rule's.
        std = self._reward_std(rewards, generations)
        scaling = scaling._replace(center=torch.nanmean(grouped, dim=1).repeat_interleave(generations),
                                   divisor=std + 1e-4 if self.scale_rewards != "none" else torch.ones_like(std))
        advantages = advantages_from_values(values, rewards, token_mask, mode=self.advantage_mode, gamma=self.gamma,
                                            lam=self.lam, whiten=self.whiten_advantages, scaling=scaling,
                                            backend=self.estimator_backend)

        self._log_token_level(mode, values, advantages, token_mask, time.perf_counter() - started)
        self.sveb_last = SimpleNamespace(batch=batch, token_ids=token_ids, values=values, advantages=advantages,
                                         returns=returns, rewards=rewards, token_mask=token_mask)
        return advantages[first:first + local_rows, :local_length].contiguous()

    def _estimate(self, batch: RolloutBatch) -> Tensor:
        values = self.value_estimator.estimate(batch)
        return batch.check_values(values, f"value estimator {self.value_estimator.name!r}").to(self.accelerator.device)

    def _reward_std(self, rewards: Tensor, generations: int) -> Tensor:
        """GRPO's std of the rewards, as TRL computes it: per group (`scale_rewards="group"`) or of
        the batch; 0 where it is undefined (a group or batch of one)."""
        from trl.trainer.utils import nanstd

        if self.scale_rewards == "batch":
            return nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        if generations < 2:
            return torch.zeros_like(rewards)
        return nanstd(rewards.view(-1, generations), dim=1).repeat_interleave(generations)

    def _log_token_level(self, mode: str, values: Tensor, advantages: Tensor, mask: Tensor, seconds: float) -> None:
        metrics = self._metrics[mode]
        count = mask.sum(dim=1)
        has = count > 0
        for name, x in (("value", values), ("advantage", advantages)):
            sel = x[mask].double()
            if sel.numel():
                metrics[f"sveb/{name}/mean"].append(sel.mean().item())
                metrics[f"sveb/{name}/std"].append(sel.std().item() if sel.numel() > 1 else 0.0)
                metrics[f"sveb/{name}/min"].append(sel.min().item())
                metrics[f"sveb/{name}/max"].append(sel.max().item())
            # spread of the values along one completion: 0 for GRPO's constant advantages
            xd = x.double() * mask
            mean = xd.sum(dim=1) / count.clamp_min(1)
            var = ((xd - mean[:, None]) ** 2 * mask).sum(dim=1) / count.clamp_min(1)
            if bool(has.any()):
                metrics[f"sveb/{name}/within_completion_std"].append(var[has].sqrt().mean().item())
        metrics["sveb/estimate_seconds"].append(seconds)

        # the completions table: TRL's per-completion advantage -> the mean token advantage, plus
        # the token-level numbers as extra columns
        rows = advantages.shape[0]
        mean_advantage = ((advantages.double() * mask).sum(dim=1) / count.clamp_min(1)).tolist()
        logged = self._logs["advantages"]
        keep = min(len(logged), rows)
        for _ in range(keep):
            logged.pop()
        logged.extend(mean_advantage[rows - keep:])
        for column, x in (("sveb_token_advantages", advantages), ("sveb_token_values", values)):
            self._logs["extra"][column].extend(
                " ".join(f"{v:.3g}" for v in x[b][mask[b]].tolist()) for b in range(rows))


class _StateCapture:
    """Called by the layer hook with each forward chunk's layer output [rows, P + C, D]: keeps a
    copy of only the states before the chunk's real completion tokens (position P - 1 + t for
    completion token t), so the layer's whole output (prompt positions, padding) is freed with
    the forward. TRL runs its forward in chunks of rows, in order."""

    def __init__(self):
        self.mask: Optional[Tensor] = None
        self.rows: list = []
        self.offset = 0

    @property
    def started(self) -> bool:
        return self.mask is not None

    def start(self, completion_mask: Tensor) -> None:
        self.mask, self.rows, self.offset = completion_mask, [], 0

    def __call__(self, hidden: Tensor) -> None:
        length = self.mask.shape[1]
        chunk = self.mask[self.offset:self.offset + hidden.shape[0]]
        self.offset += hidden.shape[0]
        # boolean indexing copies: the kept rows own their memory, the layer output is not referenced
        self.rows.append(hidden[:, -(length + 1):-1][chunk.to(hidden.device)].detach())

    def states(self) -> Tensor:
        if self.offset != self.mask.shape[0]:
            raise RuntimeError(f"the hidden-state hook saw {self.offset} rows of a {self.mask.shape[0]}-row batch")
        return torch.cat(self.rows, dim=0)
