"""Compare two sweep results files cell by cell: did a change alter any accuracy or size?

Used to check that a refactor left behaviour unchanged: run the same sweep
with the old and the new code on the same checkpoint, then::

    python benchmarks/results_diff.py OLD/results.jsonl NEW/results.jsonl [--section refactor_check]

Cells are matched by their id (ids are stable across new axes at their
default values). Prints one row per cell with every differing field; with
``--section`` it also writes the table into that section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitsweep.sweep.results import read_results  # noqa: E402

from benchmarks._common import header, md_table, update_section  # noqa: E402

FIELDS = ("val_top1", "test_top1", "size_bytes", "model_ratio", "weight_ratio", "act_total_ratio", "act_peak_ratio")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="results.jsonl of the old code")
    p.add_argument("new", help="results.jsonl of the new code")
    p.add_argument("--section", default=None, help="also write the table into this BENCHMARKS.md section")
    p.add_argument("--note", default="", help="a sentence printed under the table (e.g. what the trees were)")
    args = p.parse_args(argv)
    old = {r["cell_id"]: r for r in read_results(args.old).rows}
    new = {r["cell_id"]: r for r in read_results(args.new).rows}
    rows, identical = [], 0
    for cid in sorted(set(old) | set(new), key=lambda c: str((old.get(c) or new[c]).get("label", c))):
        a, b = old.get(cid), new.get(cid)
        label = (a or b or {}).get("label", cid)
        if a is None or b is None:
            rows.append([label, "only in " + ("new" if a is None else "old"), ""])
            continue
        diffs = [f"{f}: {a.get(f)} -> {b.get(f)}" for f in FIELDS if a.get(f) != b.get(f)]
        identical += not diffs
        rows.append([label, f"{b.get('val_top1'):.2f} / {b.get('test_top1'):.2f} / {b.get('size_bytes'):,}",
                     "; ".join(diffs) or "identical"])  # fmt: skip
    table = md_table(["cell", "new val / test top-1 / bytes", "differences (old -> new)"], rows)
    text = (
        header(f"python benchmarks/results_diff.py {args.old} {args.new}")
        + f"\n{identical} of {len(rows)} cells identical in {', '.join(FIELDS)}. {args.note}\n\n{table}\n"
    )
    print(text)
    if args.section:
        update_section(args.section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
