"""NumericVocab (docs/CONTRACT.md §2a): each token's bytes are what the tokenizer's own decode produces."""

import pathlib
import random
import re

import pytest
import torch

from numca_cases import FAMILIES, special_ids, tokenizer_and_vocab
from sveb_kernels.numca import NumericVocab, numeric_spans, toy_tokenizers
from sveb_kernels.numca.vocab import COL_CLASSES, build_table


def collapse_non_ascii(data: bytes) -> bytes:
    """Non-ASCII runs may differ in length (U+FFFD vs raw bytes) but never in where they are."""
    return re.sub(rb"[\x80-\xff]+", b"\x80", data)


def byte_fallback_ids(tok) -> set[int]:
    return {i for p, i in tok.get_vocab(with_added_tokens=True).items() if re.fullmatch(r"<0x[0-9A-F]{2}>", p)}


def anchor_id(tok) -> int:
    for piece in ("x", "▁x"):
        if tok.token_to_id(piece) is not None:
            return tok.token_to_id(piece)
    raise AssertionError("no anchor token")


def assert_matches_decode(tok, vocab, ids, anchor):
    """After an anchor token (so no token is first, where decoders drop a leading space)."""
    seq = [anchor] + ids
    want = tok.decode(seq, skip_special_tokens=False).encode("utf-8")[len(tok.decode([anchor]).encode("utf-8")):]
    got = vocab.decode(seq)[len(vocab.token_bytes(anchor)):]
    assert collapse_non_ascii(got) == collapse_non_ascii(want), (ids, got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_bytes_equal_decoded_text(seed, family):
    tok, vocab = tokenizer_and_vocab(family)
    assert len(vocab) == tok.get_vocab_size(with_added_tokens=True)
    excluded = special_ids(vocab) | byte_fallback_ids(tok)  # byte tokens: test_byte_fallback_*
    choices = [i for i in range(len(vocab)) if i not in excluded]
    rng = random.Random(seed)
    anchor = anchor_id(tok)
    for _ in range(200):
        assert_matches_decode(tok, vocab, [rng.choice(choices) for _ in range(rng.randint(1, 25))], anchor)


@pytest.mark.parametrize("family", FAMILIES)
def test_encoded_text_round_trips(seed, family):
    from numca_cases import random_text

    tok, vocab = tokenizer_and_vocab(family)
    rng = random.Random(seed)
    for _ in range(20):
        ids = [i for i in tok.encode(random_text(rng, 20), add_special_tokens=False).ids
               if i not in special_ids(vocab)]  # <unk> of unknown characters: see the test below
        assert_matches_decode(tok, vocab, ids, anchor_id(tok))


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_are_one_separator_byte(family):
    tok, vocab = tokenizer_and_vocab(family)
    specials = special_ids(vocab)
    assert {tok.token_to_id(t) for t in toy_tokenizers.SPECIAL_TOKENS[family]} <= specials
    for i in specials:
        assert vocab.token_bytes(i) == b"\x00"
    for t in toy_tokenizers.PLAIN_ADDED_TOKENS[family]:  # added but not special: their text
        assert vocab.token_bytes(tok.token_to_id(t)) == t.encode()


def test_byte_level_tokens_hold_raw_bytes():
    tok, vocab = tokenizer_and_vocab("gpt2")
    ids = tok.encode("é€12", add_special_tokens=False).ids
    assert vocab.decode(ids) == "é€12".encode("utf-8")
    assert any(len(vocab.token_bytes(i)) == 1 and vocab.token_bytes(i)[0] >= 0x80 for i in ids)  # split chars


def test_byte_fallback_tokens():
    tok, vocab = tokenizer_and_vocab("llama2")
    assert vocab.token_bytes(tok.token_to_id("<0x41>")) == b"A"
    assert vocab.token_bytes(tok.token_to_id("<0xC3>")) == b"\xc3"
    ids = tok.encode("x 日本 1", add_special_tokens=False).ids
    assert vocab.decode(ids) == " x 日本 1".encode("utf-8")  # the first token's space is kept (see vocab.py)


def test_byte_fallback_invalid_run_keeps_ascii_bytes():
    """Decision: tokenizers' ByteFallback turns an invalid run <0xC3><0x35> into two U+FFFD, losing the
    ASCII '5'; the vocab keeps each byte (like a lossy UTF-8 decode), so the '5' is still a digit."""
    tok, vocab = tokenizer_and_vocab("llama2")
    ids = [tok.token_to_id("<0xC3>"), tok.token_to_id("<0x35>")]
    assert tok.decode(ids) == "\ufffd\ufffd"
    assert vocab.decode(ids) == b"\xc35"


def test_wordpiece_continuations_and_cleanup():
    tok, vocab = tokenizer_and_vocab("bert")
    ids = tok.encode("12345 , 3.5", add_special_tokens=False).ids
    text = vocab.decode(ids)
    assert text.lstrip(b" ") == tok.decode(ids).encode()  # "12345, 3. 5": the decoder's own spacing
    assert any(tok.id_to_token(i).startswith("##") for i in ids)


def test_save_load_round_trip(tmp_path):
    _, vocab = tokenizer_and_vocab("llama3")
    path = tmp_path / "vocab.pt"
    vocab.save(path)
    loaded = NumericVocab.load(path)
    for name in ("offsets", "data", "special", "table"):
        assert torch.equal(getattr(loaded, name), getattr(vocab, name)), name
    with pytest.raises(ValueError, match="NumericVocab"):
        torch.save({"format": "something else"}, tmp_path / "other.pt")
        NumericVocab.load(tmp_path / "other.pt")


def test_to_device_moves_the_table_only():
    _, vocab = tokenizer_and_vocab("qwen2")
    moved = vocab.to("meta")
    assert moved.device.type == "meta" and moved.table.shape == vocab.table.shape
    assert moved.data.device.type == "cpu" and moved.token_bytes(5) == vocab.token_bytes(5)
    assert vocab.device.type == "cpu"


def test_transformers_tokenizer(seed):
    pytest.importorskip("transformers")
    for family in ("llama3", "llama2", "bert"):
        wrapped = toy_tokenizers.transformers_wrapper(family)
        _, vocab = tokenizer_and_vocab(family)
        from_hf = NumericVocab.from_tokenizer(wrapped)
        assert torch.equal(from_hf.offsets, vocab.offsets) and torch.equal(from_hf.data, vocab.data)
        assert torch.equal(from_hf.special, vocab.special)


class DecodeOnly:
    """A tokenizer known only by decode() and len(): the generic (decode-difference) path."""

    def __init__(self, tok, specials):
        self._tok, self.all_special_ids = tok, sorted(specials)

    def __len__(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("family", ["gpt2", "t5", "bert"])
def test_decode_only_tokenizer_gives_the_same_ascii(family):
    tok, vocab = tokenizer_and_vocab(family)
    generic = NumericVocab.from_tokenizer(DecodeOnly(tok, special_ids(vocab)))
    assert torch.equal(generic.special, vocab.special)
    for i in range(len(vocab)):
        assert collapse_non_ascii(generic.token_bytes(i)) == collapse_non_ascii(vocab.token_bytes(i)), i


def test_unknown_decoder_falls_back_to_decoding():
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.WordLevel({"a": 0, "1": 1, "2": 2, "<pad>": 3, ".": 4, "b": 5}, unk_token="<pad>"))
    tok.decoder = decoders.CTC(pad_token="<pad>", word_delimiter_token="|", cleanup=False)  # context-dependent
    vocab = NumericVocab.from_tokenizer(tok)
    assert [vocab.token_bytes(i) for i in range(6)] == [b"a", b"1", b"2", b"", b".", b"b"]


def test_not_a_tokenizer():
    with pytest.raises(TypeError, match="tokenizer"):
        NumericVocab.from_tokenizer(object())


def test_table_collapses_long_digit_free_stretches():
    pieces = [b"abcdefghijklmnopqrstuvwxyz-", b"word 12345678901234567890123456789012345 and the rest of it", b"",
              b"\x00"]
    offsets = torch.tensor([0] + [sum(map(len, pieces[:i + 1])) for i in range(len(pieces))])
    table = build_table(offsets.numpy(), torch.tensor(list(b"".join(pieces)), dtype=torch.uint8).numpy())
    length = (table[:, 1] >> 24) & 0xFFFF
    # 2 + other + 2 at the ends; the digits keep 2 bytes on each side: wo?d_<35 digits>_a?it
    assert length.tolist() == [5, 2 + 1 + 2 + 35 + 2 + 1 + 2, 0, 1]
    assert table.shape[1] == COL_CLASSES + 3
    vocab = NumericVocab.from_token_bytes(pieces)
    spans = numeric_spans(torch.tensor([[1, 0, 1, 2, 1]]), vocab)
    assert spans.end[0].tolist() == [True, False, True, False, True]
    assert spans.start[0].tolist() == [0, -1, 2, -1, 4]


def test_from_token_bytes_marks_specials():
    vocab = NumericVocab.from_token_bytes([b"1", b"<eos>", b"2"], special_ids=[1])
    assert vocab.token_bytes(1) == b"\x00" and vocab.special.tolist() == [False, True, False]
    spans = numeric_spans(torch.tensor([[0, 1, 2, 0, 2]]), vocab)
    assert spans.end[0].tolist() == [True, False, False, False, True]  # "1\x00212"


@pytest.mark.parametrize("family", toy_tokenizers.FAMILIES)
def test_toy_transformers_tokenizer_pads_a_batch(family):
    """The toy tokenizers stand in for real ones in trainers: padding a batch must work, with the real
    family's special-token roles."""
    pytest.importorskip("transformers")
    tok = toy_tokenizers.transformers_wrapper(family)
    roles = toy_tokenizers.SPECIAL_TOKEN_ROLES[family]
    for role, token in roles.items():
        assert getattr(tok, role) == token and getattr(tok, role + "_id") == tok.convert_tokens_to_ids(token)
    assert tok.pad_token is not None and tok.eos_token_id is not None or family == "bert"
    batch = tok(["So 12 + 30 = 42.", "The total price is 1,234.50 dollars, so we get 7"], padding=True)
    short, long_ = batch["input_ids"]
    assert len(short) == len(long_) > 0
    pads = [i for i, m in zip(short, batch["attention_mask"][0]) if m == 0]
    assert pads and set(pads) == {tok.pad_token_id}
    # The roles do not change the bytes NumericVocab reads.
    _, vocab = tokenizer_and_vocab(family)
    assert torch.equal(NumericVocab.from_tokenizer(tok).data, vocab.data)


def test_toy_tokenizers_are_documented():
    doc = toy_tokenizers.__doc__
    assert all(family in doc for family in toy_tokenizers.FAMILIES) and "four" not in doc
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "toy_tokenizers" in readme and "transformers_wrapper" in readme
