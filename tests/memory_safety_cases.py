"""Raw ops (torch.ops.sveb.*, no host checks) on out-of-range offsets, ids and lengths, for one backend
given on the command line: run in a process of its own by tests/test_memory_safety.py (a wild write
may abort the process, e.g. `double free or corruption`, which must fail that test, not the suite).

Prints one line per case: `ok <name>` when the op returned outputs of the right shapes whose values
are bounded (Hista: each value a return, an average of returns or empty_value, lse finite or -inf;
Numca: ends only where tokens are), or `error <name>: <message>` when the op raised (also allowed:
a clear error is a bounded result).
"""

import sys

import torch

import sveb_kernels  # noqa: F401  (registers the ops)


def hista_cases(n=37):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 5, generator=gen)
    returns = torch.rand(n, generator=gen)           # in [0, 1]: every average of returns is too
    rollout_ids = torch.randint(0, 6, (n,), generator=gen, dtype=torch.int32)
    big = torch.iinfo(torch.int64).max
    for name, offsets in (
        ("end past N", [0, n + 4096]),
        ("start past N", [n + 7, n + 9000]),
        ("negative", [-5, 3, n]),
        ("decreasing", [0, 30, 2, n]),
        ("huge", [0, big, big]),
        ("short of N", [0, 10, 20]),
        ("no groups", [0]),
        ("int32 past N", torch.tensor([0, 5, n + 100], dtype=torch.int32)),
    ):
        yield name, hidden, returns, rollout_ids, torch.as_tensor(offsets, dtype=torch.int64) if isinstance(
            offsets, list) else offsets


def check_hista(backend):
    for name, hidden, returns, rollout_ids, offsets in hista_cases():
        try:
            values, lse = torch.ops.sveb.hista_values(hidden, returns, rollout_ids, offsets, 0.1, "cosine", None, None,
                                                      -1.0, backend)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            print(f"error hista {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        n = hidden.shape[0]
        assert values.shape == (n,) and lse.shape == (n,), name
        empty = values == -1.0
        assert bool(((values >= -1e-6) & (values <= 1 + 1e-6) | empty).all()), (name, values)
        assert bool((torch.isfinite(lse) | (lse == float("-inf"))).all()), (name, lse)
        print(f"ok hista {name}")


def check_numca(backend):
    from sveb_kernels.numca import NumericVocab

    table = NumericVocab.from_token_bytes([b"a", b"1", b"2", b",", b".", b" ", b"-", b"3,000", b"x9"]).table
    v = table.shape[0]
    ids = torch.tensor([[5, v + 100, -7, 2 ** 40, v - 1, 0], [-(2 ** 62), v, 1, 2, 3, 4]], dtype=torch.int64)
    for name, token_ids in (("ids out of the vocab", ids), ("int32 ids", ids.clamp(-2 ** 31, 2 ** 31 - 1).int())):
        try:
            end, key, value, start = torch.ops.sveb.numeric_spans(token_ids, table, None, backend)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            print(f"error spans {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        assert end.shape == token_ids.shape, name
        assert bool(((start >= -1) & (start < token_ids.shape[1])).all()), (name, start)
        print(f"ok spans {name}")
    b, t = 4, 7
    end = torch.rand(b, t) < 0.4
    key = torch.where(end, torch.randint(1, 4, (b, t)), 0)
    returns = torch.rand(b)
    mask = torch.ones(b, t, dtype=torch.bool)
    for name, group_index in (("huge group ids", torch.tensor([2 ** 62, -(2 ** 62), 2 ** 62, 7])),
                              ("int8 group ids", torch.tensor([-128, 127, 0, 127], dtype=torch.int8))):
        for match in ("last", "prefix"):
            try:
                values = torch.ops.sveb.numca_values(end, key, returns, group_index, mask, match, True, 1, -1.0,
                                                     backend)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                print(f"error values {name} {match}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            assert values.shape == (b, t)
            assert bool(((values >= -1e-6) & (values <= 1 + 1e-6) | (values == -1.0)).all()), (name, values)
            print(f"ok values {name} {match}")


if __name__ == "__main__":
    backend = sys.argv[1]
    check_hista(backend)
    check_numca(backend)
    print("done")
