import torch

import sveb_kernels as sk


def test_from_padded_matches_a_plain_loop(seed):
    batch, length = 11, 13
    mask = torch.rand(batch, length) > 0.35
    mask[3] = False  # a row with no tokens
    group_index = torch.randint(100, 105, (batch,))
    packing = sk.Packing.from_padded(mask, group_index)

    want_tokens, want_ids, want_offsets = [], [], [0]
    for g in sorted(set(group_index.tolist())):
        for b in range(batch):
            if group_index[b] == g:
                for t in range(length):
                    if mask[b, t]:
                        want_tokens.append(b * length + t)
                        want_ids.append(b)
        want_offsets.append(len(want_tokens))
    assert packing.token_index.tolist() == want_tokens
    assert packing.rollout_ids.tolist() == want_ids and packing.rollout_ids.dtype == torch.int32
    assert packing.group_offsets.tolist() == want_offsets and packing.group_offsets.dtype == torch.int64
    assert packing.group_ids.tolist() == sorted(set(group_index.tolist()))

    x = torch.randn(batch, length, 3)
    packed = packing.pack(x)
    assert packed.shape == (len(want_tokens), 3)
    unpacked = packing.unpack(packed, fill=-7.0)
    assert torch.equal(unpacked[mask], x[mask]) and (unpacked[~mask] == -7.0).all()
    assert packing.unpack(packing.pack(mask.float())).sum() == mask.sum()


def test_float_mask_and_empty_batch():
    packing = sk.Packing.from_padded(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([5, 2]))
    assert packing.group_offsets.tolist() == [0, 2, 3] and packing.rollout_ids.tolist() == [1, 1, 0]
    empty = sk.Packing.from_padded(torch.zeros(0, 4, dtype=torch.bool), torch.zeros(0, dtype=torch.int64))
    assert empty.num_tokens == 0 and empty.num_groups == 0
    assert empty.unpack(torch.zeros(0)).shape == (0, 4)
