"""Learned Hista: Hista over a learned similarity, trained online through the op's backward.

Fixed Hista weighs the other rollouts' tokens by the cosine of raw hidden states. Where those states
do not say whether a prefix is on track, nothing lets Hista learn. Here a small projection P (D -> d)
and an inverse temperature beta are learned:

    z_i = sqrt(beta) * normalize(P standardise(h_i)),   s_ij = <z_i, z_j> = beta cos(P h_i, P h_j)

and `hista_values(z, returns, ..., similarity="dot", temperature=1)` gives the values. Hista is
leave-one-rollout-out by construction (token i's keys are other rollouts' tokens), so
mean_i (V_i - R_i)^2 over the tokens that have keys is a proper regression loss: V_i never sees R_i.
Its gradient flows through the op's fused backward (docs/DESIGN.md "Hista backward") into P and beta.

No leakage: `estimate(batch)` values the batch with the current parameters first and only then
takes `steps_per_batch` optimizer steps on that batch (as PPO updates its critic after computing
advantages), so a batch's values come from parameters that have not seen its returns.
`fit(train)` (SVEB's train split) runs `epochs` passes over the train groups before any estimate.
The state (parameters, feature statistics, optimizer) is `state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
from torch import Tensor

from .base import Estimator
from .batch import RolloutBatch


class LearnedHista(Estimator):
    """Hista with a learned projection (D -> `dim`) and a learned inverse temperature.

    Args:
        dim: width d of the projection.
        temperature: initial temperature of the cosine similarity of the projected states.
        lr, weight_decay: AdamW's, for the projection.
        temperature_lr: AdamW's learning rate of log(1/temperature) (larger: the temperature must be
            able to move by orders of magnitude within a few dozen steps).
        steps_per_batch: optimizer steps on each batch after valuing it (0: frozen).
        epochs, groups_per_step: `fit(train)`: passes over the train groups, groups per step.
        equal_rollout_weight: every other rollout weighs the same (key bias -log of its length).
        seed: initial projection and the order of `fit`'s groups.
        backend: of `hista_values` (forward and backward).
    """

    needs_train = False  # it learns online; SVEB's train split, when there is one, warms it up
    needs_hidden = True  # trainers must hand it the policy's hidden states (as for Hista)

    def __init__(self, dim: int = 64, temperature: float = 0.1, *, lr: float = 3e-3, temperature_lr: float = 0.05,
                 weight_decay: float = 0.0,
                 steps_per_batch: int = 1, epochs: int = 20, groups_per_step: int = 16,
                 equal_rollout_weight: bool = False, empty_value: float = 0.0, seed: int = 0,
                 backend: str = "auto", name: Optional[str] = None):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite float, got {temperature}")
        if int(steps_per_batch) < 0 or int(epochs) < 0 or int(groups_per_step) < 1:
            raise ValueError("steps_per_batch and epochs must be >= 0 and groups_per_step >= 1, got "
                             f"{steps_per_batch}, {epochs}, {groups_per_step}")
        self.dim = int(dim)
        self.initial_temperature = float(temperature)
        self.lr = float(lr)
        self.temperature_lr = float(temperature_lr)
        self.weight_decay = float(weight_decay)
        self.steps_per_batch = int(steps_per_batch)
        self.epochs = int(epochs)
        self.groups_per_step = int(groups_per_step)
        self.equal_rollout_weight = bool(equal_rollout_weight)
        self.empty_value = float(empty_value)
        self.seed = int(seed)
        self.backend = backend
        self.name = name or f"learned_hista_d{self.dim}"
        self.projection: Optional[Tensor] = None  # [D, d]
        self.log_inv_temperature: Optional[Tensor] = None  # scalar
        self.feature_mean: Optional[Tensor] = None  # [D], standardisation (from the first batch seen)
        self.feature_std: Optional[Tensor] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.updates = 0
        self.update_seconds = 0.0  # wall time spent in updates (forward + backward + optimizer step)
        self.last_loss: Optional[float] = None

    # ---- parameters --------------------------------------------------------------------------------
    @property
    def temperature(self) -> Optional[float]:
        return None if self.log_inv_temperature is None else float(torch.exp(-self.log_inv_temperature.detach()))

    def _build(self, hidden: Tensor) -> None:
        # Parameters must be ordinary tensors even when the first batch arrives under inference mode
        # (`sveb eval` runs estimators under torch.inference_mode()).
        with torch.inference_mode(False):
            self._build_now(hidden.clone())

    def _build_now(self, hidden: Tensor) -> None:
        d_in = hidden.shape[1]
        device = hidden.device
        generator = torch.Generator().manual_seed(self.seed)
        # A Gaussian projection keeps cosines (Johnson-Lindenstrauss): it starts as fixed Hista on
        # standardised states and learns from there.
        projection = torch.randn(d_in, self.dim, generator=generator) / math.sqrt(self.dim)
        self.projection = projection.to(device).requires_grad_(True)
        self.log_inv_temperature = torch.tensor(-math.log(self.initial_temperature), device=device,
                                                requires_grad=True)
        with torch.no_grad():
            x = hidden.detach().to(torch.float32)
            self.feature_mean = x.mean(dim=0)
            self.feature_std = x.std(dim=0, correction=0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(
                self.feature_mean)
        self.optimizer = self._optimizer()

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": [self.projection]},
                                  {"params": [self.log_inv_temperature], "lr": self.temperature_lr}],
                                 lr=self.lr, weight_decay=self.weight_decay)

    def _ensure(self, hidden: Tensor) -> None:
        if self.projection is None:
            self._build(hidden)
        elif self.projection.shape[0] != hidden.shape[1]:
            raise ValueError(f"hidden states have D={hidden.shape[1]}, the learned projection expects "
                             f"D={self.projection.shape[0]}")
        elif self.projection.device != hidden.device:
            self._to(hidden.device)

    def _to(self, device) -> None:
        state = self.state_dict()
        self.load_state_dict(state, device=device)

    def state_dict(self) -> dict:
        """Parameters, feature statistics, optimizer state and counters (empty before the first batch)."""
        out = {"config": dict(dim=self.dim, temperature=self.initial_temperature, lr=self.lr,
                              temperature_lr=self.temperature_lr,
                              weight_decay=self.weight_decay, seed=self.seed), "updates": self.updates}
        if self.projection is not None:
            out.update(projection=self.projection.detach().clone(),
                       log_inv_temperature=self.log_inv_temperature.detach().clone(),
                       feature_mean=self.feature_mean.clone(), feature_std=self.feature_std.clone(),
                       optimizer=self.optimizer.state_dict())
        return out

    def load_state_dict(self, state: dict, *, device=None) -> None:
        """Restores `state_dict()`'s output (on `device`, default: where it was saved)."""
        self.updates = int(state.get("updates", 0))
        if "projection" not in state:
            self.projection = self.log_inv_temperature = self.optimizer = None
            return
        projection = state["projection"]
        device = torch.device(device) if device is not None else projection.device
        if projection.shape[1] != self.dim:
            raise ValueError(f"the saved projection has d={projection.shape[1]}, this estimator d={self.dim}")
        with torch.inference_mode(False):
            self.projection = projection.detach().to(device, torch.float32).clone().requires_grad_(True)
            self.log_inv_temperature = state["log_inv_temperature"].detach().to(device).clone().requires_grad_(True)
            self.feature_mean = state["feature_mean"].to(device).clone()
            self.feature_std = state["feature_std"].to(device).clone()
            self.optimizer = self._optimizer()
            self.optimizer.load_state_dict(state["optimizer"])  # moves its moments to the parameters' device

    # ---- the op ------------------------------------------------------------------------------------
    def embed(self, hidden: Tensor) -> Tensor:
        """z = sqrt(beta) * normalize(P standardise(h)): <z_i, z_j> is the learned logit."""
        x = (hidden.to(torch.float32) - self.feature_mean) / self.feature_std
        z = torch.nn.functional.normalize(x @ self.projection, dim=1, eps=1e-6)
        return z * torch.exp(0.5 * self.log_inv_temperature)

    def _op(self, hidden, returns, rollout_ids, offsets, key_bias):
        from .. import hista_values

        return hista_values(self.embed(hidden), returns, rollout_ids, offsets, temperature=1.0, similarity="dot",
                            key_bias=key_bias, empty_value=self.empty_value, backend=self.backend)

    @staticmethod
    def _key_bias(rollout_ids: Tensor, num_rollouts: int) -> Tensor:
        lengths = torch.bincount(rollout_ids.long(), minlength=num_rollouts).to(torch.float32)
        return -torch.log(lengths.clamp_min(1))[rollout_ids.long()]

    def _packed(self, batch: RolloutBatch):
        if batch.shard is not None:
            raise NotImplementedError("LearnedHista does not support batches sharded over processes yet (its "
                                      "backward has no distributed version): use Hista, or gather the groups")
        hidden = batch.hidden.detach()  # the policy's states are inputs here: no gradient flows back to it
        device = hidden.device
        packing = batch.packing
        rollout_ids = packing.rollout_ids.to(device)
        returns = batch.returns.detach().to(device, torch.float32)[rollout_ids.long()]
        offsets = packing.group_offsets.to(device)
        key_bias = self._key_bias(rollout_ids, batch.num_rollouts) if self.equal_rollout_weight else None
        return hidden, returns, rollout_ids, offsets, key_bias

    def loss(self, hidden, returns, rollout_ids, offsets, key_bias=None) -> Tensor:
        """mean (V_i - R_i)^2 over the tokens with keys (V_i never depends on R_i: leave-one-rollout-out)."""
        values, lse = self._op(hidden, returns, rollout_ids, offsets, key_bias)
        has_keys = torch.isfinite(lse)
        if not bool(has_keys.any()):
            return values.sum() * 0.0
        return (values - returns)[has_keys].square().mean()

    def step(self, hidden, returns, rollout_ids, offsets, key_bias=None) -> float:
        """One optimizer step on packed tokens; returns the loss before the step."""
        self._ensure(hidden)
        started = time.perf_counter()
        # Training works under inference mode / no_grad too (SVEB and trainers value batches there):
        # inputs made under inference mode are cloned into ordinary tensors for autograd.
        with torch.inference_mode(False), torch.enable_grad():
            if hidden.is_inference():
                hidden, returns, rollout_ids, offsets = (t.clone() for t in (hidden, returns, rollout_ids, offsets))
                key_bias = None if key_bias is None else key_bias.clone()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(hidden, returns, rollout_ids, offsets, key_bias)
            if loss.requires_grad:
                loss.backward()
                self.optimizer.step()
        self.updates += 1
        if hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        self.update_seconds += time.perf_counter() - started
        self.last_loss = float(loss.detach())
        return self.last_loss

    # ---- the estimator interface -------------------------------------------------------------------
    def values_now(self, batch: RolloutBatch) -> Tensor:
        """[B, T] values of the batch under the current parameters, without any update."""
        hidden, returns, rollout_ids, offsets, key_bias = self._packed(batch)
        self._ensure(hidden)
        with torch.no_grad():
            values, _ = self._op(hidden, returns, rollout_ids, offsets, key_bias)
        packing = batch.packing
        return packing.unpack(values.to(packing.token_index.device)).to(batch.device)

    def estimate(self, batch: RolloutBatch) -> Tensor:
        """Values first, then `steps_per_batch` updates on this batch (no leakage; see the module doc)."""
        values = self.values_now(batch)
        if self.steps_per_batch:
            packed = self._packed(batch)
            for _ in range(self.steps_per_batch):
                self.step(*packed)
        return values

    def fit(self, train: RolloutBatch) -> None:
        """`epochs` passes over the train split's groups, `groups_per_step` groups per step (shuffled)."""
        hidden, returns, rollout_ids, offsets, key_bias = self._packed(train)
        self._ensure(hidden)
        num_groups = offsets.numel() - 1
        if num_groups == 0 or self.epochs == 0:
            return
        host_offsets = offsets.tolist()
        generator = torch.Generator().manual_seed(self.seed + 1)
        for _ in range(self.epochs):
            order = torch.randperm(num_groups, generator=generator).tolist()
            for s0 in range(0, num_groups, self.groups_per_step):
                picked = sorted(order[s0:s0 + self.groups_per_step])
                index = torch.cat([torch.arange(host_offsets[g], host_offsets[g + 1]) for g in picked]).to(
                    hidden.device)
                lengths = torch.tensor([host_offsets[g + 1] - host_offsets[g] for g in picked])
                sub_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(offsets.device)
                self.step(hidden[index], returns[index], rollout_ids[index], sub_offsets,
                          None if key_bias is None else key_bias[index])
