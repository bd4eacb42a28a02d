"""Build rules for the optional compiled extension `sveb_kernels._C`.

Everything else is pure Python and lives in pyproject.toml. The extension holds the `cpp` backend's
CPU kernels (csrc/cpu/, needs only a C++ compiler and torch) and, when a CUDA toolkit and a CUDA build
of torch are both present (or SVEB_FORCE_CUDA_BUILD=1; compiling needs no GPU), the `cuda` backend's
kernels too. SVEB_SKIP_CUDA_BUILD=1 builds the CPU kernels only; SVEB_SKIP_EXTENSION=1 builds no
extension at all. A failed build installs the package without it (the reference backend serves)
unless SVEB_FORCE_CUDA_BUILD=1. SVEB_CUDA_ARCHS (default "8.0;9.0") picks the GPU architectures
(SASS for each, plus PTX of the newest, which newer GPUs JIT-compile); MAX_JOBS bounds the parallel compile (honoured by torch's ninja build).

What the extension was built against is written to sveb_kernels/_C_build.json so that an import
under a different torch can refuse to load it instead of crashing (see sveb_kernels/_build_info.py).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "sveb_kernels", "_C_build.json")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _nvcc_target(nvcc: str) -> str:
    """The real nvcc binary behind `nvcc`: follows symlinks and `exec /path/nvcc "$@"` wrapper scripts.

    torch guesses CUDA_HOME as dirname(dirname(which nvcc)); for a wrapper in /usr/local/bin that
    guess is wrong, so we look inside small text files for the binary they exec.
    """
    for _ in range(8):
        nvcc = os.path.realpath(nvcc)
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
        except OSError:
            return nvcc
        if not head.startswith(b"#!"):
            return nvcc
        match = re.search(rb"(/\S+/nvcc)\b", head[2:].split(b"\n", 1)[-1] or head)
        if not match:
            return nvcc
        nvcc = match.group(1).decode()
    return nvcc


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit_root(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(_nvcc_target(nvcc)))
        if _is_toolkit_root(root):
            return root
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit_root(c)), None)


def pip_cuda_include_dirs() -> list[str]:
    """Headers shipped by the pip CUDA wheels (cusparse.h and friends that torch's headers include)."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def nvcc_release(cuda_home: str) -> str:
    out = os.popen(f'"{os.path.join(cuda_home, "bin", "nvcc")}" --version').read()
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def cuda_extension_plan():
    """Returns (build: bool, reason: str, cuda_home: str | None)."""
    if _flag("SVEB_SKIP_CUDA_BUILD"):
        return False, "SVEB_SKIP_CUDA_BUILD=1", None
    force = _flag("SVEB_FORCE_CUDA_BUILD")
    cuda_home = find_cuda_home()
    try:
        import torch  # noqa: F401
        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    problems = []
    if cuda_home is None:
        problems.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if torch_cuda is None:
        problems.append("torch is missing or is a CPU-only build")
    if cuda_home is not None and torch_cuda is not None:
        nvcc = nvcc_release(cuda_home)
        # torch refuses to compile when the toolkit's major version differs from its own CUDA's.
        if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
            problems.append(f"nvcc {nvcc} in {cuda_home} does not match torch's CUDA {torch_cuda}")
    if problems and force:
        raise RuntimeError("SVEB_FORCE_CUDA_BUILD=1 but " + "; ".join(problems))
    if problems:
        return False, "; ".join(problems), cuda_home
    return True, "forced" if force else "CUDA toolkit and CUDA torch found", cuda_home


def cuda_arch_list(archs: str) -> str:
    """TORCH_CUDA_ARCH_LIST for the requested archs ("8.0;9.0"): SASS for each, plus PTX of the
    newest ("9.0+PTX"), so that GPUs newer than every listed arch JIT-compile the kernels instead of
    failing with "no kernel image". An arch-specific newest ("9.0a": its PTX runs on no other GPU)
    gets the PTX of its plain arch added."""
    entries = [a for a in re.split(r"[;\s]+", archs.strip()) if a]
    if not entries:
        raise ValueError(f"SVEB_CUDA_ARCHS names no architecture: {archs!r}")

    def version(entry: str) -> tuple[int, int]:
        major, minor = entry.split("+")[0].split(".")
        return int(major), int(re.match(r"\d+", minor).group())

    newest = max(entries, key=version)
    base = newest.split("+")[0]
    if base[-1].isalpha():  # arch-specific (sm_90a, sm_100a): its PTX is not forward compatible
        plain = "%d.%d+PTX" % version(newest)
        return ";".join(entries + ([plain] if plain not in entries else []))
    if not newest.endswith("+PTX"):
        entries[entries.index(newest)] = base + "+PTX"
    return ";".join(entries)


def _cpu_sources() -> list[str]:
    return sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))


# at::parallel_for is inlined into the kernels: they must be compiled with OpenMP, torch's CPU backend.
_OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []


def build_kwargs() -> dict:
    if _flag("SVEB_SKIP_EXTENSION"):
        print("sveb_kernels: not building the extension (SVEB_SKIP_EXTENSION=1)", file=sys.stderr)
        if os.path.exists(BUILD_INFO):
            os.remove(BUILD_INFO)
        return {}
    build, reason, cuda_home = cuda_extension_plan()
    if not build:
        print(f"sveb_kernels: not building the CUDA kernels ({reason}); building the CPU kernels only",
              file=sys.stderr)
        if os.path.exists(BUILD_INFO):
            os.remove(BUILD_INFO)
        try:
            import torch
            from torch.utils.cpp_extension import BuildExtension, CppExtension
        except ImportError as e:
            print(f"sveb_kernels: not building the extension (torch is needed to build it: {e})", file=sys.stderr)
            return {}
        info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda": False, "nvcc": None,
                "cuda_home": None, "archs": None, "python": sys.version.split()[0]}
        ext = CppExtension(
            name="sveb_kernels._C",
            sources=_cpu_sources() + [os.path.join("csrc", "cpu_only", "module.cpp")],
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=["-O3"] + _OPENMP_FLAGS,
            extra_link_args=_OPENMP_FLAGS,
            py_limited_api=False,
        )
        return _optional_build(ext, BuildExtension, info, force=False)

    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, so set it first.
    os.environ["CUDA_HOME"] = cuda_home
    # An explicit TORCH_CUDA_ARCH_LIST is taken as given; SVEB_CUDA_ARCHS gets PTX of its newest arch.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_arch_list(os.environ.get("SVEB_CUDA_ARCHS", "8.0;9.0")))
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    sources += _cpu_sources()
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": True,
        "nvcc": nvcc_release(cuda_home),
        "cuda_home": cuda_home,
        "archs": archs,
        "python": sys.version.split()[0],
    }
    print(f"sveb_kernels: building the CUDA extension ({reason}): {info}", file=sys.stderr)
    print(f"sveb_kernels: compiling the optional CUDA kernels (sveb_kernels._C) for archs {archs} takes minutes "
          "(~5 on 2 cores; no GPU needed); pip shows only 'still running...'. SVEB_SKIP_CUDA_BUILD=1 skips it: "
          "the Triton and reference backends serve without it.", file=sys.stderr)

    include_dirs = [os.path.join(ROOT, "csrc")] + pip_cuda_include_dirs()
    ext = CUDAExtension(
        name="sveb_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3"] + _OPENMP_FLAGS,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        extra_link_args=_OPENMP_FLAGS,
        # Python's limited API is not enough for torch extensions; we need the full one.
        py_limited_api=False,
    )
    return _optional_build(ext, BuildExtension, info, force=_flag("SVEB_FORCE_CUDA_BUILD"))


def _optional_build(ext, build_extension, info: dict, force: bool) -> dict:
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=1)
    base = build_extension.with_options(use_ninja=shutil.which("ninja") is not None)

    class OptionalBuildExtension(base):
        """The extension is optional: unless SVEB_FORCE_CUDA_BUILD=1, a failed compile installs the
        package without it (the other backends serve) instead of failing the whole install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler errors surface as several exception types
                if force:
                    raise
                print(f"sveb_kernels: WARNING: the extension failed to build ({e}); installing without it. "
                      "Set SVEB_FORCE_CUDA_BUILD=1 to see the failure as an error.", file=sys.stderr)
                if os.path.exists(BUILD_INFO):
                    os.remove(BUILD_INFO)

    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": OptionalBuildExtension},
        "package_data": {"sveb_kernels": ["_C_build.json"]},
    }


setup(**build_kwargs())
