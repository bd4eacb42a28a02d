"""Synthetic RL batches shaped like real ones: groups of rollouts of uneven length, hidden states with
LLM-like norms (hundreds) sharing a per-prompt direction, 0/1 outcome rewards."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from ..packing import Packing


@dataclass
class HistaCase:
    hidden: Tensor
    returns: Tensor
    rollout_ids: Tensor
    group_offsets: Tensor
    tokens_per_group: int
    label: str

    @property
    def flops(self) -> float:
        counts = self.group_offsets.diff().double()
        return float(2 * (counts**2).sum() * self.hidden.shape[1])


@dataclass
class GAECase:
    rewards: Tensor
    values: Tensor
    mask: Tensor
    label: str

    @property
    def bytes_moved(self) -> int:
        """Each input read once, both outputs written once."""
        n = self.rewards.numel()
        return n * (self.rewards.element_size() + self.values.element_size() + self.mask.element_size() + 8)


def rollout_mask(rollouts: int, mean_length: int, generator: torch.Generator) -> Tensor:
    """Right-padded response masks with lengths spread over 0.5x..1.5x the mean."""
    lengths = (mean_length * (0.5 + torch.rand(rollouts, generator=generator))).long().clamp_min(1)
    width = int(lengths.max())
    return torch.arange(width)[None, :] < lengths[:, None]


def hista_case(groups: int, rollouts: int, tokens_per_group: int, hidden_size: int, dtype: torch.dtype,
               device: torch.device, seed: int = 0) -> HistaCase:
    gen = torch.Generator().manual_seed(seed)
    mask = rollout_mask(groups * rollouts, max(1, tokens_per_group // rollouts), gen)
    packing = Packing.from_padded(mask, torch.arange(groups * rollouts) // rollouts)
    n = packing.num_tokens
    group_of_token = torch.repeat_interleave(torch.arange(groups), packing.group_offsets.diff())
    directions = torch.randn(groups, hidden_size, generator=gen)
    noise = torch.randn(n, hidden_size, generator=gen)
    hidden = 8.0 * (directions[group_of_token] + noise)  # norms ~ 8*sqrt(2D): hundreds at D >= 256
    outcome = (torch.rand(groups * rollouts, generator=gen) < 0.5).float()
    returns = outcome[packing.rollout_ids.long()]
    return HistaCase(hidden.to(device=device, dtype=dtype), returns.to(device), packing.rollout_ids.to(device),
                     packing.group_offsets.to(device), tokens_per_group,
                     f"{groups}x{rollouts} rollouts, {n} tok, D={hidden_size}")


def gae_case(batch: int, length: int, device: torch.device, seed: int = 0) -> GAECase:
    gen = torch.Generator().manual_seed(seed)
    mask = rollout_mask(batch, int(length * 0.75), gen)
    mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))[:, :length]
    rewards = torch.zeros(batch, length)
    last = mask.sum(1) - 1
    rewards[torch.arange(batch), last] = (torch.rand(batch, generator=gen) < 0.5).float()
    values = torch.rand(batch, length, generator=gen)
    return GAECase(rewards.to(device), values.to(device), mask.to(device), f"B={batch} T={length}")


def reasoning_text(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        a, b = rng.randint(1, 500), rng.randint(1, 99)
        out.append(rng.choice([
            f"So {a} + {b} = {a + b}.", f"Each box holds {b} apples, so {a} boxes hold {a * b:,} apples.",
            f"The price is ${a}.{b:02d} per item.", f"Step {rng.randint(1, 9)}: {a} / {b} = {a / b:.2f}",
            "Therefore the answer is", "Let us compute the total first.", f"{a * b} - {b} = {a * b - b}",
            "We need to find how many are left.", f"That is {rng.randint(1, 99)}% of the total.",
        ]))
    return " ".join(out)


def numca_token_batch(tok, batch: int, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids [B, T] of math-reasoning-like text (numbers in ~13% of tokens) and right-padded masks."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < batch:
        ids = tok.encode(reasoning_text(rng, seq_len // 4), add_special_tokens=False).ids
        rows.append(ids[:seq_len])
    ids = torch.tensor(rows, dtype=torch.int64)
    # response masks of different lengths, as in a padded trainer batch
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    return ids, mask
