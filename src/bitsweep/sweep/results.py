"""The results file of a sweep: JSONL (header + one row per finished cell) and a CSV beside it.

The JSONL file is the record: its first line is a header naming what was
swept (checkpoint, dataset, settings, environment); every later line is one
finished cell, appended and fsynced the moment the cell ends, so an
interrupted sweep loses at most the cells that were running. The CSV is a
convenience view rewritten atomically from the JSONL after every row.
Reports are rebuilt from this file alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitsweep.errors import BitsweepError
from bitsweep.io import append_jsonl, write_text_atomic

FORMAT = "bitsweep-sweep-results"
VERSION = 1


@dataclass(frozen=True)
class SweepResults:
    """A results file read back: its header and its rows in file order.

    Attributes:
        path: the JSONL file.
        header: the first line (``format``, ``identity``, ``environment``, ``grid``, ...).
        rows: one dict per finished cell (``kind == "cell"``).
    """

    path: Path
    header: dict[str, Any]
    rows: tuple[dict[str, Any], ...]

    @property
    def finished_ids(self) -> frozenset[str]:
        """Ids of the cells already in the file; a resumed sweep skips these."""
        return frozenset(str(r["cell_id"]) for r in self.rows)

    @property
    def baseline(self) -> dict[str, Any] | None:
        """The FP32 reference row, or None when the sweep has not reached it yet."""
        for r in self.rows:
            if r.get("weight_bits") is None and r.get("activation_bits") is None:
                return r
        return None


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Parse the JSONL lines; returns (records, whether the last line was cut short by a kill)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    truncated = False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # Only the final line can be partial (a kill during append); anything else is corruption.
            if i == len(lines) - 1:
                truncated = True
                break
            raise BitsweepError(
                f"results file '{path}' line {i + 1} is not valid JSON; it was edited or corrupted, "
                "start a new sweep with another --output directory"
            ) from None
        if not isinstance(rec, dict):
            raise BitsweepError(f"results file '{path}' line {i + 1} is not a JSON object")
        records.append(rec)
    return records, truncated


def read_results(path: str | os.PathLike[str]) -> SweepResults:
    """Read a sweep's JSONL results file.

    Raises:
        BitsweepError: when the file is missing, empty, or not a bitsweep results file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "results.jsonl"
    if not p.is_file():
        raise BitsweepError(f"results file '{p}' not found; pass the results.jsonl a 'bitsweep sweep' run wrote")
    records, _ = _parse_lines(p)
    if not records or records[0].get("format") != FORMAT:
        raise BitsweepError(
            f'\'{p}\' is not a bitsweep sweep results file (its first line has no "format": "{FORMAT}"); '
            "pass the results.jsonl that 'bitsweep sweep' wrote"
        )
    rows = tuple(r for r in records[1:] if r.get("kind") == "cell")
    return SweepResults(path=p, header=records[0], rows=rows)


def make_header(identity: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The header line: ``identity`` must match on resume; ``extra`` (environment, grid, ...) is informative."""
    return {"format": FORMAT, "version": VERSION, "kind": "header", "identity": dict(identity), **extra}


def open_results(path: str | os.PathLike[str], header: Mapping[str, Any]) -> SweepResults:
    """Start a results file, or reopen an existing one for resuming after checking it is the same sweep.

    A file whose header ``identity`` (checkpoint, dataset, settings) differs
    from ``header["identity"]`` is refused rather than mixed with new rows. A
    last line cut short by a kill is dropped (rewritten atomically) so later
    appends start on a fresh line.
    """
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        p.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(p, json.dumps(dict(header), default=str) + "\n")
        return SweepResults(path=p, header=dict(header), rows=())
    records, truncated = _parse_lines(p)
    old = read_results(p)
    new_id, old_id = dict(header.get("identity", {})), dict(old.header.get("identity", {}))
    if new_id != old_id:
        diffs = [
            f"{k}: file has {old_id.get(k)!r}, this sweep has {new_id.get(k)!r}"
            for k in sorted(set(new_id) | set(old_id))
            if new_id.get(k) != old_id.get(k)
        ]
        raise BitsweepError(
            f"results file '{p}' belongs to another sweep ({'; '.join(diffs)}); "
            "use a new --output directory, or rerun with the original checkpoint and settings to resume"
        )
    if truncated:
        write_text_atomic(p, "".join(json.dumps(r, default=str) + "\n" for r in records))
    return old


def append_row(path: str | os.PathLike[str], row: Mapping[str, Any]) -> None:
    """Append one finished cell (fsynced) and rewrite the CSV view beside it."""
    append_jsonl(path, {"kind": "cell", **row})
    write_csv(read_results(path))


def csv_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """All row keys in first-seen order, so the CSV keeps every measured figure."""
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols and k != "kind":
                cols.append(k)
    return cols


def write_csv(results: SweepResults) -> Path:
    """Rewrite ``results.csv`` beside the JSONL atomically (nested values as JSON text)."""
    rows = list(results.rows)
    cols = csv_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        out = []
        for c in cols:
            v = r.get(c)
            out.append("" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else v)
        writer.writerow(out)
    return write_text_atomic(results.path.with_suffix(".csv"), buf.getvalue())
