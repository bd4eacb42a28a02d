"""NumericVocab: for every token id, the bytes it contributes to the decoded text (docs/CONTRACT.md §2a), and the
compact per-token table the Numca kernels read.

Bytes. `from_tokenizer` runs the tokenizer's own decoder configuration (tokenizer.json "decoder")
on each vocabulary entry, as `tokenizers` does when the token is not the first of a sequence:
ByteLevel (GPT-2 / Llama-3 / Qwen), Metaspace and Replace('▁', ' ') (SentencePiece), ByteFallback
(<0x41> -> b"A"), WordPiece ("##" continuations, others get a leading space; its per-token cleanup),
BPEDecoder, Fuse, Strip and Sequence. Decoders it does not know (and tokenizers that are not backed
by `tokenizers`) fall back to decoding `[anchor, token]` and keeping what the token added. Special
tokens contribute the separator byte 0x00. Two things of a whole-text decode are deliberately not
reproduced, since they never change which numbers a text holds: what Metaspace, Strip and WordPiece
do to a sequence's *first* token only (drop its leading space, keep a "##"), and transformers' optional
`clean_up_tokenization_spaces` rewrite (" ." -> "."), which transformers itself refuses for BPE
tokenizers: it would invent numbers ("3 .14" -> "3.14") that the model never wrote. And a byte
token keeps its byte even inside an invalid UTF-8 run, where tokenizers' ByteFallback decoder
writes U+FFFD for every byte of the run, ASCII ones included (<0xC3><0x35> decodes to two U+FFFD,
the vocab says b"\xc35": the '5' the model wrote is still a digit, as a lossy UTF-8 decode keeps it).

Table. The grammar only needs 15 byte classes (a digit's value, ',', '.', '-', letter/underscore,
anything else); a token is stored as its class string, 4 bits a class, 16 to an int64 word, with
long digit-free stretches (farther than 2 bytes from a digit and from the token's ends) collapsed to
one "other" class, which provably changes no match. Beside it each token carries its transition
vectors for two small automata over classes (`FWD_*`: what the text so far means for a digit that
follows; `BWD_*`: what the text that follows means for a digit before it), so a kernel can find the
state at every token boundary with a parallel scan and never touch the bytes of digit-free tokens.

    table[v, 0]        forward transition of token v: next state of state s in bits 4s..4s+3
    table[v, 1]        backward transition (3 bits a state, bits 0..20) | class count << 24 | has_digit << 40
    table[v, 2 + w]    class codes 16w .. 16w+15 of token v, 4 bits each, CLS_END after the last
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

FORMAT = "sveb_kernels.NumericVocab/1"
SEPARATOR = b"\x00"

# ---- byte classes --------------------------------------------------------------------------------
# 0..9 are the digits themselves; the regex cannot tell the other bytes apart beyond these classes.
CLS_COMMA, CLS_DOT, CLS_MINUS, CLS_WORD, CLS_OTHER, CLS_END = 10, 11, 12, 13, 14, 15


def _byte_classes() -> np.ndarray:
    classes = np.full(256, CLS_OTHER, dtype=np.uint8)
    classes[ord("0"):ord("9") + 1] = np.arange(10)
    classes[ord(",")], classes[ord(".")], classes[ord("-")] = CLS_COMMA, CLS_DOT, CLS_MINUS
    for lo, hi in (("A", "Z"), ("a", "z"), ("_", "_")):
        classes[ord(lo):ord(hi) + 1] = CLS_WORD
    return classes


BYTE_CLASS = _byte_classes()

# ---- forward automaton: the state after a byte, as far as a following digit cares ----------------
FWD_O = 0    # start, after "other" or ',' : a digit here starts a number
FWD_OC = 1   # ',' right after a 1..3 digit run of a number: a 3-digit run here continues it
FWD_W = 2    # after a letter, '_' or a '.' that ends no number: a digit here is in no number
FWD_DA = 3   # '.' right after a number's integer run: a digit here starts its fraction
FWD_MS = 4   # '-' preceded by none of [0-9A-Za-z_.]: a digit here starts a negative number
FWD_A1, FWD_A2, FWD_A3, FWD_A4 = 5, 6, 7, 8   # in an integer run of a number, 1, 2, 3, >=4 digits so far
FWD_F = 9    # in a number's fraction run
FWD_I = 10   # in a digit run that is no number (after a letter or '.')
FWD_STATES = 11


def _forward_table() -> np.ndarray:
    delta = np.zeros((FWD_STATES, 16), dtype=np.uint8)
    for s in range(FWD_STATES):
        delta[s, CLS_END] = s  # padding leaves the state alone
        digit = {FWD_O: FWD_A1, FWD_OC: FWD_A1, FWD_MS: FWD_A1, FWD_W: FWD_I, FWD_DA: FWD_F, FWD_A1: FWD_A2,
                 FWD_A2: FWD_A3, FWD_A3: FWD_A4, FWD_A4: FWD_A4, FWD_F: FWD_F, FWD_I: FWD_I}[s]
        delta[s, 0:10] = digit
        delta[s, CLS_COMMA] = FWD_OC if s in (FWD_A1, FWD_A2, FWD_A3) else FWD_O
        delta[s, CLS_DOT] = FWD_DA if s in (FWD_A1, FWD_A2, FWD_A3, FWD_A4) else FWD_W
        # a '-' whose previous byte is not in [0-9A-Za-z_.] may be a sign; otherwise it is just "other"
        delta[s, CLS_MINUS] = FWD_MS if s in (FWD_O, FWD_OC, FWD_MS) else FWD_O
        delta[s, CLS_WORD] = FWD_W
        delta[s, CLS_OTHER] = FWD_O
    return delta


FWD_DELTA = _forward_table()

# ---- backward automaton: the state of the text from a byte on, as far as a digit before it cares --
BWD_N = 0                                # empty, or starts with a byte that extends nothing
BWD_D1, BWD_D2, BWD_D3, BWD_D4 = 1, 2, 3, 4   # exactly 1, 2, 3 digits then a non-digit; >= 4 digits
BWD_G = 5                                # ',' + exactly 3 digits + non-digit: a thousands group
BWD_FR = 6                               # '.' + a digit: a fraction
BWD_STATES = 7


def _backward_table() -> np.ndarray:
    beta = np.zeros((BWD_STATES, 16), dtype=np.uint8)
    for s in range(BWD_STATES):
        beta[s, CLS_END] = s
        beta[s, 0:10] = {BWD_D1: BWD_D2, BWD_D2: BWD_D3, BWD_D3: BWD_D4, BWD_D4: BWD_D4}.get(s, BWD_D1)
        beta[s, CLS_COMMA] = BWD_G if s == BWD_D3 else BWD_N
        beta[s, CLS_DOT] = BWD_FR if s in (BWD_D1, BWD_D2, BWD_D3, BWD_D4) else BWD_N
        beta[s, CLS_MINUS] = beta[s, CLS_WORD] = beta[s, CLS_OTHER] = BWD_N
    return beta


BWD_DELTA = _backward_table()

# ---- table layout ---------------------------------------------------------------------------------
COL_FWD, COL_META, COL_CLASSES = 0, 1, 2
META_LEN_SHIFT, META_LEN_MASK, META_DIGIT_SHIFT = 24, 0xFFFF, 40
CLASSES_PER_WORD = 16
# A separator byte (masked token, special token): one "other" class, which resets both automata.
SEPARATOR_FWD = 0                       # every state -> FWD_O
SEPARATOR_META = 1 << META_LEN_SHIFT    # every state -> BWD_N, one class, no digit


def _separator_word() -> int:
    nibbles = [CLS_OTHER] + [CLS_END] * (CLASSES_PER_WORD - 1)
    value = sum(c << (4 * i) for i, c in enumerate(nibbles))
    return value - (1 << 64) if value >= 1 << 63 else value


SEPARATOR_WORD = _separator_word()


def build_table(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """The kernels' per-token table (module docstring) from the tokens' bytes, vectorized over the vocab."""
    lengths = np.diff(offsets).astype(np.int64)
    vocab_size = lengths.shape[0]
    token = np.repeat(np.arange(vocab_size), lengths)
    pos = np.arange(data.shape[0], dtype=np.int64) - offsets[:-1][token]
    cls = BYTE_CLASS[data]
    digit = cls < 10

    # Keep every byte within 2 of a digit or of the token's ends; collapse each other stretch to one
    # "other": the grammar never looks farther than 2 bytes from a digit.
    keep = digit | (pos < 2) | (pos >= lengths[token] - 2)
    for k in (1, 2):
        same = token[k:] == token[:-k]
        keep[k:] |= digit[:-k] & same
        keep[:-k] |= digit[k:] & same
    dropped = ~keep
    first_dropped = dropped.copy()
    first_dropped[1:] &= ~(dropped[:-1] & (token[1:] == token[:-1]))
    out = keep | first_dropped
    out_cls = np.where(keep, cls, CLS_OTHER)[out].astype(np.uint8)
    out_token = token[out]
    counts = np.bincount(out_token, minlength=vocab_size).astype(np.int64)
    out_offsets = np.concatenate([[0], np.cumsum(counts)])
    out_pos = np.arange(out_cls.shape[0], dtype=np.int64) - out_offsets[:-1][out_token]

    width = max(1, int(-(-int(counts.max(initial=0)) // CLASSES_PER_WORD)))
    padded = np.full((vocab_size, width * CLASSES_PER_WORD), CLS_END, dtype=np.uint8)
    padded[out_token, out_pos] = out_cls
    shifts = (4 * np.arange(CLASSES_PER_WORD, dtype=np.uint64))
    words = (padded.reshape(vocab_size, width, CLASSES_PER_WORD).astype(np.uint64) << shifts).sum(
        axis=2, dtype=np.uint64)

    # Transition vectors: run both automata from every state over each token's classes at once.
    longest = int(counts.max(initial=0))
    fwd = np.broadcast_to(np.arange(FWD_STATES, dtype=np.uint8), (vocab_size, FWD_STATES)).copy()
    for j in range(longest):
        fwd = FWD_DELTA[fwd, padded[:, j:j + 1]]
    bwd = np.broadcast_to(np.arange(BWD_STATES, dtype=np.uint8), (vocab_size, BWD_STATES)).copy()
    for j in reversed(range(longest)):
        bwd = BWD_DELTA[bwd, padded[:, j:j + 1]]
    fwd_packed = (fwd.astype(np.uint64) << (4 * np.arange(FWD_STATES, dtype=np.uint64))).sum(axis=1, dtype=np.uint64)
    bwd_packed = (bwd.astype(np.uint64) << (3 * np.arange(BWD_STATES, dtype=np.uint64))).sum(axis=1, dtype=np.uint64)
    has_digit = np.bincount(token[digit], minlength=vocab_size) > 0
    meta = (bwd_packed | (counts.astype(np.uint64) << np.uint64(META_LEN_SHIFT))
            | (has_digit.astype(np.uint64) << np.uint64(META_DIGIT_SHIFT)))
    table = np.concatenate([fwd_packed[:, None], meta[:, None], words], axis=1)
    return table.view(np.int64)


# ---- per-token bytes from a tokenizer's decoder -----------------------------------------------------
class _Unsupported(Exception):
    pass


def _byte_level_translation() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes (the ByteLevel alphabet), inverted: char -> byte as latin-1."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    inverse = {ord(ch): chr(b) for b, ch in table.items()}
    # A char below 256 that is no stand-in makes the decoder keep the token's UTF-8 as it is; map it
    # to a char latin-1 cannot encode so that the fallback below triggers.
    for b in range(256):
        if b not in inverse:
            inverse[b] = "\uffff"
    return inverse


_BYTE_LEVEL = _byte_level_translation()
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_WORDPIECE_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                      (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _raw(b: bytes) -> str:
    """Raw bytes carried through str-based decoders unchanged (surrogateescape round-trips them)."""
    return b.decode("utf-8", "surrogateescape")


def _apply_decoder(pieces: list[str], cfg: Optional[dict], fused: list[bool]) -> list[str]:
    if cfg is None:  # tokenizers joins the tokens with spaces
        return [" " + p for p in pieces]
    kind = cfg.get("type")
    if kind == "Sequence":
        for sub in cfg["decoders"]:
            pieces = _apply_decoder(pieces, sub, fused)
        return pieces
    if kind == "ByteLevel":
        out = []
        for p in pieces:
            try:
                out.append(_raw(p.translate(_BYTE_LEVEL).encode("latin-1")))
            except UnicodeEncodeError:
                out.append(p)  # a char outside the byte alphabet: the token's text is kept as it is
        return out
    if kind == "ByteFallback":
        return [_raw(bytes([int(m.group(1), 16)])) if (m := _BYTE_TOKEN.match(p)) else p for p in pieces]
    if kind == "Metaspace":
        return [p.replace(cfg.get("replacement", "▁"), " ") for p in pieces]
    if kind == "Replace":
        pattern, content = cfg["pattern"], cfg["content"]
        if "String" in pattern:
            return [p.replace(pattern["String"], content) for p in pieces]
        regex = re.compile(pattern["Regex"])
        return [regex.sub(content.replace("\\", "\\\\"), p) for p in pieces]
    if kind == "WordPiece":
        prefix = cfg.get("prefix", "##")
        out = [p[len(prefix):] if p.startswith(prefix) else " " + p for p in pieces]
        if cfg.get("cleanup", True):
            for dirty, clean in _WORDPIECE_CLEANUP:
                out = [p.replace(dirty, clean) for p in out]
        return out
    if kind == "BPEDecoder":
        suffix = cfg.get("suffix", "</w>")
        return [p.replace(suffix, " ") for p in pieces]
    if kind == "Fuse":
        fused[0] = True
        return pieces
    if kind == "Strip":
        if fused[0]:  # after Fuse it only trims the whole text's ends
            return pieces
        content, start, stop = cfg["content"], int(cfg["start"]), int(cfg["stop"])
        out = []
        for p in pieces:
            lead = 0
            while lead < start and lead < len(p) and p[lead] == content:
                lead += 1
            trail = 0
            while trail < stop and trail < len(p) - lead and p[len(p) - 1 - trail] == content:
                trail += 1
            out.append(p[lead:len(p) - trail])
        return out
    raise _Unsupported(f"decoder {kind!r}")


def _backend_of(tokenizer):
    """The `tokenizers.Tokenizer` behind a tokenizer object, or None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers comes with every HF tokenizer
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for name in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, name, None)
        if isinstance(backend, Tokenizer):
            return backend
    return None


def _special_ids(tokenizer, backend, vocab_size: int) -> set[int]:
    ids = set()
    if backend is not None:
        ids |= {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    ids |= {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(added, dict):
        ids |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    return {i for i in ids if 0 <= i < vocab_size}


def _decode_difference(decode, vocab_size: int, specials: set[int]) -> list[bytes]:
    """What each token adds after an anchor token: works for any decoder, ~10 us a token. Two
    anchors, so that a token is never decoded after itself (CTC-like decoders merge repeats)."""
    anchors = []
    for i in range(min(vocab_size, 4096)):
        text = decode([i])
        if i not in specials and len(text) == 1 and text.isascii() and text.isalpha():
            anchors.append(i)
            if len(anchors) == 2:
                break
    if not anchors:
        raise ValueError("could not find a plain one-letter token to decode the vocabulary against")
    bases = [decode([a]) for a in anchors]
    out = []
    for i in range(vocab_size):
        which = 1 if i == anchors[0] and len(anchors) > 1 else 0
        text = decode([anchors[which], i])
        base = bases[which]
        out.append(text[len(base):].encode("utf-8") if text.startswith(base) else decode([i]).encode("utf-8"))
    return out


def _generic_decode_fn(tokenizer):
    def decode(ids):
        try:
            return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except TypeError:
            return tokenizer.decode(ids)
    return decode


class NumericVocab:
    """For every token id, the bytes it contributes to the decoded text (docs/CONTRACT.md §2a).

    Build with `NumericVocab.from_tokenizer(tokenizer)` (a `tokenizers.Tokenizer` or any transformers
    tokenizer) or `NumericVocab.from_token_bytes(list_of_bytes)`. `vocab.table` is the int64
    [V, 2 + W] tensor the ops take (on `vocab.device`; `vocab.to(device)` moves it); the bytes stay
    on the CPU. `save(path)` / `NumericVocab.load(path)` store the bytes (the table is rebuilt).
    """

    def __init__(self, offsets: Tensor, data: Tensor, special: Optional[Tensor] = None, *,
                 table: Optional[Tensor] = None, device: Union[torch.device, str, None] = None):
        offsets = torch.as_tensor(offsets, dtype=torch.int64).cpu()
        data = torch.as_tensor(data, dtype=torch.uint8).cpu()
        if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != data.numel() \
                or (offsets.numel() > 1 and bool((offsets.diff() < 0).any())):
            raise ValueError("offsets must be [V+1] non-decreasing from 0 to len(data)")
        vocab_size = offsets.numel() - 1
        if special is None:
            special = torch.zeros(vocab_size, dtype=torch.bool)
        special = torch.as_tensor(special).bool().cpu()
        if special.shape != (vocab_size,):
            raise ValueError(f"special must have shape [{vocab_size}], got {list(special.shape)}")
        self.offsets, self.data, self.special = offsets, data, special
        if table is None:
            table = torch.from_numpy(build_table(offsets.numpy(), data.numpy()))
        self.table = table.to(device) if device is not None else table

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_token_bytes(cls, token_bytes: Sequence[bytes], special_ids: Iterable[int] = ()) -> "NumericVocab":
        """From each token's bytes; tokens in `special_ids` become the separator byte 0x00."""
        special = torch.zeros(len(token_bytes), dtype=torch.bool)
        for i in special_ids:
            special[int(i)] = True
        pieces = [SEPARATOR if special[i] else bytes(b) for i, b in enumerate(token_bytes)]
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        data = np.frombuffer(b"".join(pieces), dtype=np.uint8).copy()
        return cls(torch.from_numpy(offsets), torch.from_numpy(data), special)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "NumericVocab":
        """From a Hugging Face tokenizer: `tokenizers.Tokenizer`, transformers' fast tokenizers (via
        their `backend_tokenizer`), or anything with `decode(ids)` and `len()` (decoded token by token)."""
        backend = _backend_of(tokenizer)
        if backend is not None:
            vocab = backend.get_vocab(with_added_tokens=True)
            vocab_size = max(vocab.values(), default=-1) + 1
            if tokenizer is not backend and hasattr(tokenizer, "__len__"):
                vocab_size = max(vocab_size, len(tokenizer))
            pieces = [""] * vocab_size
            for piece, i in vocab.items():
                pieces[i] = piece
            specials = _special_ids(tokenizer, backend, vocab_size)
            decoder = json.loads(backend.to_str()).get("decoder")
            try:
                texts = _apply_decoder(pieces, decoder, [False])
                token_bytes = [t.encode("utf-8", "surrogateescape") for t in texts]
            except _Unsupported:
                decode = lambda ids: backend.decode(ids, skip_special_tokens=False)  # noqa: E731
                token_bytes = _decode_difference(decode, vocab_size, specials)
            return cls.from_token_bytes(token_bytes, specials)
        if not hasattr(tokenizer, "decode"):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        vocab_size = len(tokenizer)
        specials = _special_ids(tokenizer, None, vocab_size)
        return cls.from_token_bytes(_decode_difference(_generic_decode_fn(tokenizer), vocab_size, specials), specials)

    # -- access --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.table.device

    def token_bytes(self, token_id: int) -> bytes:
        lo, hi = int(self.offsets[token_id]), int(self.offsets[token_id + 1])
        return self.data[lo:hi].numpy().tobytes()

    def decode(self, token_ids: Iterable[int]) -> bytes:
        """The concatenated bytes of a sequence (what numeric_spans reads)."""
        return b"".join(self.token_bytes(int(i)) for i in token_ids)

    def to(self, device: Union[torch.device, str]) -> "NumericVocab":
        return NumericVocab(self.offsets, self.data, self.special, table=self.table, device=device)

    def __repr__(self) -> str:
        return (f"NumericVocab(size={len(self)}, special={int(self.special.sum())}, "
                f"table={list(self.table.shape)}, device={self.device})")

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        torch.save({"format": FORMAT, "offsets": self.offsets, "data": self.data, "special": self.special}, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[torch.device, str, None] = None) -> "NumericVocab":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a saved NumericVocab ({FORMAT})")
        return cls(state["offsets"], state["data"], state["special"], device=device)
