"""Reward functions for `sveb build`: fn(response_text, answer, prompt) -> float.

The default, `numeric`, compares the last number of the response with the last number of the
reference answer, both in the canonical form of docs/CONTRACT.md §2b ("1,000" == "1000" == "1000.00"), with the
number pattern docs/CONTRACT.md §2b defines. Any other function is plugged in as 'module:function' or
'file.py:function'.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

NUMBER = re.compile(r"(?<![0-9A-Za-z_.])-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?![0-9])")

RewardFn = Callable[[str, str, str], float]


def canonical_number(text: str) -> str:
    """The canonical form (docs/CONTRACT.md §2b) of one matched number."""
    negative = text.startswith("-")
    digits = text.lstrip("-").replace(",", "")
    whole, _, fraction = digits.partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    body = f"{whole}.{fraction}" if fraction else whole
    return body if body == "0" or not negative else f"-{body}"


def last_number(text: str) -> Optional[str]:
    """The canonical form of the last number in `text`, or None."""
    found = NUMBER.findall(text)
    return canonical_number(found[-1]) if found else None


def numeric_match(response: str, answer: str, prompt: str = "") -> float:
    """1.0 when the response's last number equals the answer's last number, else 0.0."""
    want = last_number(str(answer))
    return float(want is not None and last_number(response) == want)


def load_reward(spec: str) -> RewardFn:
    if spec == "numeric":
        return numeric_match
    from .estimators import load_object

    fn = load_object(spec)
    if not callable(fn):
        raise TypeError(f"reward {spec!r} is not callable")
    return fn
