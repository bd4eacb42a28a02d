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
- `sveb_hista`: advantages from Hista values that the actor workers computed in their log-prob
  forward and stored as the batch's `values`; the hidden states never leave the workers
  (`HiddenStateCapture`, `response_hidden_states`, `hista_values_for_rollouts`).

What runs where: verl computes advantages on the driver process, on CPU tensors; so do `sveb_gae`
and `sveb_numca` (the fused CPU scan / Numca ops). Hista runs where the hidden states are.

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
- the batch keys `token_level_rewards`, `token_level_scores`, `response_mask`, `values`,
  `responses`, `attention_mask`, non-tensor `uid`, and the outputs `advantages`, `returns`.
Both wrapped functions are checked for the parameters the wrappers are written against; a verl
that changed them is not patched (a RuntimeWarning says why, the sveb names then raise), and the
tests fail.
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
    # Numca / Hista: whiten the advantages over the batch's response tokens (sveb_gae always does,
    # as verl's GAE does).
    whiten: bool = True
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


def compute_sveb_advantage(data, adv_estimator: str, *, gamma: float = 1.0, lam: float = 1.0, config=None):
    """Fills `data.batch["advantages"]` and `["returns"]` for one of the sveb estimators; returns `data`.

    This is what verl's `compute_advantage` runs for the sveb names once the plugin is loaded.
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
            hint="the actor workers store Hista values as `values` in their log-prob forward "
                 "(see sveb_kernels.integrations.verl.hista_values_for_rollouts)",
        )
    advantages, returns = _advantages_over_values(values, rewards, mask, options, gamma=gamma, lam=lam)
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


def _advantages_over_values(values, rewards, mask, options: Options, *, gamma, lam):
    """(advantages, returns): R - V(s_t) or GAE over V as the TRL integration computes them, returns
    = the unwhitened advantages + V (the value targets), both 0 at masked tokens."""
    valid = mask.to(torch.bool)
    values = values.to(torch.float32).masked_fill(~valid, 0.0)
    advantages = advantages_from_values(values, rewards, valid, mode=options.mode, gamma=gamma, lam=lam,
                                        whiten=False, backend=options.backend)
    returns = (advantages + values).masked_fill(~valid, 0.0)
    if options.whiten:
        advantages = masked_whiten(advantages, valid).masked_fill(~valid, 0.0)
    return advantages, returns


# ------------------------------------------------------------------------ Hista on the workers
def _decoder_parts(model):
    """(embedding, decoder layers, final norm) of a Hugging Face causal LM (Llama/Qwen/Mistral/
    Gemma style `model.model.{embed_tokens, layers, norm}`, GPT-2 style `transformer.{wte, h, ln_f}`)."""
    inner = getattr(model, "module", model)  # FSDP / DDP wrappers
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
            return compute_sveb_advantage(data, adv_estimator, gamma=gamma, lam=lam, config=config)
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


def _patch_v1(trainer_base) -> None:
    cls = getattr(trainer_base, V1_CLASS, None)
    current = getattr(cls, V1_METHOD, None) if cls is not None else None
    if current is None:
        problem = f"{V1_MODULE} has no {V1_CLASS}.{V1_METHOD} (verl {_verl_version()})"
    elif getattr(current, "__sveb_original__", None) is not None:
        return
    else:
        got = tuple(inspect.signature(inspect.unwrap(current)).parameters)
        problem = None if got == V1_EXPECTED_PARAMETERS else (
            f"{V1_MODULE}.{V1_CLASS}.{V1_METHOD} has parameters {got}, expected {V1_EXPECTED_PARAMETERS}")
    if problem is not None:
        _state.v1_error = problem
        warnings.warn(f"sveb_kernels verl plugin: sveb_numca unavailable in verl's v1 trainer: {problem}",
                      RuntimeWarning, stacklevel=2)
        return
    setattr(cls, V1_METHOD, wrap_v1_compute_advantage(current))


def _verl_version() -> str:
    return getattr(sys.modules.get("verl"), "__version__", "?")


class _State:
    patch_error: Optional[str] = None
    v1_error: Optional[str] = None
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
    registry, wrap `ray_trainer.compute_advantage` and (for sveb_numca) the v1 trainer's
    `PPOTrainer._compute_advantage`, each as soon as its module is imported."""
    callbacks = {REGISTRY_MODULE: _register, PATCHED_MODULE: _patch, V1_MODULE: _patch_v1}
    for name, callback in callbacks.items():
        if name in sys.modules:
            callback(sys.modules[name])
    if _state.finder is None:
        _state.finder = _AfterImport(callbacks)
        sys.meta_path.insert(0, _state.finder)


install = _install_patches
_install_patches()
