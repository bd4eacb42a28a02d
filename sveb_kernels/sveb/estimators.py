"""State value estimators scored by SVEB. They are `sveb_kernels.estimators`, the interface the
trainer integrations run too, so SVEB scores exactly what a trainer uses.

An estimator has a `name`, an optional `fit(train_batch)` (called once with the train split) and
`estimate(batch) -> values [B, L]` aligned with `batch.input_ids` (see batch.py); only the cells of
the batch's states are scored. Any callable `fn(batch) -> [B, L]` works too (`as_estimator`).

    group_mean      GRPO's baseline: the mean return of the prompt's G rollouts, at every token
    rloo            leave-one-out mean: the mean return of the *other* rollouts of the prompt
    critic          a linear value head (ridge regression) on the model's hidden states, fit to the
                    rollouts' returns on the train split: the PPO critic's stand-in
    numca_last/prefix   Numca (docs/CONTRACT.md §2) through sveb_kernels.numca: peers that wrote the same last
                    number / the same sequence of numbers
    hista_cos/dot   Hista (docs/CONTRACT.md §1) through sveb_kernels.hista_values: returns of the other rollouts'
                    tokens weighted by hidden-state similarity, at a given temperature
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Sequence

from ..estimators import (
    CallableEstimator,
    Estimator,
    GroupMean,
    Hista,
    LeaveOneOutMean,
    LinearCritic,
    Numca,
    as_estimator,
)

__all__ = [
    "CallableEstimator", "DEFAULT_TEMPERATURES", "Estimator", "GroupMean", "Hista", "LeaveOneOutMean", "LinearCritic",
    "Numca", "as_estimator", "default_estimators", "load_object",
]

DEFAULT_TEMPERATURES = (0.01, 0.03, 0.1, 0.3, 1.0)


def load_object(spec: str):
    """'package.module:attr' or 'path/to/file.py:attr' -> the attribute."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py") or Path(module_name).exists():
        path = Path(module_name)
        loader_spec = importlib.util.spec_from_file_location(f"sveb_user_{path.stem}", path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name} has no attribute {attr!r}") from None


def default_estimators(*, temperatures: Sequence[float] = DEFAULT_TEMPERATURES, backend: str = "auto",
                       seed: int = 0) -> list[Estimator]:
    estimators: list[Estimator] = [GroupMean(), LeaveOneOutMean(), LinearCritic(seed=seed),
                                   Numca("last", backend=backend), Numca("prefix", backend=backend)]
    for similarity in ("cosine", "dot"):
        estimators += [Hista(similarity, t, backend=backend) for t in temperatures]
    return estimators
