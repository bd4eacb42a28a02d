"""The Triton kernels compile for real GPUs, checked on a machine without one.

The interpreter (tests/triton/) runs the kernels' arithmetic but not Triton's GPU compiler, which
rejects things the interpreter accepts (types changing across loop iterations, layouts, shared
memory). Triton compiles ahead of time for a named target with its bundled ptxas, so every kernel
variant the wrappers can launch is compiled here for Ampere (sm80) and Hopper (sm90); the tuned
configs must use tensor cores and must not spill registers.
"""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="interpreted kernels are not compiled")

from sveb_kernels import _triton_aot  # noqa: E402

if not (_triton_aot.NVIDIA_BIN / "ptxas").exists():
    pytest.skip("this triton has no bundled ptxas", allow_module_level=True)

# Shared memory per block (opt-in) of the targets: A100 and H100.
SMEM = {80: 166912, 90: 232448}
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def compile_kernel(fn, arch, pointer_types, scalar_types, constexprs, num_warps, num_stages=3, multiples_of_16=()):
    return _triton_aot.compile_for(fn, arch, pointer_types, scalar_types, constexprs, num_warps, num_stages,
                                   multiples_of_16)


def spilled_bytes(kernel):
    return _triton_aot.spilled_bytes(kernel)


def compile_hista(arch, dtype, d=4096, rollout="*i32", ones=(), **variant):
    """`ones`: integer arguments passed as 1, which Triton's launcher turns into constants."""
    from sveb_kernels.hista import triton as ht

    cfg = ht.config_for(arch // 10, SMEM[arch], dtype)
    if variant.pop("flatten", False):
        cfg = replace(cfg, flatten=True)
    flags = dict(cosine=True, has_k_add=True, direct=False)
    flags.update(variant)
    constexprs = ht.kernel_constexprs(cfg, dtype, d, **flags)
    constexprs.update(dict.fromkeys(ones, 1))
    kernel = compile_kernel(ht._hista_kernel, arch, dict(hidden_ptr=POINTER[dtype], rollout_ptr=rollout,
                                                         schedule_ptr="*i64"),
                            dict(empty_value="fp32"), constexprs, cfg.num_warps, cfg.num_stages,
                            multiples_of_16=("D",) if d % 16 == 0 else ())
    return kernel


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tuned_hista_configs_use_tensor_cores_without_spills(arch, dtype):
    kernel = compile_hista(arch, dtype)
    ptx = kernel.asm["ptx"]
    assert ("wgmma.mma_async" in ptx) if arch == 90 else ("mma.sync" in ptx)
    assert spilled_bytes(kernel) == 0


@pytest.mark.parametrize("variant", [
    dict(d=1), dict(d=100), dict(d=896), dict(d=8191),  # one chunk; uneven chunks
    dict(direct=True, has_k_add=False, cosine=False),
    dict(rollout="*i64"),
    dict(flatten=True), dict(flatten=True, d=77),
    dict(d=1, ones=("D", "N", "num_sched_groups", "search_steps")),  # Triton makes arguments equal to 1 constants
])
def test_hista_variants_compile(variant):
    compile_hista(90, torch.bfloat16, **variant)


def test_helper_kernels_compile():
    from sveb_kernels.gae import triton as gt
    from sveb_kernels.hista import triton as ht

    for arch in (80, 90):
        for block_d in (1, 256):  # the row kernel's BLOCK_D follows D up to 256
            compile_kernel(ht._row_terms_kernel, arch, dict(hidden_ptr="*bf16", key_mask_ptr="*u8"),
                           dict(q_factor="fp32", eps="fp32"),
                           dict(COSINE=True, HAS_MASK=True, HAS_BIAS=True, BLOCK_R=32, BLOCK_D=block_d), 4)
        compile_kernel(ht._combine_kernel, arch, {}, dict(empty_value="fp32"), dict(BLOCK=1024), 4)
        for offsets in ("*i64", "*i32"):   # the two schedule kernels (issue 20: they replace ~35 torch ops)
            compile_kernel(ht._schedule_rows_kernel, arch, dict(offsets_ptr=offsets, table_ptr="*i64", items_ptr="*i64"),
                           {}, dict(BLOCK_M=128, BLOCK_N=64, MIN_SPLIT_KEYS=1024, MAX_SPLITS=16,
                                    BLOCK=ht._SCHEDULE_BLOCK), 4)
        compile_kernel(ht._schedule_first_items_kernel, arch, dict(table_ptr="*i64", items_ptr="*i64"), {},
                       dict(BLOCK=1024), 4)
        compile_kernel(ht._combine_kernel, arch, {}, dict(empty_value="fp32"), dict(BLOCK=1024, N=1, num_splits=1), 4)
        compile_kernel(gt._gae_kernel, arch, {}, dict(gamma_hi="fp32", gamma_lo="fp32", gamma_lam="fp32"), dict(BLOCK_T=16, T=1, NEXT_DTYPE=triton.language.float32), 4)
        for block_t, warps in ((1024, 4), (2048, 8)):
            kernel = compile_kernel(gt._gae_kernel, arch, dict(rewards_ptr="*bf16", mask_ptr="*u8"),
                                    dict(gamma_hi="fp32", gamma_lo="fp32", gamma_lam="fp32"),
                                    dict(BLOCK_T=block_t, NEXT_DTYPE=triton.language.float32), warps)
            assert spilled_bytes(kernel) == 0
        # float64 values: nextv is scanned in float64 (issue 20 item 3)
        kernel = compile_kernel(gt._gae_kernel, arch, dict(values_ptr="*fp64", mask_ptr="*u8"),
                                dict(gamma_hi="fp32", gamma_lo="fp32", gamma_lam="fp32"),
                                dict(BLOCK_T=2048, NEXT_DTYPE=triton.language.float64), 8)
        assert spilled_bytes(kernel) == 0


@pytest.mark.parametrize("arch", [80, 90])
def test_numca_kernels_compile_without_spills(arch):
    from sveb_kernels.numca import triton as nt

    for width in (1, 2):  # class-table columns: vocabularies whose tokens hold <= 8 or <= 16 bytes of classes
        kernel = compile_kernel(
            nt._spans_kernel, arch,
            dict(ids_ptr="*i64", mask_ptr="*u8", table_ptr="*i64", fdelta_ptr="*i8", bdelta_ptr="*i8", pow_ptr="*fp64",
                 carry_ptr="*i32", end_ptr="*u8", key_ptr="*i64", value_ptr="*fp64", start_ptr="*i32"),
            {}, dict(COLS=2 + width, WIDTH=width, WP=width, HAS_MASK=True, BLOCK_T=1024), 8)
        assert spilled_bytes(kernel) == 0
    for prefix in (False, True):
        kernel = compile_kernel(
            nt._values_kernel, arch,
            dict(valid_ptr="*u8", mask_ptr="*u8", key_ptr="*i64", sorted_ptr="*i64", count_ptr="*i32", h1_ptr="*i64",
                 h2_ptr="*i64", returns_ptr="*fp64", order_ptr="*i64", lo_ptr="*i64", hi_ptr="*i64",
                 baseline_ptr="*fp64", out_ptr="*fp32"),
            {}, dict(PREFIX=prefix, SEARCH_STEPS=12, BLOCK_T=1024), 8)
        assert spilled_bytes(kernel) == 0


def _ptx_code(kernel):
    """PTX instructions without debug sections, line markers and comments."""
    ptx = kernel.asm["ptx"].split(".section\t.debug")[0]
    lines = (" ".join(line.split("//")[0].split()) for line in ptx.splitlines())
    return [line for line in lines if line and not line.startswith((".loc", ".file"))]


def test_loop_bound_leaves_compiled_code_unchanged():
    """`loop_bound` (the interpreter shim of sveb_kernels/_triton_compat.py) inlines to nothing."""
    import triton.language as tl

    from sveb_kernels._triton_compat import loop_bound

    @triton.jit
    def plain(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(0, n, BLOCK):
            acc += tl.load(x_ptr + i + tl.arange(0, BLOCK))
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)

    @triton.jit
    def shimmed(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(0, loop_bound(n), BLOCK):
            acc += tl.load(x_ptr + i + tl.arange(0, BLOCK))
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)

    compiled = [_ptx_code(compile_kernel(fn, 90, {}, {}, dict(BLOCK=128), 4)) for fn in (plain, shimmed)]
    assert compiled[0] == [line.replace("shimmed", "plain") for line in compiled[1]]


@pytest.mark.slow  # ~110 kernels compiled (minutes on 2 cores; Triton's cache makes reruns fast)
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sweep_offers_only_configs_that_fit_compiled(arch, dtype):
    """The sweep's candidates are filtered on the compiled kernel: shared memory within the block's
    opt-in limit and no register spills (128x256x64 fp32 needs 196,608 B, more than an A100 has)."""
    from sveb_kernels.hista import triton as ht

    candidates = ht.candidate_configs_for(arch // 10, SMEM[arch], dtype)
    offered = ht.fitting_candidates(arch // 10, arch % 10, SMEM[arch], dtype)
    assert offered[0] == candidates[0] == ht.config_for(arch // 10, SMEM[arch], dtype)
    assert len(offered) > 1 and all(cfg in candidates for cfg in offered)
    for cfg in candidates:
        kernel = ht.compile_config(cfg, dtype, arch)
        fits = kernel.metadata.shared <= SMEM[arch] and spilled_bytes(kernel) == 0
        assert (cfg in offered) == fits, (cfg, kernel.metadata.shared, spilled_bytes(kernel))
    assert not any((c.block_m, c.block_n, c.block_d) == (128, 256, 64) for c in offered if dtype == torch.float32)


def test_spans_kernel_orders_carry_stores_before_their_loads():
    """Pass 1 of the Numca spans kernel stores each chunk's carry from one thread; pass 2 reads it in
    every thread. Only a barrier between them orders the two (the interpreter runs one thread and
    cannot show the race), so the barrier is checked in the source."""
    source = (Path(__file__).resolve().parents[1] / "sveb_kernels" / "numca" / "triton.py").read_text()
    kernel = source[source.index("def _spans_kernel("):]
    kernel = kernel[:kernel.index("\n@triton.jit") if "\n@triton.jit" in kernel else len(kernel)]
    last_store = kernel.rindex("tl.store(carry_ptr")
    first_load = kernel.index("tl.load(carry_ptr")
    assert last_store < first_load
    assert "tl.debug_barrier()" in kernel[last_store:first_load]
