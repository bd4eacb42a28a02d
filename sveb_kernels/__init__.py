"""sveb_kernels: fused kernels for state-value estimation in LLM reinforcement learning.

Public API only; see ../README.md and ../docs/CONTRACT.md for the contract of each op.
"""

from ._backend import available_backends
from .gae import gae, masked_whiten
from .hista import HistaOutput, hista_values
from .numca import NumericSpans, NumericVocab, numca_values, numeric_spans
from .packing import Packing

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
