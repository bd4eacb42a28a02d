"""sveb_kernels: fused kernels for state-value estimation in LLM reinforcement learning.

Public API only; see ../README.md and ../docs/CONTRACT.md for the contract of each op.
"""

import os as _os
import sys as _sys


def _is_cli_process() -> bool:
    """True in the `sveb-kernels` command (console script or `python -m sveb_kernels.cli`)."""
    argv = list(getattr(_sys, "orig_argv", ()))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "sveb_kernels.cli":
        return True
    return bool(_sys.argv) and _os.path.basename(_sys.argv[0]).split(".")[0] == "sveb-kernels"


def _load_api() -> None:
    """Imports the public API (and torch, and registers the ops)."""
    from ._backend import available_backends
    from .gae import gae, masked_whiten
    from .hista import HistaOutput, hista_values
    from .numca import NumericSpans, NumericVocab, numca_values, numeric_spans
    from .packing import Packing

    globals().update({k: v for k, v in locals().items()})


def __getattr__(name):
    # Only the deferred public names; anything else (a submodule being imported, say) is a plain miss.
    if name in globals().get("__all__", ()) and name not in globals():
        _load_api()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The command defers torch (2-3 s to import) until a subcommand runs, so `--help` answers at once;
# everywhere else `import sveb_kernels` loads the API and registers the ops right away.
if not _is_cli_process():
    _load_api()

__version__ = "0.1.0"

__all__ = [
    "HistaOutput",
    "NumericSpans",
    "NumericVocab",
    "Packing",
    "available_backends",
    "gae",
    "hista_values",
    "masked_whiten",
    "numca_values",
    "numeric_spans",
    "__version__",
]
