"""sveb-kernels: fused Hista, Numca and GAE kernels for LLM RL value estimation, their benchmark, and SVEB.

Start with `sveb-kernels info` (which backend serves which op here), then `sveb-kernels bench --quick`
(every op x backend against the PyTorch users write without this package). `sveb-kernels sveb eval
--quick` scores value estimators on the embedded SVEB task. `sveb-kernels COMMAND --help` for details.
The ops' contract: docs/CONTRACT.md.
"""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _backend, _versions
    from ._build_info import built_against, load_extension

    print(f"sveb_kernels {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    cuda = torch.version.cuda or "none (CPU-only build)"
    print(f"torch        {torch.__version__} (CUDA {cuda})")
    warnings = [_versions.untested("torch", torch.__version__)]
    if torch.cuda.is_available():
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"GPU          {devices}")
    else:
        print("GPU          none visible")
    ok, triton_reason = _backend.triton_status()
    print(f"triton       {triton_reason}")
    if ok:
        import triton

        warnings.append(_versions.untested("triton", triton.__version__))
    print(f"tested       {_versions.tested_ranges()}")
    for warning in filter(None, warnings):
        print(f"WARNING      {warning}")
    info = built_against()
    if info:
        built = ", ".join(f"{k} {info[k]}" for k in ("torch", "torch_cuda", "nvcc", "archs") if k in info)
        print(f"extension    built against {built}")
    module, reason = load_extension()
    print(f"extension    {reason}")
    if module is not None:
        compiled = [op for op in _backend.registered_ops() if hasattr(torch.ops.sveb, f"_cuda_{op}")
                    and torch._C._dispatch_has_kernel_for_dispatch_key(f"sveb::_cuda_{op}", "CUDA")]
        print(f"extension    CUDA kernels for: {', '.join(compiled) or 'none'}")
        cpu = [op for op in _backend.registered_ops() if hasattr(torch.ops.sveb, f"_cpp_{op}")]
        print(f"extension    cpp (CPU) kernels for: {', '.join(cpu) or 'none'}")
    print()
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    width = max(len(op) for op in _backend.registered_ops())
    print(f"{'op'.ljust(width)}  " + "  ".join(f"{d}: backends (auto first)".ljust(40) for d in device_types))
    for op in _backend.registered_ops():
        cells = []
        for device_type in device_types:
            usable = [b for b in _backend.BACKENDS if _backend.why_unavailable(op, b, device_type) is None]
            auto = _backend.resolve(op, "auto", device_type) if usable else "-"
            cells.append(", ".join([auto] + [b for b in usable if b != auto]).ljust(40))
        print(f"{op.ljust(width)}  " + "  ".join(cells))
    if args.verbose:
        print()
        for op in _backend.registered_ops():
            for device_type in device_types:
                for backend in _backend.BACKENDS:
                    reason = _backend.why_unavailable(op, backend, device_type)
                    if reason:
                        print(f"  {op} / {backend} on {device_type}: {reason}")
    return 0


SVEB_HELP = "SVEB: build value datasets and score state value estimators"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with argv, only the subcommand argv names is built in full (the others are
    help lines), so `sveb-kernels --help` and `bench --help` need neither torch nor the SVEB harness."""
    parser = argparse.ArgumentParser(prog="sveb-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, the compiled extension, and which backends serve which op")
    info.add_argument("-v", "--verbose", action="store_true", help="say why each missing backend is missing")
    info.set_defaults(func=_info)
    from .benchmark import add_parser as add_bench_parser

    add_bench_parser(commands)
    command = None if argv is None else next((a for a in argv if not a.startswith("-")), None)
    if argv is None or command == "sveb":
        from .sveb.cli import add_parser as add_sveb_parser

        add_sveb_parser(commands)
    else:
        commands.add_parser("sveb", help=SVEB_HELP, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    from . import _load_api

    _load_api()  # torch and the ops, now that a subcommand runs
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
