"""Small tokenizers of six Hugging Face families, trained locally (no hub access needed).

They have the same model types, pre-tokenizers, decoders and special tokens as the real ones, with a
vocabulary of a few thousand tokens trained in well under a second on generated text full of numbers:

    gpt2      byte-level BPE, digits merged freely (GPT-2, GPT-J, NeoX)
    llama3    byte-level BPE whose pre-tokenizer groups digits by at most 3 (Llama-3)
    qwen2     byte-level BPE whose pre-tokenizer isolates every digit (Qwen2/2.5/3)
    llama2    SentencePiece-style BPE: metaspace, digits split, byte fallback (<0x41>), decoder
              Replace/ByteFallback/Fuse/Strip (Llama-2, Mistral)
    t5        SentencePiece-style Unigram with a Metaspace decoder (T5, ALBERT, XLNet)
    bert      WordPiece with "##" continuations and the cleanup decoder (BERT)

`build(family)` returns a `tokenizers.Tokenizer`; `SPECIAL_TOKENS[family]` lists its special tokens;
`transformers_wrapper(family)` is the same tokenizer as a transformers tokenizer with the family's
bos/eos/pad tokens set (`SPECIAL_TOKEN_ROLES`), so `tok(texts, padding=True)` works.
Used by the tests and by `bench/` (and usable by anyone who wants to try Numca without a download).
"""

from __future__ import annotations

import functools
import random

FAMILIES = ("gpt2", "llama3", "qwen2", "llama2", "t5", "bert")

SPECIAL_TOKENS = {
    "gpt2": ["<|endoftext|>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama2": ["<unk>", "<s>", "</s>"],
    "t5": ["<pad>", "</s>", "<unk>"],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
}
# The roles of the special tokens, as in the real tokenizers. Where the real one has no pad token
# (GPT-2, Llama, Qwen) pad is its eos, as RL trainers set it before padding a batch.
SPECIAL_TOKEN_ROLES = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"},
    "qwen2": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},  # Qwen has no bos token
    "llama2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    "t5": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "bert": {"cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
             "mask_token": "[MASK]"},
}
# Added tokens that are not special: they decode to their text like any other token.
PLAIN_ADDED_TOKENS = {"qwen2": ["<think>", "</think>"], "llama3": [], "gpt2": [], "llama2": [], "t5": [], "bert": []}

# GPT-2's pre-tokenizer pattern, and the Llama-3 / Qwen2 ones (which cut digit runs into groups).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_WORDS = ("the total price is and of step answer so we get x y value apples cost each per km hours "
          "version id item_3 costs equals Therefore remaining left sum product v2 abc").split()


def training_corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic text with numbers in every form (ints, decimals, 1,234,567, signs, dates, ids)."""
    rng = random.Random(seed)

    def number() -> str:
        kind = rng.random()
        if kind < 0.25:
            return str(rng.randint(0, 10 ** rng.randint(1, 7)))
        if kind < 0.45:
            return f"{rng.uniform(-500, 500):.{rng.randint(1, 4)}f}"
        if kind < 0.6:
            return f"{rng.randint(1000, 10 ** 9):,}"
        if kind < 0.7:
            return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if kind < 0.8:
            return f"${rng.randint(1, 99999):,}.{rng.randint(0, 99):02d}"
        if kind < 0.9:
            return f"{rng.randint(1, 99)}%"
        return str(rng.randint(0, 99))

    out = []
    for _ in range(lines):
        parts = [rng.choice(_WORDS) if rng.random() < 0.6 else number() for _ in range(rng.randint(5, 25))]
        out.append(" ".join(parts) + rng.choice([".", "!", "?", ",", ":", " =", ""]))
    out.append("café naïve déjà vu € £ ¥ – — “quoted” ½ ² 日本語 中文 😀")  # non-ASCII: byte-level merges
    return out


def _byte_level(pattern: str | None, vocab_size: int, corpus: list[str], specials, plain):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tok


def _llama2(vocab_size: int, corpus: list[str], specials):
    """SentencePiece BPE as converted by transformers for Llama-2: 256 byte tokens <0x00>..<0xFF> for
    characters outside the (deliberately small) alphabet, '▁' for spaces, digits split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
                                   pre_tokenizers.Digits(individual_digits=True)])
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, limit_alphabet=70,
                                  show_progress=False)
    scratch.train_from_iterator(corpus, trainer)
    trained = scratch.get_vocab()
    # Re-number: specials, then the byte tokens, then the trained pieces (as the real Llama-2 vocab is laid out).
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    import json

    merges = json.loads(scratch.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    return tok


def _t5(vocab_size: int, corpus: list[str], specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def _bert(vocab_size: int, corpus: list[str], specials):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


@functools.lru_cache(maxsize=None)
def _build_cached(family: str, vocab_size: int):
    corpus = training_corpus()
    specials = SPECIAL_TOKENS[family]
    if family == "gpt2":
        return _byte_level(None, vocab_size, corpus, specials, PLAIN_ADDED_TOKENS[family])
    if family == "llama3":
        return _byte_level(_LLAMA3_PATTERN, vocab_size, corpus, specials, PLAIN_ADDED_TOKENS[family])
    if family == "qwen2":
        return _byte_level(_QWEN2_PATTERN, vocab_size, corpus, specials, PLAIN_ADDED_TOKENS[family])
    if family == "llama2":
        return _llama2(vocab_size, corpus, specials)
    if family == "t5":  # the Unigram trainer is the slow one: a third of the text is plenty
        return _t5(vocab_size, corpus[: len(corpus) // 3], specials)
    if family == "bert":
        return _bert(vocab_size, corpus, specials)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def build(family: str, vocab_size: int = 2000):
    """A freshly trained `tokenizers.Tokenizer` of `family` (cached: the same object per arguments)."""
    return _build_cached(family, vocab_size)


def transformers_wrapper(family: str, vocab_size: int = 2000):
    """The same tokenizer behind transformers' PreTrainedTokenizerFast (needs `transformers`), with the
    family's special-token roles (SPECIAL_TOKEN_ROLES), so padding a batch works."""
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS[family]
    return PreTrainedTokenizerFast(tokenizer_object=build(family, vocab_size), clean_up_tokenization_spaces=False,
                                   additional_special_tokens=specials, **SPECIAL_TOKEN_ROLES[family])
