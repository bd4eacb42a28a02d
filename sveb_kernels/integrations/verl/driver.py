"""The driver side of the plugin: what verl's `compute_advantage` runs for the sveb names, Numca on
the driver (the function-level path and verl v1's TransferQueue path), and the driver-side wraps
(see `patching.TOUCHPOINTS`). Each wrapper reads only the arguments it needs, by name, from the
call verl makes, and passes the call on unchanged (`*args, **kwargs`), so a verl that adds a
parameter keeps working."""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ...estimators import Numca, RolloutBatch, advantages_from_values
from ...gae import gae, masked_whiten
from .options import CONFIG_KEY, ESTIMATORS, Options, estimator_name, get, hista_request

# The fields the Numca step of verl's v1 trainer reads from its TransferQueue (the trainer's own
# advantage step reads a fixed list without `responses`).
V1_NUMCA_FIELDS = ("uid", "response_mask", "responses", "rm_scores")
# The metrics of the last sveb advantage step (`sveb/*`), added to verl's step metrics by the v1 wrap.
LAST_METRICS: dict = {}

# `set_tokenizer`'s tokenizer, and the actor's (taken from verl's v1 trainer by its wrap).
_tokenizers: dict = {"user": None, "actor": None}


def unavailable(estimator: str) -> Optional[str]:
    """Why `estimator` cannot run in this process (a patch point it needs is missing), or None."""
    from .patching import unavailable as reason

    return reason(estimator)


def set_tokenizer(tokenizer) -> None:
    """The tokenizer `sveb_numca` reads the responses with when `algorithm.sveb.tokenizer` is unset
    (default: the actor's tokenizer in verl's v1 trainer; needed for the function-level
    `compute_advantage` in custom trainers)."""
    _tokenizers["user"] = tokenizer
    vocab_for.cache_clear()


def _set_actor_tokenizer(tokenizer) -> None:
    if tokenizer is not None and tokenizer is not _tokenizers["actor"]:
        _tokenizers["actor"] = tokenizer
        vocab_for.cache_clear()


@functools.lru_cache(maxsize=4)
def vocab_for(name: Optional[str]):
    from ...numca import NumericVocab

    if name is None:
        tokenizer = _tokenizers["user"] if _tokenizers["user"] is not None else _tokenizers["actor"]
        if tokenizer is None:
            raise ValueError(
                "sveb_numca needs the actor's tokenizer (verl's v1 trainer passes it); elsewhere set "
                f"+algorithm.{CONFIG_KEY}.tokenizer='${{actor_rollout_ref.model.path}}' or call "
                "sveb_kernels.integrations.verl.set_tokenizer(tokenizer)"
            )
        return NumericVocab.from_tokenizer(tokenizer)
    from transformers import AutoTokenizer

    return NumericVocab.from_tokenizer(AutoTokenizer.from_pretrained(name))


# ---------------------------------------------------------------------- the advantage step
def compute_sveb_advantage(data, adv_estimator: str, *, gamma: float = 1.0, lam: float = 1.0, config=None,
                           norm_adv_by_std_in_grpo: bool = True):
    """Fills `data.batch["advantages"]` and `["returns"]` for one of the sveb estimators; returns `data`.

    This is what verl's `compute_advantage` runs for the sveb names once the plugin is loaded. Numca
    and Hista follow verl's GRPO: advantages over returns and values centred on the group mean and
    (with `norm_adv_by_std_in_grpo`) divided by the group std + 1e-6; an all-equal group gets 0, a
    lone rollout keeps R - V (verl's mean 0, std 1); see `sveb_kernels.estimators.advantages`.
    """
    name = estimator_name(adv_estimator)
    if name not in ESTIMATORS:
        raise ValueError(f"adv_estimator must be one of {ESTIMATORS}, got {adv_estimator!r}")
    options = Options.from_config(config)
    batch = data.batch
    if "response_mask" not in batch.keys():
        # As verl's own compute_advantage does for trainers that do not set it.
        length = batch["responses"].shape[-1]
        batch["response_mask"] = batch["attention_mask"][:, -length:]
    mask = batch["response_mask"]
    rewards = _required(batch, "token_level_rewards", name)
    if name == "sveb_gae":
        values = _required(batch, "values", name, hint="enable verl's critic (critic.enable=True)")
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=options.backend)
        advantages = masked_whiten(advantages, mask)
        batch["advantages"] = advantages.to(rewards.dtype)
        batch["returns"] = returns.to(rewards.dtype)
        if get(config, "use_pf_ppo", False):
            from verl.trainer.ppo import core_algos

            pf_ppo = get(config, "pf_ppo")
            data = core_algos.compute_pf_ppo_reweight_data(
                data, get(pf_ppo, "reweight_method"), get(pf_ppo, "weight_pow")
            )
        return data
    if name == "sveb_numca" and "responses" in batch.keys():
        values = numca_values_for_batch(data, options)
    elif name == "sveb_numca":
        # verl's v1 trainer: the wrapped PPOTrainer._compute_advantage stored them as `values`.
        values = _required(batch, "values", name, hint="the rollouts' `responses` are needed for Numca")
    else:
        values = _required(
            batch, "values", name,
            hint="verl's v1 trainer gets them from the actor workers' log-prob forward (" + (
                unavailable("sveb_hista") or "plugin patches in place") + "); a custom trainer stores them "
                 "itself (sveb_kernels.integrations.verl.hista_values_on_worker)",
        )
    group_index = group_index_from_uid(_uid(data, name)).to(mask.device)
    advantages, returns = _advantages_over_values(values, rewards, mask, group_index, options, gamma=gamma, lam=lam,
                                                  norm_by_std=bool(norm_adv_by_std_in_grpo))
    batch["advantages"] = advantages.to(rewards.dtype)
    batch["returns"] = returns.to(rewards.dtype)
    LAST_METRICS.clear()
    LAST_METRICS.update(token_metrics(values, advantages, mask))
    return data


def _required(batch, key: str, estimator: str, hint: str = ""):
    if key not in batch.keys():
        raise ValueError(f"{estimator} needs data.batch[{key!r}]" + (f"; {hint}" if hint else ""))
    return batch[key]


def group_index_from_uid(uid) -> Tensor:
    """verl's per-row prompt ids (`non_tensor_batch["uid"]`, strings) -> int64 group index."""
    uid = np.asarray(uid)
    if uid.ndim != 1:
        raise ValueError(f"uid must be one id per row, got shape {uid.shape}")
    _, inverse = np.unique(uid.astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64)


def _uid(data, estimator: str):
    if "uid" not in data.non_tensor_batch:
        raise ValueError(f"{estimator} needs data.non_tensor_batch['uid'] (the prompt id of each rollout)")
    return data.non_tensor_batch["uid"]


def numca_values_for_batch(data, options: Optional[Options] = None) -> Tensor:
    """[B, T] float32 Numca values V(s_t) of the state before each response token, from the batch's
    `responses`, `response_mask`, `token_level_scores` (else `token_level_rewards`; summed per row:
    the rollout's return) and `uid`; 0 at masked tokens."""
    options = options or Options()
    batch = data.batch
    responses = _required(batch, "responses", "sveb_numca")
    mask = batch["response_mask"].to(torch.bool)
    scores = batch["token_level_scores" if "token_level_scores" in batch.keys() else "token_level_rewards"].sum(dim=-1)
    group_index = group_index_from_uid(_uid(data, "sveb_numca")).to(responses.device)
    # The estimator's cell j is the state *after* token j; a leading pad column makes cell t the
    # state before response token t (the pad is outside the response, so Numca never reads it).
    pad = torch.zeros_like(mask[:, :1])
    token_ids = torch.cat([torch.zeros_like(responses[:, :1]), responses], dim=1)
    rollouts = RolloutBatch(
        token_ids, torch.cat([pad, mask], dim=1), group_index, scores,
        state_mask=torch.cat([mask, pad], dim=1), vocab=vocab_for(options.tokenizer),
    )
    numca = Numca(options.numca.match, leave_one_out=options.numca.leave_one_out,
                  min_support=options.numca.min_support, backend=options.backend)
    values = numca.estimate(rollouts)[:, :-1]
    return values.masked_fill(~mask, 0.0)


def _advantages_over_values(values, rewards, mask, group_index, options: Options, *, gamma, lam, norm_by_std=True):
    """(advantages, returns): R - V(s_t) or GAE over V under the scaling rule of
    `sveb_kernels.estimators.advantages` with verl's GRPO conventions; returns = the plain
    (uncentred, unscaled) advantages + V, the value targets. Both 0 at masked tokens."""
    valid = mask.to(torch.bool)
    values = values.to(torch.float32).masked_fill(~valid, 0.0)
    plain = advantages_from_values(values, rewards, valid, mode=options.mode, gamma=gamma, lam=lam,
                                   backend=options.backend)
    returns = (plain + values).masked_fill(~valid, 0.0)
    advantages = advantages_from_values(values, rewards, valid, mode=options.mode, gamma=gamma, lam=lam,
                                        whiten=options.whiten, group_index=group_index,
                                        scale="group" if norm_by_std else "none", eps=1e-6,
                                        lone_rollout="unscaled", backend=options.backend)
    return advantages, returns


def token_metrics(values: Tensor, advantages: Tensor, mask: Tensor) -> dict:
    """`sveb/value/*` and `sveb/advantage/*` (mean, std, min, max over the response tokens), the
    names the TRL integration logs; verl logs values only with a critic."""
    valid = mask.to(torch.bool)
    out = {}
    for name, x in (("value", values), ("advantage", advantages)):
        sel = x[valid].double()
        if sel.numel():
            out.update({f"sveb/{name}/mean": sel.mean().item(),
                        f"sveb/{name}/std": sel.std().item() if sel.numel() > 1 else 0.0,
                        f"sveb/{name}/min": sel.min().item(), f"sveb/{name}/max": sel.max().item()})
    return out


# ----------------------------------------------------------------------------------- the wraps
def _bound(original: Callable, args, kwargs) -> inspect.BoundArguments:
    """The call's arguments by name, defaults applied (the wrappers read only what they need)."""
    bound = inspect.signature(original).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def wrap_compute_advantage(original: Callable) -> Callable:
    """`ray_trainer.compute_advantage` with the sveb estimators in front of it; needs the parameters
    `data`, `adv_estimator`, `gamma`, `lam`, `norm_adv_by_std_in_grpo`, `config`."""

    @functools.wraps(original)
    def compute_advantage(*args, **kwargs):
        call = _bound(original, args, kwargs)
        if estimator_name(call["adv_estimator"]) in ESTIMATORS:
            return compute_sveb_advantage(call["data"], call["adv_estimator"], gamma=call["gamma"], lam=call["lam"],
                                          config=call["config"],
                                          norm_adv_by_std_in_grpo=call["norm_adv_by_std_in_grpo"])
        return original(*args, **kwargs)

    compute_advantage.__sveb_original__ = original
    return compute_advantage


def wrap_v1_compute_advantage(original: Callable) -> Callable:
    """verl v1's `PPOTrainer._compute_advantage` (needs `self`, `batch`, `metrics`): for sveb_numca it
    first stores the Numca values as the rollouts' `values` (read from and written to the trainer's
    TransferQueue); for every sveb name it adds the `sveb/*` metrics."""

    @functools.wraps(original)
    def _compute_advantage(*args, **kwargs):
        call = _bound(original, args, kwargs)
        trainer = call["self"]
        name = estimator_name(trainer.config.algorithm.adv_estimator)
        if name == "sveb_numca":
            put_numca_values_v1(trainer, call["batch"])
        if name in ESTIMATORS:
            LAST_METRICS.clear()
        out = original(*args, **kwargs)
        if name in ESTIMATORS and isinstance(call.get("metrics"), dict):
            call["metrics"].update(LAST_METRICS)
        return out

    _compute_advantage.__sveb_original__ = original
    return _compute_advantage


def put_numca_values_v1(trainer, batch) -> None:
    """Reads the rollouts of `batch` (a KVBatchMeta) from verl's TransferQueue, computes their Numca
    values on the driver and writes them back as the field `values` (response-length, nested)."""
    from tensordict import TensorDict
    from verl import DataProto
    from verl.workers.utils.padding import response_to_nested

    from .patching import V1_MODULE

    if getattr(trainer, "use_critic", False):
        raise ValueError("sveb_numca stores its values where the critic's go: set critic.enable=False")
    _set_actor_tokenizer(getattr(trainer, "tokenizer", None))
    tq = sys.modules[V1_MODULE].tq  # the queue client the trainer itself uses
    fields = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(V1_NUMCA_FIELDS))
    response_mask = fields["response_mask"]
    data = DataProto(batch=fields.to_padded_tensor())  # as the trainer's own advantage step does
    data.non_tensor_batch["uid"] = np.array(data.batch.pop("uid").tolist(), dtype=object)
    data.batch["token_level_scores"] = data.batch["rm_scores"]
    values = numca_values_for_batch(data, Options.from_config(trainer.config.algorithm))
    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                    fields=TensorDict({"values": response_to_nested(values, response_mask)}, batch_size=len(batch)))


def wrap_v1_compute_old_log_prob(original: Callable) -> Callable:
    """verl v1's `PPOTrainer._compute_old_log_prob` (needs `self`, `batch`); for sveb_hista the
    actor's log-prob batch carries the Hista options (and only that call: the key is removed again,
    so the reference policy's forward and the actor update never compute values)."""
    from .workers import HISTA_REQUEST_KEY

    @functools.wraps(original)
    def _compute_old_log_prob(*args, **kwargs):
        call = _bound(original, args, kwargs)
        trainer, batch = call["self"], call["batch"]
        if estimator_name(trainer.config.algorithm.adv_estimator) != "sveb_hista":
            return original(*args, **kwargs)
        if getattr(trainer, "use_critic", False):
            raise ValueError("sveb_hista stores its values where the critic's go: set critic.enable=False")
        rollout_correction = trainer.config.algorithm.get("rollout_correction", None)
        if rollout_correction and rollout_correction.get("bypass_mode", False):
            raise ValueError("sveb_hista computes its values in the actor's log-prob forward, which "
                             "algorithm.rollout_correction.bypass_mode=True skips")
        batch.extra_info[HISTA_REQUEST_KEY] = hista_request(Options.from_config(trainer.config.algorithm))
        try:
            out = original(*args, **kwargs)
        finally:
            batch.extra_info.pop(HISTA_REQUEST_KEY, None)
        if out is not None and getattr(out, "extra_info", None) is not None:
            out.extra_info.pop(HISTA_REQUEST_KEY, None)
        return out

    _compute_old_log_prob.__sveb_original__ = original
    return _compute_old_log_prob


def registry_stub(name: str) -> Callable:
    """What verl's estimator registry holds for a sveb name: a function that explains itself."""
    def sveb_estimator(**kwargs):
        from .patching import COMPUTE_ADVANTAGE

        reason = unavailable(name) or f"{COMPUTE_ADVANTAGE} was not patched by sveb_kernels"
        raise RuntimeError(
            f"{name} needs the whole batch (values, responses), which verl's estimator registry does not "
            f"pass; it runs through {COMPUTE_ADVANTAGE}. {reason}"
        )

    sveb_estimator.__name__ = name
    return sveb_estimator
