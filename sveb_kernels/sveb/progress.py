"""Progress bars on stderr (tqdm when installed, a silent stand-in otherwise) and log lines."""

from __future__ import annotations

import sys


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, disable: bool = False):
    if disable:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
