"""The CUDA kernels of csrc/ executed on the CPU (tests/cuda_emulation/: one OS thread per CUDA
thread), against the float64 oracles: tiling, group and rollout masking, key splits, the cp.async
pipeline, the GAE scans, the Numca span scans and their barriers are checked on machines without a GPU.

The emulator runs the kernel source itself (csrc/*_kernel.cuh, compiled by the host C++ compiler);
what it cannot vouch for (the PTX fragment layouts, timing, the hardware) is left to the GPU tests in
test_cuda_backend.py. The operand preparation below mirrors the host code in csrc/hista.cu
(padding D to whole 16-byte vectors, fp32 inverse norms, base-2 logit scale); csrc/gae.cu passes
its inputs through unchanged.
"""

import math
import os
import pathlib
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

import sveb_kernels as sk
from kernel_checks import check_gae, check_hista
from numca_cases import FAMILIES, assert_spans_equal, make_batch as numca_batch, oracle_for, tokenizer_and_vocab
from oracles import numeric_spans_oracle
from sveb_kernels.numca import NumericSpans
from test_hista import make_batch, random_groups
from test_numca_spans import MIXED, MIXED_PIECES, dense_random_ids, mixed_decode

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "cuda_emulation"
LOG2E = 1.4426950408889634
TILE = 128  # query/key tile of both Hista main loops (csrc/hista_kernel.cuh)
SEGMENT = 2048  # positions per GAE segment (csrc/gae_kernel.cuh: kThreads * kItems)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulator")
    exe = tmp_path_factory.mktemp("cuda_emulation") / "emulate"
    cmd = [cxx, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc'}",
           f"-I{EMULATION}", str(EMULATION / "emulate.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip(f"{cxx} lacks C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr[-6000:]
    return exe


def run_emulator(exe, kernel, directory, params, arrays, outputs):
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.ascontiguousarray(array).tofile(directory / f"{name}.bin")
    (directory / "params.txt").write_text("".join(f"{key} {value!r}\n" for key, value in params.items()))
    proc = subprocess.run([str(exe), kernel, str(directory)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"emulated {kernel} kernel failed:\n{proc.stderr[-4000:]}"
    return [torch.from_numpy(np.fromfile(directory / f"{name}.bin", dtype=np.float32)) for name in outputs]


def emulated_hista(exe, directory, hidden, returns, rollout_ids, offsets, *, temperature=0.1, similarity="cosine",
                   key_mask=None, key_bias=None, empty_value=0.0, key_splits=1, late_copies=False):
    h = hidden if hidden.dtype in (torch.bfloat16, torch.float16) else hidden.to(torch.float32)
    n, d = h.shape
    align = 16 // h.element_size()
    padded = torch.zeros(n, -(-d // align) * align, dtype=h.dtype)
    padded[:, :d] = h
    raw = padded.view(torch.int16) if h.element_size() == 2 else padded
    arrays = {
        "hidden": raw.numpy(),
        "returns": returns.to(torch.float32).numpy(),
        "rollout_ids": rollout_ids.to(torch.int64).numpy(),
        "group_offsets": offsets.to(torch.int64).numpy(),
    }
    norms = torch.linalg.vector_norm(h, dim=1, dtype=torch.float32)
    if similarity == "cosine":
        arrays["inv_norm"] = (1.0 / norms.clamp_min(1e-6)).numpy()
    else:  # dot: 1, NaN for rows holding a NaN/inf (csrc/hista.cu)
        arrays["inv_norm"] = (norms * 0 + 1).numpy()
    if key_mask is not None:
        arrays["key_mask"] = key_mask.to(torch.uint8).numpy()
    if key_bias is not None:
        arrays["key_bias"] = key_bias.to(torch.float32).numpy()
    params = dict(n=n, dim=padded.shape[1], num_groups=offsets.numel() - 1, element_bytes=h.element_size(),
                  bf16=int(h.dtype == torch.bfloat16), key_splits=key_splits, cosine=1,  # inv_norm always passed
                  has_mask=int(key_mask is not None), has_bias=int(key_bias is not None),
                  logit_scale=float(np.float32(float(np.float32(LOG2E)) / temperature)),
                  empty_value=float(empty_value), late_copies=int(late_copies))
    return run_emulator(exe, "hista", directory, params, arrays, ["values", "lse"])


@pytest.mark.parametrize("offsets", [[0, 4096 + 150], [-5, 60, 30, 150], [200, 9000], [0, 40, 2 ** 62]])
def test_hista_kernel_bounds_bad_offsets(emulator, tmp_path, seed, offsets):
    """The raw op skips the host checks: the kernel clamps offsets on the device (docs/DESIGN.md,
    "Memory safety without checks"), so bad ones give bounded values, never a wild read or write."""
    hidden, returns, rollout_ids, _ = make_batch([[50, 50, 50]], 16)
    returns = torch.rand(150)
    values, lse = emulated_hista(emulator, tmp_path, hidden, returns, rollout_ids, torch.tensor(offsets),
                                 empty_value=-1.0)
    assert values.shape == (150,)
    assert bool((((values >= -1e-6) & (values <= 1 + 1e-6)) | (values == -1.0)).all())
    assert bool((torch.isfinite(lse) | (lse == float("-inf"))).all())


def groups_spanning_tiles():
    # 5 groups of up to 5 rollouts: about 2-4 query tiles, tiles cut through groups and rollouts
    groups = random_groups(5, 5, 30) + [[], [9]]  # plus an empty and a single-rollout group
    while sum(map(sum, groups)) <= TILE + 5:
        groups += random_groups(1, 4, 30)
    return groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_hista_kernels_match_oracle(emulator, tmp_path, seed, dtype, similarity):
    d = int(torch.randint(1, 48, ()))
    hidden, returns, rollout_ids, offsets = make_batch(groups_spanning_tiles(), d, dtype=dtype)
    temperature = 0.1 if similarity == "cosine" else 2.0 * math.sqrt(d)
    values, lse = emulated_hista(emulator, tmp_path, hidden, returns, rollout_ids, offsets, temperature=temperature,
                                 similarity=similarity)
    check_hista(values, lse, hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("key_splits,late_copies", [(1, True), (3, False), (4, True)])
def test_hista_key_splits_and_copy_timing(emulator, tmp_path, seed, dtype, key_splits, late_copies):
    """Splits share a query tile's key tiles; late copies land only at cp.async.wait_group."""
    hidden, returns, rollout_ids, offsets = make_batch([[90, 70, 110], [40, 35]], 40, dtype=dtype)
    values, lse = emulated_hista(emulator, tmp_path, hidden, returns, rollout_ids, offsets, key_splits=key_splits,
                                 late_copies=late_copies)
    check_hista(values, lse, hidden, returns, rollout_ids, offsets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_hista_mask_bias_empty_rows(emulator, tmp_path, seed, dtype):
    groups = random_groups(4, 5, 25) + [[60]]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 24, dtype=dtype)
    n = hidden.shape[0]
    key_mask = torch.rand(n) > 0.3
    key_mask[offsets[0]:offsets[1]] = False  # the first group has no keys at all
    key_bias = torch.randn(n) * 2
    key_bias[torch.rand(n) < 0.05] = -math.inf  # -inf bias: not a key either
    kw = dict(temperature=0.3, empty_value=-2.5)
    values, lse = emulated_hista(emulator, tmp_path, hidden, returns, rollout_ids, offsets, key_splits=2,
                                 key_mask=key_mask, key_bias=key_bias, **kw)
    # the oracle is told the same thing without infinities (it would give NaN for a row whose keys
    # all have bias -inf, where the contract says: no keys)
    finite = torch.isfinite(key_bias)
    check_hista(values, lse, hidden, returns, rollout_ids, offsets, key_mask=key_mask & finite,
                key_bias=torch.where(finite, key_bias, 0.0), **kw)


def test_hista_one_rollout_tiles_are_skipped_correctly(emulator, tmp_path, seed):
    """A query tile inside one rollout skips key tiles of that rollout but not the others."""
    groups = [[300], [200, 150], [1, 1, 1]]  # group 0 alone: empty; tiles within one rollout of group 1
    hidden, returns, rollout_ids, offsets = make_batch(groups, 16, dtype=torch.bfloat16)
    values, lse = emulated_hista(emulator, tmp_path, hidden, returns, rollout_ids, offsets, empty_value=0.5)
    check_hista(values, lse, hidden, returns, rollout_ids, offsets, empty_value=0.5)


def test_hista_many_small_groups_and_interleaved_rollouts(emulator, tmp_path, seed):
    """Query tiles spanning dozens of groups; rollouts interleaved inside a group (only equality matters);
    int64 ids that agree in their low 32 bits."""
    groups = [[int(torch.randint(1, 4, ()))] * int(torch.randint(1, 4, ())) for _ in range(90)]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 9)
    ids = rollout_ids.to(torch.int64)
    start, end = int(offsets[3]), int(offsets[4])
    ids[start:end] = (torch.arange(end - start) % 2) << 32  # 0 and 2^32 alternate: two distinct rollouts
    values, lse = emulated_hista(emulator, tmp_path, hidden, returns, ids, offsets, key_splits=3, similarity="dot",
                                 temperature=1.5)
    check_hista(values, lse, hidden, returns, ids, offsets, similarity="dot", temperature=1.5)


@pytest.mark.parametrize("scale,temperature", [(3000.0, 0.05), (1.0, 1e-3)])
def test_hista_fp32_extremes(emulator, tmp_path, seed, scale, temperature):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 40), 33, scale=scale)
    values, lse = emulated_hista(emulator, tmp_path, hidden, returns, rollout_ids, offsets, temperature=temperature)
    check_hista(values, lse, hidden, returns, rollout_ids, offsets, temperature=temperature)


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype,similarity,key_splits", [(torch.float32, "cosine", 1), (torch.float32, "dot", 3),
                                                         (torch.bfloat16, "dot", 1), (torch.float16, "cosine", 2)])
def test_hista_nonfinite_inputs_poison_exactly_their_dependents(emulator, tmp_path, seed, poison, dtype, similarity,
                                                                key_splits):
    """docs/CONTRACT.md "Common rules" (nonfinite_cases.py): a NaN hidden state used to turn the other
    rollouts' values into empty_value; outputs that do not depend on a poisoned input are unchanged."""
    from nonfinite_cases import check_hista_nonfinite, hista_poison_case

    clean, poisoned, bad_values, bad_lse = hista_poison_case(poison)
    for case in (clean, poisoned):
        case["hidden"] = case["hidden"].to(dtype)
        case["similarity"] = similarity
    args = [poisoned.pop(k) for k in ("hidden", "returns", "rollout_ids", "group_offsets")]
    values, lse = emulated_hista(emulator, tmp_path, *args, key_splits=key_splits, **poisoned)
    check_hista_nonfinite(sk.HistaOutput(values, lse), clean, bad_values, bad_lse, poison)


def emulated_gae(exe, directory, rewards, values, mask, gamma, lam):
    batch, length = rewards.shape
    params = dict(batch=batch, length=length, element_bytes=rewards.element_size(), gamma=float(gamma),
                  lam=float(lam))
    arrays = {"rewards": rewards.numpy(), "values": values.numpy(), "mask": mask.to(torch.uint8).numpy()}
    adv, ret = run_emulator(exe, "gae", directory, params, arrays, ["advantages", "returns"])
    return adv.reshape(batch, length), ret.reshape(batch, length)


def random_mask(batch, length):
    lengths = torch.randint(0, length + 1, (batch,))
    return (torch.arange(length)[None, :] < lengths[:, None]) & (torch.rand(batch, length) > 0.2)


@pytest.mark.parametrize("length", [1, 37, SEGMENT, SEGMENT + 1, 2 * SEGMENT + 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gae_kernel_matches_loop(emulator, tmp_path, seed, length, dtype):
    gamma, lam = [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.7, 0.0)][int(torch.randint(0, 4, ()))]
    rewards, values = torch.randn(3, length, dtype=dtype), torch.randn(3, length, dtype=dtype)
    mask = random_mask(3, length)
    mask[0] = False  # a row without valid positions
    adv, ret = emulated_gae(emulator, tmp_path, rewards, values, mask, gamma, lam)
    check_gae(adv, ret, rewards, values, mask, gamma, lam)


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.0, 0.5)])
def test_gae_kernel_nonfinite_inputs_poison_exactly_their_dependents(emulator, tmp_path, seed, poison, gamma, lam):
    from nonfinite_cases import check_gae_nonfinite, gae_poison_case

    clean, poisoned, bad = gae_poison_case(poison, length=SEGMENT + 37)
    out = emulated_gae(emulator, tmp_path, *poisoned, gamma, lam)
    check_gae_nonfinite(out, clean, bad, gamma, lam, poison)


def test_gae_kernel_carries_across_segments(emulator, tmp_path, seed):
    """Valid positions only on either side of segment and chunk boundaries: the next valid value and the
    advantage must travel across empty chunks and whole empty segments."""
    length = 3 * SEGMENT + 5
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[0, [0, 7, 8, SEGMENT - 1, 3 * SEGMENT + 1]] = True
    mask[1, [SEGMENT, 2 * SEGMENT - 1, length - 1]] = True
    rewards, values = torch.randn(2, length), torch.randn(2, length)
    adv, ret = emulated_gae(emulator, tmp_path, rewards, values, mask, 0.9, 0.8)
    check_gae(adv, ret, rewards, values, mask, 0.9, 0.8)


def test_gae_kernel_long_telescoping_row(emulator, tmp_path, seed):
    length = 32768
    mask = torch.rand(1, length) > 0.1
    rewards, values = torch.randn(1, length), torch.randn(1, length)
    adv, ret = emulated_gae(emulator, tmp_path, rewards, values, mask, 1.0, 1.0)
    check_gae(adv, ret, rewards, values, mask, 1.0, 1.0)


# ---- Numca numeric_spans -------------------------------------------------------------------------
def emulated_spans(exe, directory, token_ids, table, mask=None):
    """csrc/numca_kernel.cuh on the CPU, with the inputs csrc/numca.cu would pass (contiguous ids of
    their own dtype, a bool mask)."""
    batch, length = token_ids.shape
    params = dict(batch=batch, length=length, vocab=table.shape[0], cols=table.shape[1],
                  id_bytes=token_ids.element_size(), has_mask=int(mask is not None))
    arrays = {"ids": token_ids.contiguous().numpy(), "table": table.contiguous().numpy()}
    if mask is not None:
        arrays["mask"] = mask.to(torch.bool).to(torch.uint8).numpy()
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.ascontiguousarray(array).tofile(directory / f"{name}.bin")
    (directory / "params.txt").write_text("".join(f"{k} {v!r}\n" for k, v in params.items()))
    proc = subprocess.run([str(exe), "numca", str(directory)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"emulated numca kernel failed:\n{proc.stderr[-4000:]}"

    def read(name, dtype):
        return torch.from_numpy(np.fromfile(directory / f"{name}.bin", dtype=dtype)).reshape(batch, length)

    return NumericSpans(read("end", np.uint8).bool(), read("key", np.int64), read("value", np.float64),
                        read("start", np.int32))


@pytest.mark.parametrize("family", FAMILIES)
def test_numca_kernel_matches_reference_on_tokenized_texts(emulator, tmp_path, seed, family):
    """Texts full of numbers of every form, tokenized, with special tokens and masked holes."""
    rng = random.Random(seed)
    _, vocab = tokenizer_and_vocab(family)
    ids, mask = numca_batch(family, rng, rows=5, pieces=40)
    want = sk.numeric_spans(ids, vocab, mask, backend="reference")
    got = emulated_spans(emulator, tmp_path, ids, vocab.table, mask)
    assert_spans_equal(got, [x.tolist() for x in want], ids, value_ulps=1)
    assert_spans_equal(got, oracle_for(family, ids, mask), ids, value_ulps=1)


def test_numca_kernel_dense_grammar_zero_length_tokens_and_bad_ids(emulator, tmp_path, seed):
    """Ids over an alphabet that fires every rule of the grammar, tokens of 0 to 7 bytes, numbers cut
    by masked tokens, and ids outside the vocab (they read as separators, like masked tokens)."""
    rng = random.Random(seed)
    ids = dense_random_ids(rng, 7, int(rng.randint(50, 150)))
    mask = torch.rand(ids.shape) > 0.05
    want = numeric_spans_oracle(mixed_decode, ids, set(), mask)
    got = emulated_spans(emulator, tmp_path / "int64", ids, MIXED.table, mask)
    assert_spans_equal(got, want, ids, value_ulps=1)
    got32 = emulated_spans(emulator, tmp_path / "int32", ids.int(), MIXED.table)
    assert_spans_equal(got32, numeric_spans_oracle(mixed_decode, ids, set()), ids, value_ulps=1)
    bad = ids.clone()
    holes = torch.rand(ids.shape) < 0.05
    bad[holes] = torch.where(torch.rand(ids.shape) < 0.5, -3, len(MIXED_PIECES) + 5)[holes]
    got_bad = emulated_spans(emulator, tmp_path / "bad", bad, MIXED.table)
    assert_spans_equal(got_bad, numeric_spans_oracle(mixed_decode, ids, set(), ~holes), ids, value_ulps=1)


def test_numca_kernel_long_and_extreme_numbers(emulator, tmp_path, seed):
    """Numbers over hundreds of tokens, more digits than the mantissa keeps, overflow and underflow,
    values off the exact fast path: keys exact, values within 1 ulp of Python's float()."""
    rng = random.Random(seed)
    tok, vocab = tokenizer_and_vocab("qwen2")  # one token per digit

    def digits(n):
        return "".join(rng.choice("0123456789") for _ in range(n))

    forms = ["9" * 400, "0." + "0" * 330 + "17", "0." + "0" * 300 + digits(25), "1" + ",000" * 40 + ".5",
             "123456789012345678901234567890.123456789", f"{rng.randint(1, 9)}{digits(rng.randint(20, 330))}",
             f"0.{'0' * rng.randint(20, 320)}{digits(rng.randint(1, 40))}", "-" + digits(17) + "." + digits(9),
             "179769313486231570" + "0" * 291, "2.2250738585072014e-308".split("e")[0] + "0" * 5]
    forms += [f"{rng.uniform(0, 10) ** rng.randint(-30, 30):.{rng.randint(0, 25)}f}" for _ in range(30)]
    forms += [f"{digits(rng.randint(1, 22))}.{digits(rng.randint(1, 22))}" for _ in range(30)]
    text = " ".join(forms)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
    got = emulated_spans(emulator, tmp_path, ids, vocab.table)
    assert_spans_equal(got, oracle_for("qwen2", ids), ids, value_ulps=1)
    assert int(got.end.sum()) == len(forms)


SPANS_CHUNK = 256  # tokens per chunk of the numeric_spans kernel (csrc/numca_kernel.cuh: kThreads)
EMPTY = MIXED_PIECES.index(b"")  # a zero-length token: no class at all


def mixed_ids(text):
    """One MIXED token per character."""
    return [ord(ch) for ch in text]


def test_numca_kernel_numbers_across_chunk_boundaries(emulator, tmp_path, seed):
    """Every form the grammar knows, placed so that a chunk boundary falls at each of its positions:
    the forward state, the backward state (from the next chunk's scan) and the latest start must all
    carry from one chunk into the next; B = 1 and odd lengths on the way."""
    rng = random.Random(seed)
    forms = ["-12,345.670", "1,234,567", "x1,234", "1,2345", "-0.0", "3.", "a-7", "--5", "4.5.6", "12,34,567",
             "007,000.1", "-1,000,000"]
    rows = []
    for form in rng.sample(forms, 6):
        text = f" {form} "
        for cut in range(1, len(text)):  # the boundary falls just before text[cut]
            fill = "".join(rng.choice("ab ,.-_") for _ in range(SPANS_CHUNK - cut))
            rows.append(mixed_ids(fill + text))
    length = max(map(len, rows)) + rng.randint(0, 40)
    ids = torch.tensor([r + [ord(" ")] * (length - len(r)) for r in rows])
    got = emulated_spans(emulator, tmp_path / "batch", ids, MIXED.table)
    assert_spans_equal(got, numeric_spans_oracle(mixed_decode, ids, set()), ids, value_ulps=1)
    # one row alone, its number cut by a boundary between chunks 2 and 3 (int32 ids)
    one = ids[rng.randrange(ids.shape[0])][None, :]
    one = torch.cat([torch.full((1, 2 * SPANS_CHUNK), ord("z")), one], dim=1).int()
    got = emulated_spans(emulator, tmp_path / "one", one, MIXED.table)
    assert_spans_equal(got, numeric_spans_oracle(mixed_decode, one, set()), one, value_ulps=1)


def test_numca_kernel_backward_carry_through_nearly_empty_chunks(emulator, tmp_path, seed):
    """The backward state entering a chunk needs the chunks after it until 5 classes have been read:
    chunks of zero-length tokens (and a few digits) between a number's parts, a number running over
    three chunks, a '-' at a chunk's end whose digits come two chunks later."""
    rng = random.Random(seed)
    n = SPANS_CHUNK

    def row(*parts):  # (position, text) pairs over zero-length tokens
        out = [EMPTY] * (4 * n + 7)
        for at, text in parts:
            out[at:at + len(text)] = mixed_ids(text)
        return out

    rows = [
        row((n - 4, " 1,23"), (3 * n + 2, "4 ")),            # "1,234" across two empty chunks
        row((n - 4, " 1,23"), (2 * n + 9, "4"), (3 * n, "5 ")),  # "1,2345": not a group
        row((n - 4, " 1,23"), (2 * n + 9, "4"), (3 * n, ".5 ")),  # "1,234.5"
        row((n - 2, " -"), (3 * n + 1, "9,000 ")),           # a sign, digits two chunks later
        row((5, " 1"), (n + 200, "2"), (2 * n + 100, "3"), (3 * n + 50, ".0 ")),  # "123.0" over 4 chunks
        row((n - 3, "x1"), (2 * n + 1, "2 ")),               # "x12": no number
    ]
    sparse = [[EMPTY if rng.random() < 0.97 else rng.choice(mixed_ids("0123456789,.-a ") + [257, 258, 261])
               for _ in range(4 * n + 7)] for _ in range(3)]
    ids = torch.tensor(rows + sparse)
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[-1, rng.randrange(ids.shape[1])] = False
    got = emulated_spans(emulator, tmp_path, ids, MIXED.table, mask)
    want = numeric_spans_oracle(mixed_decode, ids, set(), mask)
    assert_spans_equal(got, want, ids, value_ulps=1)
    assert [sum(r) for r in want[0][:6]] == [1, 2, 1, 1, 1, 0]  # the rows test what they say they do


def test_numca_kernel_dense_long_rows_odd_sizes(emulator, tmp_path, seed):
    """Dense grammar over several chunks, odd batch and length, masked holes, int32 ids."""
    rng = random.Random(seed)
    ids = dense_random_ids(rng, 3, rng.randint(2 * SPANS_CHUNK + 1, 4 * SPANS_CHUNK - 1))
    mask = torch.rand(ids.shape) > 0.03
    got = emulated_spans(emulator, tmp_path, ids.int(), MIXED.table, mask)
    assert_spans_equal(got, numeric_spans_oracle(mixed_decode, ids, set(), mask), ids, value_ulps=1)


# ---- Numca numca_values ----------------------------------------------------------------------------
VALUES_CHUNK = 256  # tokens per chunk of the numca_values kernel (csrc/numca_values_kernel.cuh: kThreads)
PREFIX_MULTIPLIERS = (0x9E3779B97F4A7C15 - (1 << 64), 0xC2B2AE3D27D4EB4F - (1 << 64))  # csrc/numca_values.cu


def emulated_values(exe, directory, spans, returns, group_index, mask, *, match="last", leave_one_out=True,
                    min_support=1, empty_value=0.0):
    """The ATen preprocessing of csrc/numca_values.cu with the same torch ops, then the kernel."""
    batch, length = mask.shape
    keep = mask.bool()
    valid = spans.end.bool() & keep
    key = spans.key
    sorted_group, order = torch.sort(group_index.long(), stable=True)
    lo = torch.searchsorted(sorted_group, group_index.long(), right=False)
    hi = torch.searchsorted(sorted_group, group_index.long(), right=True)
    count = valid.sum(1, dtype=torch.int32)
    sorted_keys = hash1 = hash2 = key
    if match == "prefix":
        ordinal = torch.cumsum(valid, 1) - 1
        slot = torch.where(valid, ordinal, torch.full_like(ordinal, length))
        compact = torch.zeros(batch, length + 1, dtype=torch.int64).scatter_(
            1, slot, torch.where(valid, key, torch.zeros_like(key)))[:, :length]
        hash1, hash2 = (torch.cumsum(compact * torch.full((length,), m, dtype=torch.int64).cumprod(0), 1)
                        for m in PREFIX_MULTIPLIERS)
    else:
        sorted_keys = torch.sort(torch.where(valid, key, torch.full_like(key, torch.iinfo(torch.int64).max)), 1).values
    arrays = dict(valid=valid.to(torch.uint8).numpy(), mask=keep.to(torch.uint8).numpy(), key=key.numpy(),
                  sorted_keys=sorted_keys.numpy(), hash1=hash1.numpy(), hash2=hash2.numpy(), count=count.numpy(),
                  returns=returns.double().numpy(), order=order.numpy(), lo=lo.numpy(), hi=hi.numpy())
    params = dict(batch=batch, length=length, prefix=int(match == "prefix"), leave_one_out=int(leave_one_out),
                  min_support=min(min_support, batch + 1), empty_value=float(empty_value))
    (values,) = run_emulator(exe, "numca_values", directory, params, arrays, ["values"])
    return values.reshape(batch, length)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("match,min_support", [("last", 1), ("prefix", 1), ("last", 2)])
def test_numca_values_kernel_nonfinite_returns(emulator, tmp_path, seed, poison, match, min_support):
    """docs/CONTRACT.md "Common rules" (tests/nonfinite_cases.py)."""
    from nonfinite_cases import check_numca_nonfinite, numca_poison_case

    clean, poisoned, bad = numca_poison_case(poison, match=match, min_support=min_support)
    end, key = poisoned["spans"][:2]
    out = emulated_values(emulator, tmp_path, NumericSpans(end, key, None, None), poisoned["returns"],
                          poisoned["group_index"], poisoned["mask"], match=match, min_support=min_support,
                          empty_value=poisoned["empty_value"])
    check_numca_nonfinite(out, clean, bad, poison)


def values_case(rng, match, length):
    """Groups of 1 to 6 rollouts (some of one), interleaved in the batch; keys from a small pool so that
    peers share numbers (for "prefix": a shared script with divergences); masked holes."""
    sizes = [rng.choice([1, 1, 2, 3, 4, 6]) for _ in range(rng.randint(2, 4))]
    group_index = torch.tensor([g * 5 - 3 for g, size in enumerate(sizes) for _ in range(size)])
    group_index = group_index[torch.randperm(group_index.numel())]
    batch = group_index.numel()
    end = torch.rand(batch, length) < 0.25
    if match == "prefix":
        script = torch.randint(0, 3, (length,))
        key = script[None, :].expand(batch, length) + 10 * (torch.rand(batch, length) < 0.1)
    else:
        pool = torch.randint(-(2 ** 63), 2 ** 63 - 1, (4,), dtype=torch.int64)
        key = pool[torch.randint(0, 4, (batch, length))]
    key = torch.where(end, key, torch.zeros_like(key))
    mask = torch.rand(batch, length) > 0.15
    return NumericSpans(end, key, None, None), torch.randn(batch, dtype=torch.float64), group_index, mask


@pytest.mark.parametrize("match", ["last", "prefix"])
@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("min_support", [1, 2, 3])
def test_numca_values_kernel_matches_reference(emulator, tmp_path, seed, match, leave_one_out, min_support):
    rng = random.Random(seed)
    length = rng.choice([1, 37, VALUES_CHUNK, VALUES_CHUNK + 45])  # one chunk, a full one, a carry
    spans, returns, group_index, mask = values_case(rng, match, length)
    kw = dict(match=match, leave_one_out=leave_one_out, min_support=min_support, empty_value=-0.75)
    got = emulated_values(emulator, tmp_path, spans, returns, group_index, mask, **kw)
    want = sk.numca_values(spans, returns, group_index, mask, backend="reference", **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got[~mask] == 0).all()


def test_numca_values_kernel_holds_values_across_chunks(emulator, tmp_path, seed):
    """A milestone early in the row and none after it: its value (not the peers' mean: row 4 lacks the
    number) must carry through later chunks; a lone rollout gets empty_value."""
    length = 2 * VALUES_CHUNK + 11
    end = torch.zeros(5, length, dtype=torch.bool)
    key = torch.zeros(5, length, dtype=torch.int64)
    end[0, 3] = end[1, 400] = end[2, VALUES_CHUNK - 1] = True
    key[0, 3] = key[1, 400] = key[2, VALUES_CHUNK - 1] = 42
    spans = NumericSpans(end, key, None, None)
    returns, group_index = torch.randn(5, dtype=torch.float64), torch.tensor([7, 7, 7, 8, 7])
    mask = torch.ones(5, length, dtype=torch.bool)
    mask[0, 100:130] = False
    for match in ("last", "prefix"):
        got = emulated_values(emulator, tmp_path / match, spans, returns, group_index, mask, match=match,
                              empty_value=3.5)
        want = sk.numca_values(spans, returns, group_index, mask, match=match, empty_value=3.5, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert float(got[3].max()) == float(got[3].min()) == 3.5


def test_numca_values_kernel_prefix_needs_enough_numbers(emulator, tmp_path, seed):
    """match="prefix": a peer with fewer numbers never supports a longer prefix, even when the extra
    keys are 0 (its prefix hash stops changing after its last number)."""
    keys = [[5, 0], [5], [5, 7], [5, 0], []]
    length = 6
    end = torch.zeros(len(keys), length, dtype=torch.bool)
    key = torch.zeros(len(keys), length, dtype=torch.int64)
    for b, row in enumerate(keys):
        for i, k in enumerate(row):
            end[b, 2 * i + 1], key[b, 2 * i + 1] = True, k
    spans = NumericSpans(end, key, None, None)
    returns, group_index = torch.randn(len(keys), dtype=torch.float64), torch.zeros(len(keys), dtype=torch.int64)
    mask = torch.ones(len(keys), length, dtype=torch.bool)
    for match in ("last", "prefix"):
        got = emulated_values(emulator, tmp_path / match, spans, returns, group_index, mask, match=match)
        want = sk.numca_values(spans, returns, group_index, mask, match=match, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- barriers: the emulator must catch a missing one ----------------------------------------------
MUTANTS = {  # a barrier of a Numca kernel (file, the line as written) and what removing it races
    "spans: warp totals stored": ("numca_kernel.cuh", "  __syncthreads();  // the warp totals are stored before any "
                                  "thread reads them\n"),
    "spans: warp totals read": ("numca_kernel.cuh", "  __syncthreads();  // every thread has read them before the next "
                                "scan stores again\n"),
    "values: chunk count read": ("numca_values_kernel.cuh", "    __syncthreads();  // every thread has read "
                                 "s_scan[kThreads - 1]\n"),
    "values: chunk done": ("numca_values_kernel.cuh", "    __syncthreads();  // the next chunk overwrites the shared "
                           "arrays\n"),
}


@pytest.fixture(scope="module")
def mutant_emulators(tmp_path_factory, emulator):
    """An emulator per entry of MUTANTS, built from a copy of the kernel without that barrier."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    built = {}
    for name, (header, line) in MUTANTS.items():
        source = (ROOT / "csrc" / header).read_text()
        assert source.count(line) == 1, f"{name}: the barrier to remove is no longer in csrc/{header}"
        directory = tmp_path_factory.mktemp("mutant")
        (directory / header).write_text(source.replace(line, ""))
        exe = directory / "emulate"
        cmd = [cxx, "-std=c++20", "-O1", "-pthread", f"-I{directory}", f"-I{ROOT / 'csrc'}", f"-I{EMULATION}",
               str(EMULATION / "emulate.cpp"), "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        built[name] = exe
    return built


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_emulator_catches_a_missing_barrier(emulator, mutant_emulators, tmp_path, seed, mutant):
    """Without any one of their barriers the Numca kernels race on shared memory; the emulator fails the
    run every time, whatever the OS threads' interleaving (its check counts barriers, it does not time
    threads). The intact kernels pass the same inputs."""
    rng = random.Random(seed)
    spans_ids = torch.tensor([mixed_ids(" 12 -3.5 x1,000 ") * 25])  # 400 tokens: two chunks
    values_inputs = values_case(rng, "last", VALUES_CHUNK + 45)  # two chunks

    def run(exe, directory):
        if mutant.startswith("spans"):
            emulated_spans(exe, directory, spans_ids, MIXED.table)
        else:
            emulated_values(exe, directory, *values_inputs)

    run(emulator, tmp_path / "intact")
    with pytest.raises(AssertionError, match="shared memory race"):
        run(mutant_emulators[mutant], tmp_path / "mutant")
