"""A real Hugging Face tokenizer and a tiny transformers causal LM, both built locally for the
embedded task: no download, a few seconds of CPU.

The tokenizer is a byte-level BPE (the GPT-2/Qwen/Llama-3 family) whose merges are written here
rather than learned, so it is identical on every machine: digit pairs ("19" is one token, "123" is
"12" + "3"), the spaced operators, and the task's two words. The model is a 2-layer Llama with
random weights, optionally trained for a few hundred steps on text from the task's policy, which
makes its hidden states those of a model that has seen the format.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

EOS = "<|endoftext|>"
_WORDS = ("Compute", "Answer")


def _merges() -> list[tuple[str, str]]:
    digits = "0123456789"
    merges = [(a, b) for a in digits for b in digits]
    merges += [("Ġ", op) for op in "=+-"]  # 'Ġ' is byte-level BPE's name for the space byte
    for word in _WORDS:
        for i in range(1, len(word)):
            merges.append((word[:i], word[i]))
    return merges


def build_tokenizer():
    """A transformers PreTrainedTokenizerFast over a hand-written byte-level BPE; EOS doubles as pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = _merges()
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[EOS] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS)


def build_model(tokenizer, *, seed: int = 0, hidden_size: int = 64, layers: int = 2, max_positions: int = 512):
    """A randomly initialised transformers LlamaForCausalLM sized for a 2-core CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def train_model(model, sequences: Sequence[Sequence[int]], *, steps: int, pad_id: int, batch_size: int = 32,
                lr: float = 3e-3, seed: int = 0, log: Optional[Callable[[str], None]] = None):
    """Next-token training on `sequences` (token id lists) for `steps` AdamW steps; returns the model in eval mode."""
    if steps <= 0:
        return model.eval()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    started = time.perf_counter()
    loss = float("nan")
    threads = torch.get_num_threads()
    # Matrices this small gain nothing from a second thread, and OpenMP threads that spin while a
    # neighbour holds the other core make every step many times slower.
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            loss = _train_step(model, optimizer, sequences, pad_id, batch_size, generator)
            # Linear decay keeps the short run stable without a schedule dependency.
            for group in optimizer.param_groups:
                group["lr"] = lr * (1.0 - (step + 1) / steps)
    finally:
        torch.set_num_threads(threads)
    if log is not None:
        log(f"tiny model: {steps} steps in {time.perf_counter() - started:.1f}s, final loss {loss:.3f}")
    return model.eval()


def _train_step(model, optimizer, sequences, pad_id, batch_size, generator) -> float:
    pick = torch.randint(0, len(sequences), (batch_size,), generator=generator).tolist()
    length = max(len(sequences[i]) for i in pick)
    ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
    attention = torch.zeros(batch_size, length, dtype=torch.long)
    for row, i in enumerate(pick):
        ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
        attention[row, : len(sequences[i])] = 1
    labels = ids.masked_fill(attention == 0, -100)
    loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
