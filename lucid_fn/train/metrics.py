"""What a run writes about its progress: ``metrics.jsonl`` (one JSON object per log step
and per evaluation; ``MetricsLog`` appends, ``read_metrics`` reads), ``curves.png``
(``plot_curves``), and the progress bar on the terminal.
"""

from __future__ import annotations

import json
import pathlib

from lucid_fn import weights


class MetricsLog:
    """Appends JSON lines to workdir/metrics.jsonl (truncated to ``from_step`` on resume,
    so the file always describes one run). Of several processes only the ``writer``
    touches the file; the others keep the same rows in memory."""

    def __init__(self, path: pathlib.Path, from_step: int, writer: bool = True):
        self.path, self.writer = path, writer
        rows = read_metrics(path) if path.is_file() else []
        kept = [r for r in rows if r["step"] <= from_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if writer:
            weights.atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))
        self.rows = kept

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.writer:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short (the run was killed while
    appending it) is dropped; any other line that is not a JSON object is an error."""
    text = pathlib.Path(path).read_text(errors="replace")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif i == len(lines):  # no newline after it: a write that never finished
            break
        else:
            raise ValueError(f"{path}, line {i}, is not a metrics row ({line[:80]!r}); the "
                             f"file was edited or damaged. Delete that line (or the file: "
                             f"a resumed run rewrites it from the checkpoint's step)")
    return rows


def plot_curves(rows: list[dict], path) -> None:
    """Loss and accuracy against step, as a PNG. A bare ``Figure`` (no pyplot): nothing
    global is touched, so a run inside a notebook or a thread leaves its figures alone."""
    from matplotlib.figure import Figure

    train = [r for r in rows if "loss" in r]
    metric = "test_miou" if any("test_miou" in r for r in rows) else "test_accuracy"
    test = [r for r in rows if metric in r]
    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if test:
        ax1.plot([r["step"] for r in test], [r["test_loss"] for r in test], "o-",
                 label="test loss")
    ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.set_yscale("log"), ax1.legend()
    segment = metric == "test_miou"
    ax2.plot([r["step"] for r in train], [r["accuracy"] for r in train],
             label="train pixel accuracy" if segment else "train")
    if test:
        ax2.plot([r["step"] for r in test], [r[metric] for r in test], "o-",
                 label="test mIoU" if segment else "test")
    ax2.set_xlabel("step"), ax2.set_ylabel("mIoU, accuracy" if segment else "accuracy")
    ax2.legend()
    fig.tight_layout()
    weights.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def progress_bar(total, initial, enabled):
    """A tqdm bar of steps, or None when ``enabled`` is false."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
