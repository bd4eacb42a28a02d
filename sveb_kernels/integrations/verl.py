"""verl integration: fused GAE, Numca and Hista as verl advantage estimators (docs/CONTRACT.md §5).

Installed as a `verl.plugins` entry point (extra `sveb_kernels[verl]`), so `import verl` loads this
module in every verl process. A user then selects, in the ordinary config,

    algorithm.adv_estimator=sveb_gae | sveb_numca | sveb_hista
    +algorithm.sveb.backend=auto            # options live under the one key `algorithm.sveb`

- `sveb_gae`: verl's own GAE (same advantages and returns as verl's `compute_gae_advantage_return`,
  then verl's whitening), computed by the fused scan `sveb_kernels.gae` instead of a Python loop
  over tokens. Needs verl's critic (`critic.enable=True`).
- `sveb_numca`: Numca values from the `responses` token ids and the actor's tokenizer, then per-token
  advantages `R - V` (or GAE over V, `algorithm.sveb.mode=gae`), as the TRL integration does.
- `sveb_hista`: Hista values computed in the actor workers' log-prob forward (a forward hook on the
  chosen layer of verl's FSDP engine; the hidden states never leave the workers, and a prompt's
  rollouts may sit on different data-parallel ranks: `sveb_kernels.distributed.hista_values` over
  the actor's dp group), stored next to the log-probs as the rollouts' `values`, then advantages
  R - V (or GAE over V) on the driver.

What runs where: verl computes advantages on the driver process, on CPU tensors; so do `sveb_gae`
and `sveb_numca` (the fused CPU scan / Numca ops). Hista runs where the hidden states are: on every
actor GPU, during verl's old-log-prob forward.

verl internals this module touches, all through `_install_patches` below and checked by the tests:
- `verl.trainer.ppo.ray_trainer.compute_advantage` (replaced, once, right after that module is
  imported, by a wrapper that handles the three sveb names and passes everything else to verl's
  function unchanged; verl's v1 trainer imports it by name afterwards and gets the wrapper);
- `verl.trainer.ppo.core_algos.register_adv_est` (public API: the three names are registered so a
  direct registry look-up gives a clear message instead of "unknown estimator");
- `verl.trainer.ppo.v1.trainer_base.PPOTrainer._compute_advantage` (wrapped, once, the same way):
  for `sveb_numca` it first reads `uid`, `response_mask`, `responses`, `rm_scores` from the
  trainer's TransferQueue client (`trainer_base.tq`), and writes the Numca values back as the field
  `values` (with `verl.workers.utils.padding.response_to_nested`), which verl's own advantage step
  then reads; other estimators pass straight through;
- `verl.trainer.ppo.core_algos.compute_pf_ppo_reweight_data` when `algorithm.use_pf_ppo` is set
  with `sveb_gae`, exactly as verl's GAE branch does;
- for `sveb_hista`, three more wraps, all inert unless the actor's log-prob batch carries the
  non-tensor entry `sveb_hista` (the Hista options):
  `verl.trainer.ppo.v1.trainer_base.PPOTrainer._compute_old_log_prob` (driver: puts the entry into
  the batch's `extra_info` for that one call, which verl hands the workers as non-tensor data);
  `verl.workers.engine.base.BaseEngine.infer_batch` (workers: hooks the chosen layer for the
  forward, computes the values, returns them as the model output `values`, which the actor worker
  stores in verl's TransferQueue); `verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.
  prepare_model_outputs` (workers: copies each micro-batch's response states out of the hooked
  layer's output, with the engine's own `_gather_and_unpad_packed` for the packed layout, into the
  model output, so verl's micro-batch concatenation and dynamic-batch reordering apply to them);
  the worker batch fields `input_ids` (nested), `response_mask`, `rm_scores`, `uid`;
- the batch keys `token_level_rewards`, `token_level_scores`, `response_mask`, `values`,
  `responses`, `attention_mask`, non-tensor `uid`, and the outputs `advantages`, `returns`.
Every wrapped function is checked for the parameters its wrapper is written against; a verl that
changed them is not patched (a RuntimeWarning says why, the sveb names then raise), and the tests
fail.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import sys
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from .. import _checks
from ..estimators import ADVANTAGE_MODES, Hista, Numca, RolloutBatch, advantages_from_values
from ..gae import gae, masked_whiten
from ..packing import Packing

ESTIMATORS = ("sveb_gae", "sveb_numca", "sveb_hista")
CONFIG_KEY = "sveb"

PATCHED_MODULE = "verl.trainer.ppo.ray_trainer"
PATCHED_FUNCTION = "compute_advantage"
REGISTRY_MODULE = "verl.trainer.ppo.core_algos"
# The signature the wrapper is written against; a verl that changes it is not patched (see `_patch`).
EXPECTED_PARAMETERS = ("data", "adv_estimator", "gamma", "lam", "num_repeat", "norm_adv_by_std_in_grpo", "config")

# verl's v1 trainer (the default) reads a fixed list of fields from its TransferQueue for the
# advantage step, without `responses`; for sveb_numca the wrapper of this method computes the values
# from the queue first and stores them as the rollouts' `values`, which that list includes.
V1_MODULE = "verl.trainer.ppo.v1.trainer_base"
V1_CLASS, V1_METHOD = "PPOTrainer", "_compute_advantage"
V1_EXPECTED_PARAMETERS = ("self", "batch", "metrics")
V1_NUMCA_FIELDS = ("uid", "response_mask", "responses", "rm_scores")


# --------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class NumcaOptions:
    match: str = "last"
    leave_one_out: bool = True
    min_support: int = 1


@dataclass(frozen=True)
class HistaOptions:
    # Index into the model's `output_hidden_states` tuple: 0 = embeddings, i = after decoder layer i,
    # -1 = the last entry (after the final norm).
    layer: int = -1
    temperature: float = 0.1
    similarity: str = "cosine"


@dataclass(frozen=True)
class Options:
    """Everything under `algorithm.sveb` in verl's config."""

    backend: str = "auto"
    # Numca / Hista: advantages R - V(s_t) ("r_minus_v") or GAE over V ("gae", with algorithm.gamma/lam).
    mode: str = "r_minus_v"
    # Numca / Hista: whiten the advantages over the response tokens of the rollouts with signal
    # instead of verl's GRPO division by the group std (`algorithm.norm_adv_by_std_in_grpo`).
    # sveb_gae always whitens, as verl's GAE does.
    whiten: bool = False
    # Numca: tokenizer name or path for the numeric vocabulary; usually
    # '${actor_rollout_ref.model.path}'. Unset: the one given to `set_tokenizer`.
    tokenizer: Optional[str] = None
    numca: NumcaOptions = field(default_factory=NumcaOptions)
    hista: HistaOptions = field(default_factory=HistaOptions)

    @classmethod
    def from_config(cls, config) -> "Options":
        """Reads `config.sveb` (a DictConfig, dict, verl AlgoConfig or None); unknown keys are an error."""
        raw = _get(config, CONFIG_KEY) if config is not None else None
        if raw is None:
            return cls()
        raw = _plain(raw)
        if not isinstance(raw, dict):
            raise TypeError(f"algorithm.{CONFIG_KEY} must be a mapping, got {type(raw).__name__}")
        options = _dataclass_from(cls, raw, f"algorithm.{CONFIG_KEY}")
        if options.mode not in ADVANTAGE_MODES:
            raise ValueError(f"algorithm.{CONFIG_KEY}.mode must be one of {ADVANTAGE_MODES}, got {options.mode!r}")
        return options


def _get(config, key, default=None):
    if isinstance(config, Mapping) or hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _plain(x):
    """DictConfig / ListConfig / Mapping -> plain dicts and lists (resolving interpolations)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # omegaconf comes with verl; plain dicts work without it
        pass
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _dataclass_from(cls, raw: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(where + '.' + k for k in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        sub = known[name].default_factory if known[name].default_factory is not MISSING else None
        if sub is not None:
            if not isinstance(value, dict):
                raise TypeError(f"{where}.{name} must be a mapping, got {type(value).__name__}")
            kwargs[name] = _dataclass_from(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------------- the estimators
_tokenizer = None


def set_tokenizer(tokenizer) -> None:
    """The tokenizer `sveb_numca` reads the responses with when `algorithm.sveb.tokenizer` is unset
    (for the function-level `compute_advantage` and custom trainers)."""
    global _tokenizer
    _tokenizer = tokenizer
    _vocab_for.cache_clear()


@functools.lru_cache(maxsize=4)
def _vocab_for(name: Optional[str]):
    from ..numca import NumericVocab

    if name is None:
        if _tokenizer is None:
            raise ValueError(
                "sveb_numca needs the actor's tokenizer: set "
                f"+algorithm.{CONFIG_KEY}.tokenizer='${{actor_rollout_ref.model.path}}' or call "
                "sveb_kernels.integrations.verl.set_tokenizer(tokenizer)"
            )
        return NumericVocab.from_tokenizer(_tokenizer)
    from transformers import AutoTokenizer

    return NumericVocab.from_tokenizer(AutoTokenizer.from_pretrained(name))


def compute_sveb_advantage(data, adv_estimator: str, *, gamma: float = 1.0, lam: float = 1.0, config=None,
                           norm_adv_by_std_in_grpo: bool = True):
    """Fills `data.batch["advantages"]` and `["returns"]` for one of the sveb estimators; returns `data`.

    This is what verl's `compute_advantage` runs for the sveb names once the plugin is loaded. Numca
    and Hista follow verl's GRPO: advantages over returns and values centred on the group mean and
    (with `norm_adv_by_std_in_grpo`) divided by the group std + 1e-6; an all-equal group gets 0, a
    lone rollout keeps R - V (verl's mean 0, std 1); see `sveb_kernels.estimators.advantages`.
    """
    name = _estimator_name(adv_estimator)
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
        if _get(config, "use_pf_ppo", False):
            from verl.trainer.ppo import core_algos

            pf_ppo = _get(config, "pf_ppo")
            data = core_algos.compute_pf_ppo_reweight_data(
                data, _get(pf_ppo, "reweight_method"), _get(pf_ppo, "weight_pow")
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
                _state.worker_error or "plugin patches in place") + "); a custom trainer stores them "
                 "itself (sveb_kernels.integrations.verl.hista_values_on_worker)",
        )
    group_index = group_index_from_uid(_uid(data, name)).to(mask.device)
    advantages, returns = _advantages_over_values(values, rewards, mask, group_index, options, gamma=gamma, lam=lam,
                                                  norm_by_std=bool(norm_adv_by_std_in_grpo))
    batch["advantages"] = advantages.to(rewards.dtype)
    batch["returns"] = returns.to(rewards.dtype)
    return data


def _required(batch, key: str, estimator: str, hint: str = ""):
    if key not in batch.keys():
        raise ValueError(f"{estimator} needs data.batch[{key!r}]" + (f"; {hint}" if hint else ""))
    return batch[key]


def _estimator_name(adv_estimator) -> str:
    return getattr(adv_estimator, "value", adv_estimator)


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
        state_mask=torch.cat([mask, pad], dim=1), vocab=_vocab_for(options.tokenizer),
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


# ------------------------------------------------------------------------ Hista on the workers
def _decoder_parts(model):
    """(embedding, decoder layers, final norm) of a Hugging Face causal LM (Llama/Qwen/Mistral/
    Gemma style `model.model.{embed_tokens, layers, norm}`, GPT-2 style `transformer.{wte, h, ln_f}`)."""
    inner = getattr(model, "module", model)  # FSDP / DDP wrappers
    if hasattr(inner, "get_base_model"):  # a PEFT (LoRA) model: hook the wrapped model's own layers
        inner = inner.get_base_model()
    base = getattr(inner, "model", None) or getattr(inner, "transformer", None) or inner
    for embed, layers, norm in (("embed_tokens", "layers", "norm"), ("wte", "h", "ln_f")):
        if all(hasattr(base, a) for a in (embed, layers, norm)):
            return getattr(base, embed), getattr(base, layers), getattr(base, norm)
    raise TypeError(
        f"cannot find the decoder layers of {type(inner).__name__}: expected .model.layers/.model.norm "
        "(Llama-style) or .transformer.h/.transformer.ln_f (GPT-2 style)"
    )


class HiddenStateCapture:
    """Records, during a forward pass, exactly the tensor `output_hidden_states=True` would return at
    index `layer` (0 = embeddings, i = after decoder layer i, -1/L = after the final norm), by a
    forward hook on that one module, so the other layers' states are never kept.

        with HiddenStateCapture(model, layer=-1) as capture:
            model(input_ids=..., attention_mask=...)
        hidden = capture.hidden          # [B, L, D] (or [1, nnz, D] for verl's packed forward)

    The hook keeps a reference to the activation the model computes anyway: no copy, no extra memory
    beyond holding one layer's output until the capture is read.
    """

    def __init__(self, model, layer: int = -1):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        embed, layers, norm = _decoder_parts(model)
        count = len(layers) + 1
        if not -count <= layer < count:
            raise ValueError(f"layer must be in [{-count}, {count - 1}] for a model with {len(layers)} layers, got {layer}")
        index = layer % count
        self.module = embed if index == 0 else norm if index == count - 1 else layers[index - 1]
        self.hidden: Optional[Tensor] = None
        self._handle = None

    def _hook(self, module, inputs, output):
        self.hidden = output if isinstance(output, Tensor) else output[0]

    def __enter__(self) -> "HiddenStateCapture":
        self.hidden = None
        self._handle = self.module.register_forward_hook(self._hook)
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


# -------------------------------------------------------------- Hista inside verl's actor workers
# The driver asks for Hista values by one non-tensor entry of the actor's log-prob batch (verl passes
# a KVBatchMeta's `extra_info` to the workers as non-tensor data); its value is the plain options dict.
HISTA_REQUEST_KEY = "sveb_hista"
# The response states travel between the two worker-side wrappers inside the engine's own
# model_output, so verl's micro-batch concatenation and dynamic-batch reordering apply to them too.
HIDDEN_KEY = "sveb_hidden"
VALUES_KEY = "values"

ENGINE_MODULE = "verl.workers.engine.base"
ENGINE_CLASS, ENGINE_METHOD = "BaseEngine", "infer_batch"
ENGINE_EXPECTED_PARAMETERS = ("self", "data", "loss_function")
FSDP_MODULE = "verl.workers.engine.fsdp.transformer_impl"
FSDP_CLASS, FSDP_METHOD = "FSDPEngineWithLMHead", "prepare_model_outputs"
FSDP_EXPECTED_PARAMETERS = ("self", "output", "output_args", "micro_batch", "logits_processor_func")
V1_LOG_PROB_METHOD = "_compute_old_log_prob"
V1_LOG_PROB_EXPECTED_PARAMETERS = ("self", "batch", "metrics")


def hista_request(options: Options) -> dict:
    """What the driver puts into the log-prob batch: plain values, picklable and rank-independent."""
    return {"layer": options.hista.layer, "temperature": options.hista.temperature,
            "similarity": options.hista.similarity, "backend": options.backend}


def _options_from_request(request) -> Options:
    request = dict(_plain(getattr(request, "data", request)))
    backend = request.pop("backend", "auto")
    return Options(backend=backend, hista=_dataclass_from(HistaOptions, request, f"algorithm.{CONFIG_KEY}.hista"))


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
        from .. import hista_values

        counts = torch.bincount(group_ids, weights=lengths.double()).to(torch.int64)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
        out = hista_values(hidden, returns, row.to(torch.int32), offsets, temperature=temperature,
                           similarity=options.hista.similarity, backend=options.backend)
        per_row = dict(zip(order.tolist(), out.values.split(lengths[order].tolist())))
        return [per_row[i] for i in range(rows)]
    from .. import distributed as sveb_distributed

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
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        model_output = original(self, output, output_args, micro_batch, logits_processor_func)
        capture = getattr(self, "_sveb_capture", None)
        if capture is not None:
            model_output[HIDDEN_KEY] = micro_batch_response_states(self, capture.hidden, output_args, micro_batch)
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
    def infer_batch(self, data, loss_function=None):
        request = _non_tensor(data, HISTA_REQUEST_KEY)
        if request is None:
            return original(self, data, loss_function)
        options = _options_from_request(request)
        if getattr(type(self), FSDP_METHOD, None) is None or not hasattr(
                getattr(type(self), FSDP_METHOD), "__sveb_original__"):
            raise RuntimeError(
                f"sveb_hista computes values in the actor's log-prob forward, which the plugin supports for "
                f"verl's FSDP engine ({FSDP_CLASS}); this actor runs {type(self).__name__}"
                + (f" ({_state.worker_error})" if _state.worker_error else ""))
        capture = HiddenStateCapture(self.module, options.hista.layer)
        self._sveb_capture = capture
        try:
            with capture:
                output = original(self, data, loss_function)
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


def wrap_v1_compute_old_log_prob(original: Callable) -> Callable:
    """verl v1's `PPOTrainer._compute_old_log_prob`; for sveb_hista the actor's log-prob batch carries
    the Hista options (and only that call: the key is removed again, so the reference policy's
    forward and the actor update never compute values)."""

    @functools.wraps(original)
    def _compute_old_log_prob(self, batch, metrics):
        if _estimator_name(self.config.algorithm.adv_estimator) != "sveb_hista":
            return original(self, batch, metrics)
        if getattr(self, "use_critic", False):
            raise ValueError("sveb_hista stores its values where the critic's go: set critic.enable=False")
        rollout_correction = self.config.algorithm.get("rollout_correction", None)
        if rollout_correction and rollout_correction.get("bypass_mode", False):
            raise ValueError("sveb_hista computes its values in the actor's log-prob forward, which "
                             "algorithm.rollout_correction.bypass_mode=True skips")
        batch.extra_info[HISTA_REQUEST_KEY] = hista_request(Options.from_config(self.config.algorithm))
        try:
            out = original(self, batch, metrics)
        finally:
            batch.extra_info.pop(HISTA_REQUEST_KEY, None)
        if out is not None and getattr(out, "extra_info", None) is not None:
            out.extra_info.pop(HISTA_REQUEST_KEY, None)
        return out

    _compute_old_log_prob.__sveb_original__ = original
    return _compute_old_log_prob


# -------------------------------------------------------------------------- the one patch point
def _registry_stub(name: str) -> Callable:
    def sveb_estimator(**kwargs):
        reason = _state.patch_error or (
            f"{PATCHED_MODULE}.{PATCHED_FUNCTION} was not patched by sveb_kernels"
        )
        raise RuntimeError(
            f"{name} needs the whole batch (values, responses), which verl's estimator registry does not "
            f"pass; it runs through {PATCHED_MODULE}.{PATCHED_FUNCTION}. {reason}"
        )

    sveb_estimator.__name__ = name
    return sveb_estimator


def _register(core_algos) -> None:
    for name in ESTIMATORS:
        if name not in core_algos.ADV_ESTIMATOR_REGISTRY:
            core_algos.register_adv_est(name)(_registry_stub(name))


def wrap_compute_advantage(original: Callable) -> Callable:
    """verl's `compute_advantage` with the sveb estimators in front of it."""

    @functools.wraps(original)
    def compute_advantage(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1, norm_adv_by_std_in_grpo=True, config=None):
        if _estimator_name(adv_estimator) in ESTIMATORS:
            return compute_sveb_advantage(data, adv_estimator, gamma=gamma, lam=lam, config=config,
                                          norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)
        return original(
            data, adv_estimator=adv_estimator, gamma=gamma, lam=lam, num_repeat=num_repeat,
            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config,
        )

    compute_advantage.__sveb_original__ = original
    return compute_advantage


def signature_mismatch(function: Callable) -> Optional[str]:
    """None if `function` has the parameters the wrapper is written against, else what differs."""
    got = tuple(inspect.signature(inspect.unwrap(function)).parameters)
    if got != EXPECTED_PARAMETERS:
        return f"{PATCHED_MODULE}.{PATCHED_FUNCTION} has parameters {got}, expected {EXPECTED_PARAMETERS}"
    return None


def _patch(ray_trainer) -> None:
    current = getattr(ray_trainer, PATCHED_FUNCTION, None)
    if current is None:
        _state.patch_error = f"{PATCHED_MODULE} has no {PATCHED_FUNCTION} (verl {_verl_version()})"
    elif getattr(current, "__sveb_original__", None) is not None:
        return
    else:
        _state.patch_error = signature_mismatch(current)
    if _state.patch_error is not None:
        # Loud but not fatal: verl keeps working for every other estimator; the sveb names raise.
        warnings.warn(f"sveb_kernels verl plugin disabled: {_state.patch_error}", RuntimeWarning, stacklevel=2)
        return
    setattr(ray_trainer, PATCHED_FUNCTION, wrap_compute_advantage(current))


def wrap_v1_compute_advantage(original: Callable) -> Callable:
    """verl v1's `PPOTrainer._compute_advantage`, first storing Numca values as `values` for sveb_numca."""

    @functools.wraps(original)
    def _compute_advantage(self, batch, metrics):
        if _estimator_name(self.config.algorithm.adv_estimator) == "sveb_numca":
            put_numca_values_v1(self, batch)
        return original(self, batch, metrics)

    _compute_advantage.__sveb_original__ = original
    return _compute_advantage


def put_numca_values_v1(trainer, batch) -> None:
    """Reads the rollouts of `batch` (a KVBatchMeta) from verl's TransferQueue, computes their Numca
    values on the driver and writes them back as the field `values` (response-length, nested)."""
    from tensordict import TensorDict
    from verl import DataProto
    from verl.workers.utils.padding import response_to_nested

    if getattr(trainer, "use_critic", False):
        raise ValueError("sveb_numca stores its values where the critic's go: set critic.enable=False")
    tq = sys.modules[V1_MODULE].tq  # the queue client the trainer itself uses
    fields = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(V1_NUMCA_FIELDS))
    response_mask = fields["response_mask"]
    data = DataProto(batch=fields.to_padded_tensor())  # as the trainer's own advantage step does
    data.non_tensor_batch["uid"] = np.array(data.batch.pop("uid").tolist(), dtype=object)
    data.batch["token_level_scores"] = data.batch["rm_scores"]
    values = numca_values_for_batch(data, Options.from_config(trainer.config.algorithm))
    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                    fields=TensorDict({"values": response_to_nested(values, response_mask)}, batch_size=len(batch)))


def _wrap_method(module, cls_name: str, method: str, expected: tuple, make_wrapper: Callable) -> Optional[str]:
    """Replaces `module.cls_name.method` by `make_wrapper(original)` if it has the parameters
    `expected` (idempotent); otherwise leaves it alone and returns what differs."""
    cls = getattr(module, cls_name, None)
    current = getattr(cls, method, None) if cls is not None else None
    if current is None:
        return f"{module.__name__} has no {cls_name}.{method} (verl {_verl_version()})"
    if getattr(current, "__sveb_original__", None) is not None:
        return None
    got = tuple(inspect.signature(inspect.unwrap(current)).parameters)
    if got != expected:
        return f"{module.__name__}.{cls_name}.{method} has parameters {got}, expected {expected}"
    setattr(cls, method, make_wrapper(current))
    return None


def _patch_v1(trainer_base) -> None:
    problem = _wrap_method(trainer_base, V1_CLASS, V1_METHOD, V1_EXPECTED_PARAMETERS, wrap_v1_compute_advantage)
    if problem is not None:
        _state.v1_error = problem
        warnings.warn(f"sveb_kernels verl plugin: sveb_numca unavailable in verl's v1 trainer: {problem}",
                      RuntimeWarning, stacklevel=2)
    problem = _wrap_method(trainer_base, V1_CLASS, V1_LOG_PROB_METHOD, V1_LOG_PROB_EXPECTED_PARAMETERS,
                           wrap_v1_compute_old_log_prob)
    if problem is not None:
        _worker_patch_failed(problem)


def _worker_patch_failed(problem: str) -> None:
    _state.worker_error = problem
    warnings.warn(f"sveb_kernels verl plugin: sveb_hista unavailable in verl's workers: {problem}",
                  RuntimeWarning, stacklevel=2)


def _patch_engine(engine_base) -> None:
    problem = _wrap_method(engine_base, ENGINE_CLASS, ENGINE_METHOD, ENGINE_EXPECTED_PARAMETERS, wrap_engine_infer_batch)
    if problem is not None:
        _worker_patch_failed(problem)


def _patch_fsdp(transformer_impl) -> None:
    problem = _wrap_method(transformer_impl, FSDP_CLASS, FSDP_METHOD, FSDP_EXPECTED_PARAMETERS, wrap_prepare_model_outputs)
    if problem is None and not hasattr(getattr(transformer_impl, "FSDPEngine", None), "_gather_and_unpad_packed"):
        problem = f"{FSDP_MODULE}.FSDPEngine has no _gather_and_unpad_packed (verl {_verl_version()})"
    if problem is not None:
        _worker_patch_failed(problem)


def _verl_version() -> str:
    return getattr(sys.modules.get("verl"), "__version__", "?")


class _State:
    patch_error: Optional[str] = None
    v1_error: Optional[str] = None
    worker_error: Optional[str] = None
    finder: Optional["_AfterImport"] = None


_state = _State()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a module's own code has executed, before anyone imports names
    from it; this is how the patch lands before verl's v1 trainer does
    `from verl.trainer.ppo.ray_trainer import compute_advantage`, without importing the (heavy)
    trainer in every verl process on `import verl`."""

    def __init__(self, callbacks: dict[str, Callable]):
        self.callbacks = callbacks

    def find_spec(self, fullname, path, target=None):
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderThenCall(spec.loader, callback)
        return spec


class _LoaderThenCall(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)


def _install_patches() -> None:
    """The single place where verl is modified (idempotent): register the names in verl's estimator
    registry, wrap `ray_trainer.compute_advantage`, (for sveb_numca) the v1 trainer's
    `PPOTrainer._compute_advantage` and (for sveb_hista) its `_compute_old_log_prob`, the engines'
    `BaseEngine.infer_batch` and the FSDP engine's `prepare_model_outputs`, each as soon as its
    module is imported (in whichever process imports it: driver or worker)."""
    callbacks = {REGISTRY_MODULE: _register, PATCHED_MODULE: _patch, V1_MODULE: _patch_v1,
                 ENGINE_MODULE: _patch_engine, FSDP_MODULE: _patch_fsdp}
    for name, callback in callbacks.items():
        if name in sys.modules:
            callback(sys.modules[name])
    if _state.finder is None:
        _state.finder = _AfterImport(callbacks)
        sys.meta_path.insert(0, _state.finder)


install = _install_patches
_install_patches()
