"""What a GPU run would show about launches, checked on a CPU (docs/DESIGN.md, "GPU readiness"):

- every kernel launch runs under the tensors' device and on the current stream (Triton: inside a
  `torch.cuda.device` guard; CUDA: a CUDAGuard and the current stream in every `<<<...>>>`);
- no op's GPU launch path reads a tensor on the host (CUDA-graph capture and
  `torch.compile(mode="reduce-overhead")` need that): the Triton wrappers run with their kernels
  stubbed out on tensors that raise on every host read; the C++ host code is scanned for syncs;
- the public functions skip their data-dependent checks while a CUDA graph is being captured.
"""

import ast
import pathlib
import re

import pytest
import torch

import sveb_kernels as sk
from sveb_kernels import _checks

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRITON_MODULES = sorted((ROOT / "sveb_kernels").glob("*/triton.py"))
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))


# --- item 1: device guards ---------------------------------------------------------------------

def _launches(tree):
    """`kernel[grid](...)` calls of the module's @triton.jit functions."""
    jitted = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
              and any("jit" in ast.unparse(d) for d in node.decorator_list)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in jitted):
            yield node


def _guarded(node, parents, guarded_functions):
    """Inside `with <...device...>:`, or in a function that is only called from guarded places."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.With) and any("device" in ast.unparse(item.context_expr) for item in node.items):
            return True
        if isinstance(node, ast.FunctionDef):
            return node.name in guarded_functions
    return False


def unguarded_launches(source: str):
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    calls = {name: [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                    and n.func.id == name] for name in functions}
    guarded = set()
    changed = True
    while changed:  # a helper is guarded if it is called, and every call of it is guarded
        changed = False
        for name in functions - guarded:
            if calls[name] and all(_guarded(c, parents, guarded) for c in calls[name]):
                guarded.add(name)
                changed = True
    return [ast.unparse(node.func) for node in _launches(tree) if not _guarded(node, parents, guarded)]


@pytest.mark.parametrize("path", TRITON_MODULES, ids=lambda p: p.parent.name)
def test_every_triton_launch_runs_under_a_device_guard(path):
    source = path.read_text()
    assert list(_launches(ast.parse(source))), "no launches found: the check would be vacuous"
    assert unguarded_launches(source) == []


def test_guard_check_can_fail():
    source = '''
import triton
@triton.jit
def _k(x_ptr):
    pass
def launch(x):
    _k[(1,)](x)
def guarded(x):
    with torch.cuda.device(x.device):
        helper(x)
def helper(x):
    _k[(1,)](x)
'''
    assert unguarded_launches(source) == ["_k[1,]"] or unguarded_launches(source) == ["_k[(1,)]"]


@pytest.mark.parametrize("path", CUDA_SOURCES, ids=lambda p: p.name)
def test_every_cuda_launch_is_guarded_and_on_the_current_stream(path):
    source = path.read_text()
    launches = re.findall(r"<<<(.*?)>>>", source, flags=re.S)
    if not launches:
        pytest.skip("no kernel launches in this file")
    assert "c10::cuda::CUDAGuard" in source or "c10::cuda::OptionalCUDAGuard" in source
    assert "getCurrentCUDAStream()" in source
    for config in launches:  # grid, block, shared memory, stream
        assert re.search(r",\s*stream\s*$", config), f"launch <<<{config}>>> is not on the current stream"


# --- item 7: no host synchronisation --------------------------------------------------------------

class HostRead(AssertionError):
    pass


_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
          "unique", "unique_consecutive", "masked_select", "argwhere", "equal", "allclose"}


def _is_host(x):
    return (isinstance(x, str) and x.startswith("cpu")) or (isinstance(x, torch.device) and x.type == "cpu")


class NoHostReads(torch.Tensor):
    """A tensor that raises on every way of getting its values (or a result's) to the host; results
    of operations on it are NoHostReads too. On a GPU each of these is a synchronisation."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS:
            raise HostRead(f"{name}() reads a tensor on the host")
        if name == "to" and (any(_is_host(a) for a in args[1:]) or _is_host(kwargs.get("device"))):
            raise HostRead("to('cpu') copies a tensor to the host")
        if name == "__getitem__" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                         for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            raise HostRead("boolean indexing needs the count on the host")
        if name == "repeat_interleave" and "output_size" not in kwargs:
            raise HostRead("repeat_interleave without output_size reads the total on the host")
        return super().__torch_function__(func, types, args, kwargs)


def trapped(*tensors):
    return [None if t is None else t.as_subclass(NoHostReads) for t in tensors]


class StubKernel:
    """Stands in for a @triton.jit kernel: records launches, computes nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        assert all(isinstance(g, int) for g in grid), f"grid {grid} is not host integers"

        def launch(*args, **kwargs):
            self.launches += 1
        return launch


def stub_kernels(monkeypatch, module):
    import triton

    stubs = {}
    for name in dir(module):
        if isinstance(getattr(module, name), triton.runtime.JITFunction):
            stubs[name] = StubKernel()
            monkeypatch.setattr(module, name, stubs[name])
    return stubs


def test_trap_catches_host_reads():
    (x,) = trapped(torch.arange(5))
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: int(x[0]), lambda: x.to("cpu"),
                 lambda: bool((x > 2).any()), lambda: x[x > 2], lambda: torch.nonzero(x), lambda: x.cpu()):
        with pytest.raises(HostRead):
            read()
    assert isinstance(torch.cumsum(x, 0) + 1, NoHostReads)  # device-side work is fine


@pytest.mark.parametrize("split", [False, True], ids=["direct", "split"])
def test_triton_hista_launch_path_has_no_host_reads(monkeypatch, split):
    """It used to copy group_offsets to the host to build its schedule."""
    pytest.importorskip("triton")
    from dataclasses import replace

    from sveb_kernels.hista import triton as hista_triton

    stubs = stub_kernels(monkeypatch, hista_triton)
    n = 300
    cfg = replace(hista_triton.INTERPRETER_CONFIG, min_split_keys=64 if split else 1 << 20)
    hidden, returns, ids, offsets, key_mask, key_bias = trapped(
        torch.randn(n, 24), torch.randn(n), torch.randint(0, 9, (n,), dtype=torch.int32),
        torch.tensor([0, 7, 7, 150, n]), torch.rand(n) > 0.1, torch.randn(n))
    hista_triton.hista_values(hidden, returns, ids, offsets, 0.1, "cosine", key_mask, key_bias, 0.0, config=cfg)
    assert stubs["_hista_kernel"].launches == 1 and stubs["_combine_kernel"].launches == int(split)


def test_triton_gae_launch_path_has_no_host_reads(monkeypatch):
    pytest.importorskip("triton")
    from sveb_kernels.gae import triton as gae_triton

    stubs = stub_kernels(monkeypatch, gae_triton)
    rewards, values, mask = trapped(torch.randn(3, 40), torch.randn(3, 40), torch.rand(3, 40) > 0.2)
    gae_triton.gae(rewards, values, mask, 0.9, 0.8)
    assert stubs["_gae_kernel"].launches == 1


@pytest.mark.parametrize("match", ["last", "prefix"])
def test_triton_numca_launch_paths_have_no_host_reads(monkeypatch, match):
    pytest.importorskip("triton")
    from numca_cases import tokenizer_and_vocab
    from sveb_kernels.numca import triton as numca_triton

    stubs = stub_kernels(monkeypatch, numca_triton)
    _, vocab = tokenizer_and_vocab("gpt2")
    ids, mask, table = trapped(torch.randint(0, vocab.table.shape[0], (3, 30)), torch.rand(3, 30) > 0.1,
                               vocab.table)
    numca_triton.numeric_spans(ids, table, mask)
    end, key, returns, groups = trapped(torch.rand(3, 30) > 0.7, torch.randint(1, 5, (3, 30)), torch.randn(3),
                                        torch.tensor([4, 1, 4]))
    numca_triton.numca_values(end, key, returns, groups, mask, match, True, 1, 0.0)
    assert stubs["_spans_kernel"].launches == 1 and stubs["_values_kernel"].launches == 1


_CUDA_SYNCS = [r"\.item\s*<", r"\.item\s*\(", r"\.cpu\s*\(", r"at::kCPU", r"cudaDeviceSynchronize", r"cudaStreamSynchronize",
               r"cudaMemcpy\s*\(", r"\.tolist", r"_local_scalar_dense", r"at::nonzero", r"\.nonzero\s*\(",
               r"at::unique", r"masked_select"]


@pytest.mark.parametrize("path", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_host_code_never_synchronises(path):
    code = re.sub(r"//[^\n]*", "", path.read_text())  # comments may name what the code avoids
    found = [pattern for pattern in _CUDA_SYNCS if re.search(pattern, code)]
    assert found == [], f"{path.name}: host synchronisation ({found})"


def test_public_checks_do_not_read_tensors_while_capturing(monkeypatch):
    """Under CUDA-graph capture the data-dependent checks (group_offsets' ends, the token-id range,
    validate=True scans) are skipped: a host read there would abort the capture."""
    offsets = torch.tensor([0, 3, 5])
    with pytest.raises(HostRead):
        _checks.group_offsets("group_offsets", *trapped(offsets), 5, offsets.device)
    monkeypatch.setattr(_checks, "stream_capturing", lambda: True)
    assert _checks.is_tracing() and not _checks.validate_requested(True)
    _checks.group_offsets("group_offsets", *trapped(offsets), 5, offsets.device)
    # and the public functions go on to the op without reading anything
    seen = []
    monkeypatch.setattr(sk.hista._ops, "hista_values", lambda *a: seen.append(a) or (None, None))
    hidden, returns, ids = trapped(torch.randn(5, 4), torch.randn(5), torch.zeros(5, dtype=torch.int32))
    sk.hista_values(hidden, returns, ids, *trapped(offsets), backend="reference", validate=True)
    assert len(seen) == 1


# --- item 6: PTX of the newest arch ---------------------------------------------------------------

def setup_function_named(name):
    """One function of setup.py, without running setup() (which importing setup.py would)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"re": re}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("requested,expected", [
    ("8.0;9.0", "8.0;9.0+PTX"),
    ("9.0", "9.0+PTX"),
    ("9.0 8.0", "9.0+PTX;8.0"),
    ("8.0;9.0+PTX", "8.0;9.0+PTX"),
    ("8.0;10.0;9.0", "8.0;10.0+PTX;9.0"),
    ("8.0;9.0a", "8.0;9.0a;9.0+PTX"),
])
def test_cuda_build_adds_ptx_of_the_newest_arch(requested, expected):
    assert setup_function_named("cuda_arch_list")(requested) == expected


def test_torch_turns_the_arch_list_into_sass_and_ptx(monkeypatch):
    """What nvcc is then asked for: sm_80 and sm_90 SASS, and compute_90 PTX."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup_function_named("cuda_arch_list")("8.0;9.0"))
    flags = " ".join(cpp_extension._get_cuda_arch_flags())
    assert "code=sm_80" in flags and "code=sm_90" in flags and "arch=compute_90,code=compute_90" in flags
    assert "code=compute_80" not in flags


# --- item 10: the GPU suite -------------------------------------------------------------------------

SUITE = ROOT / "bench" / "gpu_suite.sh"
DOCUMENTED_ORDER = ["build", "correctness", "headline", "sanitizer", "sweeps"]  # docs/DESIGN.md, "GPU readiness"


def suite_stages():
    line = next(line for line in SUITE.read_text().splitlines() if line.startswith("STAGES="))
    return [(name, int(limit)) for name, limit in (e.split(":") for e in line.split("=", 1)[1].strip('"').split())]


def test_gpu_suite_parses():
    import subprocess

    proc = subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_suite_stages_ordered_by_value_within_budget():
    stages = suite_stages()
    assert [name for name, _ in stages] == DOCUMENTED_ORDER
    assert sum(limit for _, limit in stages[:3]) <= 6 * 60  # build + correctness + headline: ~6 minutes
    assert all(limit > 0 for _, limit in stages)
    source = SUITE.read_text()
    assert all(f"stage_{name}() {{" in source for name in DOCUMENTED_ORDER)
    assert "torch.version.cuda" in source and "triton.__version__" in source  # versions printed first


def test_gpu_suite_dry_run_writes_each_stage_and_respects_the_budget(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, SVEB_SUITE_DRY_RUN="1")
    proc = subprocess.run(["bash", str(SUITE), str(tmp_path / "full"), "900"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in (tmp_path / "full" / "summary.tsv").read_text().splitlines()[1:-1]]
    assert [r[0] for r in rows] == DOCUMENTED_ORDER and all(r[3] == "ok" for r in rows)
    assert all((tmp_path / "full" / f"{i + 1}_{name}.log").exists() for i, name in enumerate(DOCUMENTED_ORDER))
    assert "torch" in (tmp_path / "full" / "versions.txt").read_text()
    # a budget too small for any stage: every stage is skipped, none runs
    proc = subprocess.run(["bash", str(SUITE), str(tmp_path / "tiny"), "10"], capture_output=True, text=True,
                          env=env, timeout=120)
    rows = [line.split("\t") for line in (tmp_path / "tiny" / "summary.tsv").read_text().splitlines()[1:-1]]
    assert [r[0] for r in rows] == DOCUMENTED_ORDER and all(r[3].startswith("skipped") for r in rows)


# --- item 3: fp32 Hista accumulates in two levels -----------------------------------------------------

def test_fp32_hista_kernel_sums_each_d_chunk_into_a_fresh_accumulator():
    """docs/DESIGN.md "GPU readiness": one running fp32 sum over D = 4096 products missed the fp32 bound
    at temperature 1e-3 (3xTF32 and exact fp32 alike); each BLOCK_D chunk's 3xTF32 product now starts
    from zero and is added to the running tile. Checked on the compiled kernel: Triton must not fold
    the add back into the dot's accumulator."""
    import os

    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreted kernels are not compiled")
    if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sveb_kernels.hista import triton as ht

    cfg = ht.config_for(9, 232448, torch.float32)
    constexprs = ht.kernel_constexprs(cfg, torch.float32, 4096, cosine=True, has_k_add=True, direct=False)
    assert constexprs["TWO_LEVEL"] and not ht.kernel_constexprs(cfg, torch.bfloat16, 4096, cosine=True,
                                                                 has_k_add=True, direct=False)["TWO_LEVEL"]
    fn = ht._hista_kernel
    signature = {n: "constexpr" if n in constexprs else "*i64" if n == "schedule_ptr" else "*i32" if n == "rollout_ptr"
                 else "*fp32" if n.endswith("_ptr") else "fp32" if n == "empty_value" else "i32" for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ttgir = kernel.asm["ttgir"]
    dots = re.findall(r"= ttng\.warp_group_dot (%\S+), (%\S+), (%\S+)", ttgir)
    assert len(dots) == 3, "3xTF32: three dots per chunk"
    zero_constants = set(re.findall(r"(%\S+) = arith\.constant dense<0\.000000e\+00> : tensor<128x64xf32", ttgir))
    assert dots[0][2].rstrip(" {") in zero_constants, "the chunk's first dot must start from zero"
    assert re.search(r"arith\.addf %\S+#0, %\S+ : tensor<128x64xf32", ttgir), "the chunk is added to the tile"


def test_no_reverse_associative_scan_in_triton_kernels():
    """Issue 20 item 6: reverse `tl.associative_scan`s with non-commutative combines have had GPU-only
    miscompilations (triton#4362) that the interpreter cannot see (it never runs the multi-warp path).
    Kernels load a chunk reversed and scan forward instead (as GAE and numeric_spans do)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "sveb_kernels"
    found = []
    for path in root.rglob("triton.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "associative_scan"
                    and any(k.arg == "reverse" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                            for k in node.keywords)):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found
