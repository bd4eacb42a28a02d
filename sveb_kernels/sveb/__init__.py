"""SVEB, the State Value Estimation Benchmark: how close per-token state value estimates come to
the truth (docs/SVEB.md).

    from sveb_kernels import sveb
    data = sveb.load_dataset("my_dataset")                 # or the embedded task: sveb.embedded
    result = sveb.evaluate(data, sveb.default_estimators() + [my_fn], tokenizer=tok, hidden_fn=...)
    print(result.table())

Modules: data (format), task / tiny / embedded (the embedded exact-value task), build (rollouts and
Monte-Carlo truth from any HF causal LM), estimators, metrics, evaluate, plot, cli.
Heavy dependencies (transformers, matplotlib, pyarrow) are imported only where used.
"""

from .batch import SvebBatch
from .data import Dataset, Group, Rollout, States, load_dataset, save_dataset
from .estimators import (
    CallableEstimator,
    Estimator,
    GroupMean,
    Hista,
    LeaveOneOutMean,
    LinearCritic,
    Numca,
    as_estimator,
    default_estimators,
)
from .evaluate import EvalResult, evaluate
from .metrics import METRICS, score

__all__ = [
    "CallableEstimator", "Dataset", "Estimator", "EvalResult", "Group", "GroupMean", "Hista", "LeaveOneOutMean",
    "LinearCritic", "METRICS", "Numca", "Rollout", "States", "SvebBatch", "as_estimator", "default_estimators",
    "evaluate", "load_dataset", "save_dataset", "score",
]
