"""Per-epoch metrics: CSV and JSONL always, TensorBoard and Weights & Biases when installed, and curves.png.

The JSONL file is the source of truth (appended and fsynced row by row, so an
interrupted run keeps every finished epoch); the CSV is rewritten atomically
from the same rows. Optional back ends are imported lazily and only when
asked for, so bitsweep never requires them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from bitsweep.io import append_jsonl, atomic_path, write_text_atomic

COLUMNS = (
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "epoch_seconds", "train_images_per_s",
)  # fmt: skip


def read_rows(path: Path, up_to_epoch: int | None = None) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (empty when absent), optionally only epochs <= ``up_to_epoch``."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row cut short by a crash is simply dropped
        if up_to_epoch is None or int(row.get("epoch", 0)) <= up_to_epoch:
            rows.append(row)
    return rows


class MetricsLogger:
    """Writes one metrics row per epoch to every enabled back end.

    Args:
        run_dir: The run directory.
        config: Plain-dict run configuration (recorded by Weights & Biases).
        tensorboard: Also log to ``run_dir/tb`` when TensorBoard is installed.
        wandb: Also log to Weights & Biases (offline mode) when ``wandb`` is installed.
        resume_epoch: When resuming, the last finished epoch; later rows on disk are dropped.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        resume_epoch: int | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_epoch is not None:
            self.rows = read_rows(self.jsonl, resume_epoch)
            # Rows after the checkpoint belong to epochs that will be trained again.
            write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV/JSONL only
                pass
            else:
                self._tb = SummaryWriter(
                    log_dir=str(run_dir / "tb"), purge_step=resume_epoch + 1 if resume_epoch else None
                )
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_module  # type: ignore[import-not-found]
            except ImportError:
                pass
            else:
                self._wandb = wandb_module.init(
                    mode="offline", dir=str(run_dir), name=run_dir.name, config=config, resume="allow", id=run_dir.name
                )

    def log(self, row: dict[str, Any]) -> None:
        """Record one epoch's row everywhere."""
        self.rows.append(row)
        append_jsonl(self.jsonl, row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.csv, buf.getvalue())
        step = int(row["epoch"])
        if self._tb is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key.replace("_", "/", 1), value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "epoch"}, step=step)

    def close(self) -> None:
        """Flush and close the optional back ends."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Draw train/val accuracy and loss per epoch into a PNG (matplotlib object API, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    panels = (
        ("accuracy", "accuracy (%)", (("train_acc", "train"), ("val_top1", "val top-1"))),
        ("loss", "cross-entropy", (("train_loss", "train (smoothed labels)"), ("val_loss", "val"))),
    )
    for ax, (name, ylabel, series) in zip(fig.subplots(1, 2), panels, strict=True):
        for key, label in series:
            ax.plot(epochs, [r[key] for r in rows], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
