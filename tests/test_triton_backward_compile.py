"""The Triton Hista backward kernel compiles for real GPUs (sm80, sm90), checked without one: the
interpreter (tests/triton/test_hista_backward_triton.py) runs its arithmetic, not Triton's compiler."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="interpreted kernels are not compiled")

from sveb_kernels import _triton_aot  # noqa: E402

if not (_triton_aot.NVIDIA_BIN / "ptxas").exists():
    pytest.skip("this triton has no bundled ptxas", allow_module_level=True)

POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def compile_backward(arch, dtype, key_side, cosine=True, has_k_add=True):
    from sveb_kernels.hista import triton as ht

    cfg = ht.backward_config_for(dtype)
    constexprs = dict(KEY_SIDE=key_side, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                      HAS_K_SCALE=cosine, HAS_K_ADD=has_k_add, UPCAST_DOT=False,
                      DOT_PRECISION=ht._dot_precision(dtype))
    return _triton_aot.compile_for(ht._hista_backward_kernel, arch,
                                   dict(hidden_ptr=POINTER[dtype], rollout_ptr="*i32", schedule_ptr="*i64"), {},
                                   constexprs, cfg.num_warps, cfg.num_stages, multiples_of_16=("D",))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("key_side", [False, True])
def test_backward_kernel_compiles_on_tensor_cores_without_spills(arch, dtype, key_side):
    kernel = compile_backward(arch, dtype, key_side)
    ptx = kernel.asm["ptx"]
    assert ("mma" in ptx), "no tensor-core instruction in the backward kernel"
    spilled = _triton_aot.spilled_bytes(kernel)
    assert spilled in (None, 0), f"spills {spilled} B"


def test_backward_variants_compile():
    compile_backward(90, torch.bfloat16, True, cosine=False, has_k_add=False)
    compile_backward(90, torch.bfloat16, False, cosine=False, has_k_add=False)
