"""A JSON file that holds one measurement together with the key it was measured under.

Search measurements (per-layer sensitivity, Hessian traces) take minutes, so they are kept beside
the search's output and reused when the same question is asked again. The key names everything the
measurement depends on; a file under another key, of another format, or one that cannot be read or
parsed is treated as absent (measured again) rather than trusted.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "m.json"
>>> _ = save_keyed(path, "demo", {"images": 8}, "value", [1, 2])
>>> load_keyed(path, "demo", {"images": 8}, "value", list)
[1, 2]
>>> load_keyed(path, "demo", {"images": 9}, "value", list) is None
True
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from bitsweep.errors import BitsweepError
from bitsweep.io import write_json_atomic

T = TypeVar("T")


def load_keyed(
    path: str | Path,
    fmt: str,
    key: Mapping[str, Any],
    field: str,
    parse: Callable[[Any], T],
    match: Collection[str] | None = None,
) -> T | None:
    """``parse(data[field])`` of the file at ``path`` when its format is ``fmt`` and its key equals ``key``.

    ``match`` compares only those fields of the key. Returns None when the file is absent,
    unreadable, keyed otherwise, or ``parse`` rejects it.
    """
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        want, have = json.loads(json.dumps(dict(key))), data.get("key")
        if match is not None:
            want, have = {k: want.get(k) for k in match}, {k: have.get(k) for k in match}
        if data.get("format") != fmt or have != want:
            return None
        return parse(data[field])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, BitsweepError):
        return None


def save_keyed(path: str | Path, fmt: str, key: Mapping[str, Any], field: str, value: Any) -> Path:
    """Write ``value`` (JSON-ready) under ``field`` with its ``key`` and format, atomically."""
    return write_json_atomic(path, {"format": fmt, "key": dict(key), field: value})
