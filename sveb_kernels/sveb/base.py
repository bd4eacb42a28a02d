"""The estimator interface lives in `sveb_kernels.estimators` (shared with the trainer
integrations); re-exported here for SVEB code written against this module."""

from ..estimators.base import Estimator

__all__ = ["Estimator"]
