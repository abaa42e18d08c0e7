"""Looking a name up in one of quant's registries (observers, rounding policies, PTQ methods).

>>> lookup({"a": 1}, "a", "observer")
1
>>> lookup({"a": 1}, "b", "observer")
Traceback (most recent call last):
...
ValueError: unknown observer 'b'; choose one of a
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """``table[name]``, or a ValueError naming ``what`` was unknown and listing the choices."""
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}") from None
