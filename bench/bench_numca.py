"""pytest-benchmark for Numca: `pytest bench/bench_numca.py --benchmark-only`.

numeric_spans per backend next to the decode + regex + bisect baseline (sveb_kernels.benchmark.baselines;
bench/numca_vs_regex.py also writes the CSV and checks its targets), on B=64 rows of T=1024 tokens of a
locally trained Llama-3-style tokenizer; and numca_values per match mode.
"""

import pytest
import torch

from sveb_kernels.benchmark.baselines import regex_baseline  # noqa: E402
from sveb_kernels.benchmark.cases import numca_token_batch  # noqa: E402
import sveb_kernels as sk  # noqa: E402
from sveb_kernels.numca import NumericVocab, toy_tokenizers  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = sk.available_backends(DEVICE)


@pytest.fixture(scope="module")
def batch():
    tok = toy_tokenizers.build("llama3")
    vocab = NumericVocab.from_tokenizer(tok)
    ids, mask = numca_token_batch(tok, 64, 1024)
    return tok, vocab, ids, mask


@pytest.mark.parametrize("impl", ["baseline"] + BACKENDS["numeric_spans"])
def test_numeric_spans(benchmark, batch, impl):
    tok, vocab, ids, mask = batch
    benchmark.group = "numeric_spans B=64 T=1024"
    if impl == "baseline":
        specials = set(torch.nonzero(vocab.special).flatten().tolist())
        benchmark.pedantic(regex_baseline, args=(tok, ids, mask, specials), rounds=2, warmup_rounds=0)
        return
    ids, mask, vocab = ids.to(DEVICE), mask.to(DEVICE), vocab.to(DEVICE)
    benchmark.pedantic(lambda: sk.numeric_spans(ids, vocab, mask, backend=impl, validate=False), rounds=10,
                       warmup_rounds=1)


@pytest.mark.parametrize("match", ["last", "prefix"])
@pytest.mark.parametrize("impl", BACKENDS["numca_values"])
def test_numca_values(benchmark, batch, impl, match):
    _, vocab, ids, mask = batch
    ids, mask, vocab = ids.to(DEVICE), mask.to(DEVICE), vocab.to(DEVICE)
    spans = sk.numeric_spans(ids, vocab, mask)
    returns, groups = torch.rand(64, device=DEVICE), torch.arange(64, device=DEVICE) // 8
    benchmark.group = f"numca_values B=64 T=1024 match={match}"
    benchmark.pedantic(lambda: sk.numca_values(spans, returns, groups, mask, match=match, backend=impl), rounds=10,
                       warmup_rounds=1)
