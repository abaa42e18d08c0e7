"""The keyed JSON cache: reused only under the same format and key, anything unreadable is absent."""

from __future__ import annotations

from pathlib import Path

from bitsweep.errors import BitsweepError
from bitsweep.search.keyed_cache import load_keyed, save_keyed


def test_round_trip_under_the_same_key(tmp_path: Path) -> None:
    path = save_keyed(tmp_path / "c.json", "fmt", {"images": 8, "bits": [2, 4]}, "value", {"a": 1.5})
    assert load_keyed(path, "fmt", {"bits": [2, 4], "images": 8}, "value", dict) == {"a": 1.5}


def test_another_key_or_format_is_absent(tmp_path: Path) -> None:
    path = save_keyed(tmp_path / "c.json", "fmt", {"images": 8}, "value", 1)
    assert load_keyed(path, "fmt", {"images": 9}, "value", int) is None
    assert load_keyed(path, "other", {"images": 8}, "value", int) is None
    assert load_keyed(path, "fmt", {"images": 8}, "missing", int) is None


def test_match_compares_only_the_named_fields(tmp_path: Path) -> None:
    path = save_keyed(tmp_path / "c.json", "fmt", {"model": "m", "samples": 32}, "value", 7)
    assert load_keyed(path, "fmt", {"model": "m", "samples": 64}, "value", int) is None
    assert load_keyed(path, "fmt", {"model": "m", "samples": 64}, "value", int, match=["model"]) == 7


def test_unreadable_or_rejected_files_are_absent(tmp_path: Path) -> None:
    assert load_keyed(tmp_path / "none.json", "fmt", {}, "value", int) is None
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff{not json")
    assert load_keyed(bad, "fmt", {}, "value", int) is None
    path = save_keyed(tmp_path / "c.json", "fmt", {}, "value", 1)

    def reject(_: object) -> int:
        raise BitsweepError("not a record")

    assert load_keyed(path, "fmt", {}, "value", reject) is None
