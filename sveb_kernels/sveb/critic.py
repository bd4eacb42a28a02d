"""The learned critic moved to `sveb_kernels.estimators.critic`; re-exported here."""

from ..estimators.critic import CHUNK_ROWS, LinearCritic

__all__ = ["CHUNK_ROWS", "LinearCritic"]
