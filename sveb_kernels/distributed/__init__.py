"""The ops across torch.distributed ranks (docs/CONTRACT.md §4): a batch sharded over data-parallel
ranks, a prompt's rollouts possibly on several ranks, every rank calling the same function; ids are
global and results are this rank's, in its order, equal to the single-process op on all ranks' data.

- `hista_values(hidden[n,D], returns[n], rollout_ids[n], group_ids[n], *, group=None, **options)`:
  tokens are regrouped with one all_to_all so each group (or block of a large group's queries) is
  computed whole on one owner rank by `sveb_kernels.hista_values`, balanced by cost (n_g^2), and the
  (values, lse) come back with a second all_to_all. Memory per rank O((local + assigned tokens) * D);
  no rank ever receives every rank's hidden states.
- `numca_values(spans, returns[b], group_ids[b], mask[b,T], *, group=None, **options)`: ranks
  exchange each rollout's milestone keys and return (all_gather, a few bytes per number), never
  token ids.
- `masked_whiten(x, mask, *, group=None)`: whitening over all ranks' valid elements (two all_reduces).

Only collectives NCCL implements (all_gather_into_tensor, all_to_all_single, all_reduce), on the
current CUDA device for NCCL and on the CPU for gloo. Bad input raises the same exception on every
rank (ranks exchange an error code before anything else), never a hang. Design and cost model:
docs/DESIGN.md, "Distributed groups".
"""

from ._comm import reset_traffic, traffic
from .hista import hista_values
from .numca import numca_values
from .whiten import masked_whiten

__all__ = ["hista_values", "masked_whiten", "numca_values", "reset_traffic", "traffic"]
