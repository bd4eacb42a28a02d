"""Backend registry and selection: which implementation of an op serves which tensors.

Algorithms register their implementations here (`register`), the op bodies in `_ops.py` look them
up (`implementation`), and the public functions turn the user's `backend=` into a concrete name
(`resolve`) before calling the op, so a compiled graph records the backend it will run.
Implementations are registered as loaders so that importing the package never imports Triton or
the CUDA extension.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Optional, Union

import torch

BACKENDS = ("reference", "triton", "cuda", "cpp")

# For backend="auto" on CUDA tensors: the order to try. Kept per op so that measured results
# (bench/results/) can reorder one op without touching the others.
# To be filled from committed bench/results once Triton and CUDA have been timed side by side on a
# GPU (no such measurement exists yet, so every op uses the default, Triton first), e.g.
#   _AUTO_ORDER_CUDA = {"gae": ("cuda", "triton", "reference")}  # bench/results/<file>.csv, H100
# If results differ by GPU generation, key the table by (op, compute capability major) there.
_AUTO_ORDER_CUDA: dict[str, tuple[str, ...]] = {}
_DEFAULT_AUTO_ORDER_CUDA = ("triton", "cuda", "reference")

# For backend="auto" on CPU tensors: the compiled C++ kernels when the extension has them.
_AUTO_ORDER_CPU = ("cpp", "reference")

_LOADERS: dict[tuple[str, str], Callable[[], Callable]] = {}


def register(op: str, backend: str, loader: Callable[[], Callable]) -> None:
    """Declares that `loader()` returns the `backend` implementation of `op` (imported lazily)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _LOADERS[(op, backend)] = loader


def registered_ops() -> list[str]:
    return sorted({op for op, _ in _LOADERS})


@functools.lru_cache(maxsize=None)
def implementation(op: str, backend: str) -> Callable:
    try:
        loader = _LOADERS[(op, backend)]
    except KeyError:
        raise ValueError(f"backend {backend!r} has no implementation of {op}") from None
    return loader()


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton
    except Exception as e:  # a broken triton install must not break the package
        return False, f"import triton failed: {e}"
    return True, f"triton {triton.__version__}"


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(op: str, backend: str, device_type: str) -> Optional[str]:
    """None if `backend` can run `op` on tensors of `device_type`, else the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}"
    if (op, backend) not in _LOADERS:
        return f"no {backend} implementation of {op} exists yet"
    if backend == "reference":
        return None
    if backend == "triton":
        ok, reason = triton_status()
        if not ok:
            return reason
        if device_type == "cuda" or (device_type == "cpu" and _triton_interpreted()):
            return None
        return f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device_type}"
    from ._build_info import built_against, load_extension

    if backend == "cpp":
        if device_type != "cpu":
            return f"the cpp backend needs CPU tensors, got {device_type}"
        module, reason = load_extension()
        if module is None:
            return f"compiled extension unavailable: {reason}"
        if not hasattr(torch.ops.sveb, f"_cpp_{op}"):
            return f"the loaded extension has no cpp kernel for {op}; reinstall to rebuild it"
        return None
    # backend == "cuda"
    if device_type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device_type}"
    module, reason = load_extension()
    if module is None:
        return f"CUDA extension unavailable: {reason}"
    if (built_against() or {}).get("cuda") is False:
        return "the extension was built without CUDA kernels (no CUDA toolkit, or SVEB_SKIP_CUDA_BUILD=1)"
    # An extension built from older sources may lack this op's kernel.
    if not hasattr(torch.ops.sveb, f"_cuda_{op}"):
        return f"the loaded CUDA extension has no kernel for {op}; reinstall to rebuild it"
    return None


# Under torch.compile the choice is made once, eagerly, at trace time (it imports Triton or the
# extension and reads the environment, none of which belongs in a graph); the graph keeps the result.
@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: Union[torch.device, str]) -> str:
    """Turns backend='auto' (or SVEB_BACKEND) into a concrete backend, or raises ValueError."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    device_type = torch.device(device).type
    if backend == "auto":
        backend = os.environ.get("SVEB_BACKEND", "auto").strip() or "auto"
        if backend != "auto":
            reason = why_unavailable(op, backend, device_type)
            if reason is not None:
                raise ValueError(f"SVEB_BACKEND={backend!r} cannot run {op} here: {reason}")
            return backend
        order = {"cuda": _AUTO_ORDER_CUDA.get(op, _DEFAULT_AUTO_ORDER_CUDA), "cpu": _AUTO_ORDER_CPU}
        for candidate in order.get(device_type, ()):
            if why_unavailable(op, candidate, device_type) is None:
                return candidate
        return "reference"
    reason = why_unavailable(op, backend, device_type)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run {op}: {reason}")
    return backend


def available_backends(device: Union[torch.device, str, None] = None) -> dict[str, list[str]]:
    """For each op, the backends that can run it on `device` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {
        op: [b for b in BACKENDS if why_unavailable(op, b, device_type) is None] for op in registered_ops()
    }


def backward_backend(op: str, forward_backend: str, device_type: str) -> str:
    """The backend that differentiates `op` after `forward_backend` computed it: the same backend when
    it has a backward (`<op>_backward`), else the fastest one that has (Triton on CUDA), else the
    reference, which runs anywhere. So a forward on the cpp or cuda kernel is differentiable too."""
    backward = f"{op}_backward"
    if why_unavailable(backward, forward_backend, device_type) is None:
        return forward_backend
    order = {"cuda": _AUTO_ORDER_CUDA.get(backward, _DEFAULT_AUTO_ORDER_CUDA)}.get(device_type, ())
    for candidate in order:
        if why_unavailable(backward, candidate, device_type) is None:
            return candidate
    return "reference"
