"""Runs every op with every available backend and with the baselines users write today, checks that
the results agree, and collects one row per (op, size, implementation)."""

from __future__ import annotations

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


def _measure_variants(op: str, label: str, variants, config: Config, progress: _Progress, expected, compare,
                      work: Optional[_Work] = None, **row_fields) -> list[Row]:
    """Runs (impl, fn, checked) in order; the first is the baseline the others' speedups are against."""
    rows, baseline_ms = [], None
    for index, (impl, fn, checked) in enumerate(variants):
        progress.step(f"{op} {impl} {label}")
        row = Row(op, label, impl, **row_fields)
        _run_variant(row, fn, config, expected if checked else None, compare, baseline_ms)
        if index == 0:
            baseline_ms = row.median_ms
        if row.median_ms and work is not None:
            row.rate, row.rate_unit = work.amount / (row.median_ms / 1e3) / work.scale, work.unit
            row.pct_of_ceiling = 100 * row.rate * work.scale / work.ceiling_per_s
        rows.append(row)
    return rows


def _hista_rows(config: Config, dtype: torch.dtype, ceilings: dict, progress: _Progress) -> list[Row]:
    rows = []
    temperature, similarity = 0.1, "cosine"
    for tokens in config.hista_tokens:
        case = cases.hista_case(config.groups, config.rollouts, tokens, config.hidden_size, dtype, config.device)
        args = (case.hidden, case.returns, case.rollout_ids, case.group_offsets)
        tol = (1e-4 if dtype == torch.float32 else 5e-2) * float(case.returns.abs().max().clamp_min(1e-30))

        def compare(result, reference):
            values = result[0] if isinstance(result, tuple) else result
            diff = float((values.float() - reference).abs().max()) if values.numel() else 0.0
            return diff, diff <= tol

        reference = hista_values(*args, temperature=temperature, similarity=similarity, backend="reference").values
        variants = [("naive PyTorch", lambda: baselines.naive_hista(*args, temperature, similarity), True)]
        if config.device.type == "cuda" and config.hidden_size <= 256:
            variants.append(("FlexAttention", lambda: baselines.flex_attention_hista(*args, temperature, similarity),
                             True))
        for backend in _backend.available_backends(config.device)["hista_values"]:
            variants.append((backend, lambda b=backend: hista_values(*args, temperature=temperature,
                                                                      similarity=similarity, backend=b), True))
        work = _Work(case.flops, "TFLOP/s", 1e12, ceilings["matmul_flops_per_s"])
        rows += _measure_variants("hista_values", case.label, variants, config, progress, reference, compare, work,
                                  tokens_per_group=tokens, total_tokens=int(case.hidden.shape[0]))
    return rows


def _hista_backward_rows(config: Config, dtype: torch.dtype, ceilings: dict, progress: _Progress) -> list[Row]:
    from . import backward

    rows = []
    for tokens in config.hista_tokens:
        case = cases.hista_case(config.groups, config.rollouts, tokens, config.hidden_size, dtype, config.device)
        expected, compare, variants = backward.variants(case, 0.1, "cosine", config.device)
        # forward (1 GEMM) + backward (3 GEMMs: scores again, dX as queries, dX as keys)
        work = _Work(4 * case.flops, "TFLOP/s", 1e12, ceilings["matmul_flops_per_s"])
        rows += _measure_variants("hista fwd+bwd", case.label, variants, config, progress, expected, compare, work,
                                  tokens_per_group=tokens, total_tokens=int(case.hidden.shape[0]))
    return rows


def _gae_rows(config: Config, ceilings: dict, progress: _Progress) -> list[Row]:
    batch, length = config.gae_shape
    case = cases.gae_case(batch, length, config.device)
    args, options = (case.rewards, case.values, case.mask), dict(gamma=1.0, lam=0.95)
    reference = gae(*args, **options, backend="reference")[0]
    bound = 1e-5 * (1 + float(reference.abs().max())) * math.log2(length + 1)

    def compare(result, expected):
        diff = float((result[0] - expected).abs().max())
        return diff, diff <= bound

    variants = [("per-token loop", lambda: baselines.gae_loop(*args, **options), True)]
    for backend in _backend.available_backends(config.device)["gae"]:
        variants.append((backend, lambda b=backend: gae(*args, **options, backend=b), True))
    work = _Work(case.bytes_moved, "GB/s", 1e9, ceilings["copy_bytes_per_s"])
    return _measure_variants("gae", case.label, variants, config, progress, reference, compare, work,
                             total_tokens=batch * length)


def _numca_rows(config: Config, ceilings: dict, progress: _Progress) -> list[Row]:
    from ..numca import NumericVocab, toy_tokenizers

    batch, length = config.numca_shape
    tokenizer = toy_tokenizers.build("llama3")
    vocab = NumericVocab.from_tokenizer(tokenizer)
    ids, mask = cases.numca_token_batch(tokenizer, batch, length)
    specials = set(torch.nonzero(vocab.special).flatten().tolist())
    label = f"B={batch} T={length} llama3-style"
    baseline = baselines.regex_baseline(tokenizer, ids, mask, specials)
    expected = (baseline[0], baseline[3])  # end and start per token (the baseline's key is a Python hash)

    def compare(result, reference):
        same = result.end.cpu().tolist() == reference[0] and result.start.cpu().tolist() == reference[1]
        return None, same

    ids_d, mask_d, vocab_d = ids.to(config.device), mask.to(config.device), vocab.to(config.device)
    variants = [("decode+regex", lambda: baselines.regex_baseline(tokenizer, ids, mask, specials), False)]
    for backend in _backend.available_backends(config.device)["numeric_spans"]:
        variants.append((backend, lambda b=backend: numeric_spans(ids_d, vocab_d, mask_d, backend=b), True))
    # Bytes the op must move: ids and mask in; end, key, value, start out.
    work = _Work(ids.numel() * (ids.element_size() + 1 + 1 + 8 + 8 + 4), "GB/s", 1e9, ceilings["copy_bytes_per_s"])
    rows = _measure_variants("numeric_spans", label, variants, config, progress, expected, compare, work,
                             total_tokens=batch * length)
    rows[0].note = "what trainers do today"

    spans = numeric_spans(ids_d, vocab_d, mask_d, backend="reference")
    returns = torch.rand(batch, generator=torch.Generator().manual_seed(0)).to(config.device)
    group_index = torch.arange(batch, device=config.device) // 16
    reference = numca_values(spans, returns, group_index, mask_d, backend="reference")

    def compare_values(result, expected_values):
        diff = float((result - expected_values).abs().max()) if result.numel() else 0.0
        return diff, diff <= 1e-5 * (1 + float(expected_values.abs().max()))

    variants = [(backend, lambda b=backend: numca_values(spans, returns, group_index, mask_d, backend=b), True)
                for backend in _backend.available_backends(config.device)["numca_values"]]
    rows += _measure_variants("numca_values", f"{label}, groups of 16", variants, config, progress, reference,
                              compare_values, note="match=last", total_tokens=batch * length)
    return rows


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
    backends = _backend.available_backends(device)
    flex = device.type == "cuda" and config.hidden_size <= 256
    counts = {"hista": len(config.hista_tokens) * (1 + flex + len(backends["hista_values"])),
              "hista_backward": len(config.hista_tokens) * (1 + len(backends.get("hista_values_backward", []))),
              "gae": 1 + len(backends["gae"]),
              "numca": 1 + len(backends["numeric_spans"]) + len(backends["numca_values"])}
    progress = _Progress(sum(counts.get(op, 0) for op in config.ops), config.progress)
    report = Report(config={k: (str(v) if isinstance(v, torch.device) else v) for k, v in asdict(config).items()},
                    ceilings=ceilings)
    try:
        if "hista" in config.ops:
            report.rows += _hista_rows(config, dtype, ceilings, progress)
        if "hista_backward" in config.ops:
            report.rows += _hista_backward_rows(config, dtype, ceilings, progress)
        if "gae" in config.ops:
            report.rows += _gae_rows(config, ceilings, progress)
        if "numca" in config.ops:
            report.rows += _numca_rows(config, ceilings, progress)
    finally:
        progress.close()
    # Measured again at the end: a machine whose speed changed during the run shows it here.
    ceilings["matmul_flops_per_s_after"] = timing.matmul_flops_per_s(device)[0]
    return report
