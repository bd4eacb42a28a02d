"""Runs every op with every available backend and with the baselines users write today, checks that
the results agree, and collects one row per (op, size, implementation)."""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .. import _backend, gae, hista_values, numca_values, numeric_spans
from . import baselines, cases, timing


@dataclass
class Row:
    op: str
    case: str
    impl: str
    tokens_per_group: Optional[int] = None
    median_ms: Optional[float] = None
    speedup: Optional[float] = None  # baseline time / this time, measured in the same run
    peak_mib: Optional[float] = None
    rate: Optional[float] = None  # TFLOP/s (hista) or GB/s (gae)
    rate_unit: str = ""
    pct_of_ceiling: Optional[float] = None  # of the matmul (TFLOP/s) or copy (GB/s) measured in this run
    agree: Optional[bool] = None
    max_abs_diff: Optional[float] = None
    note: str = ""
    spread_pct: Optional[float] = None  # (slowest - fastest) / median of the repeats, in percent
    total_tokens: Optional[int] = None  # tokens of the whole batch (the "tok" of the case; the plot's x axis)


@dataclass
class Config:
    device: torch.device
    quick: bool = False
    ops: tuple[str, ...] = ("hista", "hista_backward", "gae", "numca")
    hista_tokens: tuple[int, ...] = ()
    hidden_size: int = 0
    rollouts: int = 8
    groups: int = 2
    gae_shape: tuple[int, int] = (64, 4096)
    numca_shape: tuple[int, int] = (0, 0)
    repeats: int = 5
    max_seconds: float = 10.0
    progress: bool = True
    threads: int = 0  # torch CPU threads the run used (set by the command)
    threads_why: str = ""

    def __post_init__(self):
        cuda = self.device.type == "cuda"
        if not self.hista_tokens:
            if cuda:
                self.hista_tokens = (4096, 16384) if self.quick else (4096, 8192, 16384, 32768, 65536)
            else:
                self.hista_tokens = (256, 512, 1024) if self.quick else (512, 1024, 2048, 4096)
        if not self.hidden_size:
            self.hidden_size = 4096 if cuda else (256 if self.quick else 512)
        if not all(self.numca_shape):
            self.numca_shape = (32, 512) if self.quick else (256, 2048)
        if self.quick:
            self.repeats = min(self.repeats, 3)
            self.max_seconds = min(self.max_seconds, 3.0)


@dataclass
class Report:
    config: dict
    ceilings: dict
    rows: list[Row] = field(default_factory=list)


class _Progress:
    """One status line on stderr (no dependency); silent when stderr is not a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done = total, 0
        self.enabled = enabled and sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label[:60]:<60}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 110 + "\r")


def _run_variant(row: Row, fn: Callable[[], object], config: Config, reference, compare, baseline_ms):
    try:
        result = fn()
        m = timing.measure(fn, config.device, config.repeats, max_seconds=config.max_seconds)
    except torch.OutOfMemoryError:
        row.note = "out of memory"
        if config.device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    except Exception as e:  # a backend failing must not hide the others' numbers
        row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return None
    row.median_ms = m.median_s * 1e3
    row.spread_pct = None if m.spread is None else 100 * m.spread
    row.peak_mib = None if m.peak_bytes is None else m.peak_bytes / 2**20
    if baseline_ms:
        row.speedup = baseline_ms / row.median_ms
    if reference is not None:
        row.max_abs_diff, row.agree = compare(result, reference)
    return result


@dataclass
class _Work:
    """What one call must do, to turn a time into a rate and a share of the measured ceiling."""

    amount: float  # flops or bytes
    unit: str  # "TFLOP/s" or "GB/s"
    scale: float  # 1e12 or 1e9
    ceiling_per_s: float


@dataclass
class _Case:
    """One case of one op, built when its turn comes: what each implementation calls, and how to judge it."""

    label: str
    call: Callable[[str], Callable[[], object]]  # implementation name -> the call to time
    expected: object  # what a checked implementation must return (the reference backend's result)
    compare: Callable  # (result, expected) -> (max_abs_diff or None, agree)
    work: Optional[_Work] = None
    unchecked: tuple[str, ...] = ()  # implementations whose result has another form (not compared)
    baseline_note: str = ""
    row_fields: dict = field(default_factory=dict)


@dataclass
class _Group:
    """A planned case: its implementations in order (the first is the baseline the others' speedups are
    against), known before anything runs so the progress bar counts them, and how to build the case."""

    op: str
    impls: list[str]
    build: Callable[[], _Case]


def _measure_group(group: _Group, config: Config, progress: _Progress) -> list[Row]:
    case = group.build()
    rows, baseline_ms = [], None
    for index, impl in enumerate(group.impls):
        progress.step(f"{group.op} {impl} {case.label}")
        row = Row(group.op, case.label, impl, **case.row_fields)
        checked = impl not in case.unchecked
        _run_variant(row, case.call(impl), config, case.expected if checked else None, case.compare, baseline_ms)
        if index == 0:
            baseline_ms = row.median_ms
        if row.median_ms and case.work is not None:
            work = case.work
            row.rate, row.rate_unit = work.amount / (row.median_ms / 1e3) / work.scale, work.unit
            row.pct_of_ceiling = 100 * row.rate * work.scale / work.ceiling_per_s
        rows.append(row)
    if rows and case.baseline_note:
        rows[0].note = case.baseline_note
    return rows


def _hista_case(config: Config, dtype: torch.dtype, ceilings: dict, tokens: int) -> _Case:
    temperature, similarity = 0.1, "cosine"
    case = cases.hista_case(config.groups, config.rollouts, tokens, config.hidden_size, dtype, config.device)
    args = (case.hidden, case.returns, case.rollout_ids, case.group_offsets)
    tol = (1e-4 if dtype == torch.float32 else 5e-2) * float(case.returns.abs().max().clamp_min(1e-30))

    def compare(result, reference):
        values = result[0] if isinstance(result, tuple) else result
        diff = float((values.float() - reference).abs().max()) if values.numel() else 0.0
        return diff, diff <= tol

    def call(impl):
        if impl == "naive PyTorch":
            return lambda: baselines.naive_hista(*args, temperature, similarity)
        if impl == "FlexAttention":
            return lambda: baselines.flex_attention_hista(*args, temperature, similarity)
        return lambda: hista_values(*args, temperature=temperature, similarity=similarity, backend=impl)

    reference = hista_values(*args, temperature=temperature, similarity=similarity, backend="reference").values
    work = _Work(case.flops, "TFLOP/s", 1e12, ceilings["matmul_flops_per_s"])
    return _Case(case.label, call, reference, compare, work,
                 row_fields=dict(tokens_per_group=tokens, total_tokens=int(case.hidden.shape[0])))


def _hista_backward_case(config: Config, dtype: torch.dtype, ceilings: dict, backends: list[str], tokens: int) -> _Case:
    from . import backward

    case = cases.hista_case(config.groups, config.rollouts, tokens, config.hidden_size, dtype, config.device)
    expected, compare, variants = backward.variants(case, 0.1, "cosine", config.device, backends)
    calls = {impl: fn for impl, fn, _ in variants}
    # forward (1 GEMM) + backward (3 GEMMs: scores again, dX as queries, dX as keys)
    work = _Work(4 * case.flops, "TFLOP/s", 1e12, ceilings["matmul_flops_per_s"])
    return _Case(case.label, calls.__getitem__, expected, compare, work,
                 row_fields=dict(tokens_per_group=tokens, total_tokens=int(case.hidden.shape[0])))


def _gae_case(config: Config, ceilings: dict) -> _Case:
    batch, length = config.gae_shape
    case = cases.gae_case(batch, length, config.device)
    args, options = (case.rewards, case.values, case.mask), dict(gamma=1.0, lam=0.95)
    reference = gae(*args, **options, backend="reference")[0]
    bound = 1e-5 * (1 + float(reference.abs().max())) * math.log2(length + 1)

    def compare(result, expected):
        diff = float((result[0] - expected).abs().max())
        return diff, diff <= bound

    def call(impl):
        if impl == "per-token loop":
            return lambda: baselines.gae_loop(*args, **options)
        return lambda: gae(*args, **options, backend=impl)

    work = _Work(case.bytes_moved, "GB/s", 1e9, ceilings["copy_bytes_per_s"])
    return _Case(case.label, call, reference, compare, work,
                 row_fields=dict(total_tokens=batch * length))


@dataclass
class _NumcaBatch:
    """The token batch both Numca cases time (built once, on first use)."""

    tokenizer: object
    ids: torch.Tensor
    mask: torch.Tensor
    specials: set
    ids_d: torch.Tensor  # the same on the run's device
    mask_d: torch.Tensor
    vocab_d: object


def _numca_batch(config: Config) -> _NumcaBatch:
    from ..numca import NumericVocab, toy_tokenizers

    batch, length = config.numca_shape
    tokenizer = toy_tokenizers.build("llama3")
    vocab = NumericVocab.from_tokenizer(tokenizer)
    ids, mask = cases.numca_token_batch(tokenizer, batch, length)
    specials = set(torch.nonzero(vocab.special).flatten().tolist())
    return _NumcaBatch(tokenizer, ids, mask, specials, ids.to(config.device), mask.to(config.device),
                       vocab.to(config.device))


def _numca_label(config: Config) -> str:
    batch, length = config.numca_shape
    return f"B={batch} T={length} llama3-style"


def _numeric_spans_case(config: Config, ceilings: dict, data: Callable[[], _NumcaBatch]) -> _Case:
    d = data()
    baseline = baselines.regex_baseline(d.tokenizer, d.ids, d.mask, d.specials)
    expected = (baseline[0], baseline[3])  # end and start per token (the baseline's key is a Python hash)

    def compare(result, reference):
        same = result.end.cpu().tolist() == reference[0] and result.start.cpu().tolist() == reference[1]
        return None, same

    def call(impl):
        if impl == "decode+regex":
            return lambda: baselines.regex_baseline(d.tokenizer, d.ids, d.mask, d.specials)
        return lambda: numeric_spans(d.ids_d, d.vocab_d, d.mask_d, backend=impl)

    # Bytes the op must move: ids and mask in; end, key, value, start out.
    work = _Work(d.ids.numel() * (d.ids.element_size() + 1 + 1 + 8 + 8 + 4), "GB/s", 1e9, ceilings["copy_bytes_per_s"])
    return _Case(_numca_label(config), call, expected, compare, work, unchecked=("decode+regex",),
                 baseline_note="what trainers do today", row_fields=dict(total_tokens=d.ids.numel()))


def _numca_values_case(config: Config, data: Callable[[], _NumcaBatch]) -> _Case:
    d = data()
    batch = d.ids.shape[0]
    spans = numeric_spans(d.ids_d, d.vocab_d, d.mask_d, backend="reference")
    returns = torch.rand(batch, generator=torch.Generator().manual_seed(0)).to(config.device)
    group_index = torch.arange(batch, device=config.device) // 16
    reference = numca_values(spans, returns, group_index, d.mask_d, backend="reference")

    def compare(result, expected_values):
        diff = float((result - expected_values).abs().max()) if result.numel() else 0.0
        return diff, diff <= 1e-5 * (1 + float(expected_values.abs().max()))

    def call(impl):
        return lambda: numca_values(spans, returns, group_index, d.mask_d, backend=impl)

    return _Case(f"{_numca_label(config)}, groups of 16", call, reference, compare,
                 row_fields=dict(note="match=last", total_tokens=d.ids.numel()))


def _plan(config: Config, dtype: torch.dtype, ceilings: dict) -> list[_Group]:
    """Every (op, case) of the run with its implementations, in the order they run. Cases are built
    (tensors allocated, references computed) only when measured, one at a time."""
    backends = _backend.available_backends(config.device)
    groups = []
    if "hista" in config.ops:
        # FlexAttention's kernel only compiles for small heads; where it cannot run it is not offered.
        flex = ["FlexAttention"] if config.device.type == "cuda" and config.hidden_size <= 256 else []
        impls = ["naive PyTorch", *flex, *backends["hista_values"]]
        groups += [_Group("hista_values", impls, functools.partial(_hista_case, config, dtype, ceilings, tokens))
                   for tokens in config.hista_tokens]
    if "hista_backward" in config.ops:
        backward_backends = list(backends.get("hista_values_backward", []))
        impls = ["dense autograd", *(f"{b} fused bwd" for b in backward_backends)]
        groups += [_Group("hista fwd+bwd", impls,
                          functools.partial(_hista_backward_case, config, dtype, ceilings, backward_backends, tokens))
                   for tokens in config.hista_tokens]
    if "gae" in config.ops:
        groups.append(_Group("gae", ["per-token loop", *backends["gae"]],
                             functools.partial(_gae_case, config, ceilings)))
    if "numca" in config.ops:
        data = functools.cache(functools.partial(_numca_batch, config))
        groups.append(_Group("numeric_spans", ["decode+regex", *backends["numeric_spans"]],
                             functools.partial(_numeric_spans_case, config, ceilings, data)))
        groups.append(_Group("numca_values", list(backends["numca_values"]),
                             functools.partial(_numca_values_case, config, data)))
    return groups


def run(config: Config) -> Report:
    device = config.device
    matmul_rate, matmul_what = timing.matmul_flops_per_s(device)
    ceilings = {
        "matmul_flops_per_s": matmul_rate,
        "matmul": matmul_what,
        "copy_bytes_per_s": timing.copy_bytes_per_s(device, config.quick),
    }
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        # What the threads could reach together: a loaded machine leaves the multi-threaded rate far
        # below threads x the one-thread rate.
        torch.set_num_threads(1)
        try:
            ceilings["matmul_flops_per_s_1thread"] = timing.matmul_flops_per_s(device)[0]
        finally:
            torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    groups = _plan(config, dtype, ceilings)
    progress = _Progress(sum(len(group.impls) for group in groups), config.progress)
    report = Report(config={k: (str(v) if isinstance(v, torch.device) else v) for k, v in asdict(config).items()},
                    ceilings=ceilings)
    try:
        for group in groups:
            report.rows += _measure_group(group, config, progress)
    finally:
        progress.close()
    # Measured again at the end: a machine whose speed changed during the run shows it here.
    ceilings["matmul_flops_per_s_after"] = timing.matmul_flops_per_s(device)[0]
    return report
