"""One argument style across the public API (docs/CONTRACT.md, Common rules): tensors positional,
options keyword-only, so `gae(r, v, m, 0.9)` cannot silently mean something else."""

import inspect

import pytest
import torch

import sveb_kernels as sk

# Parameters that are data, allowed positionally; everything after them must be keyword-only.
POSITIONAL = {
    "gae": ["rewards", "values", "mask"],
    "masked_whiten": ["x", "mask"],
    "hista_values": ["hidden", "returns", "rollout_ids", "group_offsets"],
    "numeric_spans": ["token_ids", "vocab", "mask"],
    "numca_values": ["spans", "returns", "group_index", "mask"],
}


@pytest.mark.parametrize("name", sorted(POSITIONAL))
def test_options_are_keyword_only(name):
    params = inspect.signature(getattr(sk, name)).parameters.values()
    positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert positional == POSITIONAL[name]
    options = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert "backend" in options or name == "masked_whiten"


def test_gae_rejects_positional_gamma():
    r = torch.zeros(2, 3)
    with pytest.raises(TypeError):
        sk.gae(r, r, r.bool(), 0.9, 0.95)
    with pytest.raises(TypeError):
        sk.masked_whiten(r, r.bool(), False)
