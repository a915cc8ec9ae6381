"""Training logs on local disk: one CSV per stream and TensorBoard event files (offline).

    log = RunLog(run_dir / "logs", resume_step=0)
    log.scalars("train", step, {"loss": 0.12, "lr": 1e-4})   # logs/train.csv + TensorBoard train/loss, ...
    log.image("val/samples", step, pil_image)
    log.close()

On resume, CSV rows and TensorBoard events after the checkpoint's step are dropped, so a resumed
run's logs read as one run. TensorBoard is used when the ``tensorboard`` package is installed;
``tensorboard --logdir RUN/logs`` shows it (nothing is uploaded anywhere).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np


class RunLog:
    def __init__(self, folder: Path, resume_step: Optional[int] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for f in self.folder.glob("*.csv"):
                _truncate_csv(f, resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; this only guards a broken install
            self.tb = None
        else:
            self.tb = SummaryWriter(str(self.folder / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)

    def scalars(self, stream: str, step: int, values: dict[str, float]) -> None:
        path = self.folder / f"{stream}.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", *values])
            if new:
                w.writeheader()
            w.writerow({"step": step, **values})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{stream}/{k}", v, step)

    def image(self, tag: str, step: int, image) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep the header and the rows with step <= last_step."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last_step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
