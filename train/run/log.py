"""The run log of every trainer, on local disk: one CSV per stream, TensorBoard event files
(offline) and a text log of messages.

    log = RunLog(run_dir / "logs", resume_step=0)
    log.scalars("train", step, {"loss": 0.12, "lr": 1e-4})   # logs/train.csv + TensorBoard train/loss, ...
    log.image("val/samples", step, pil_image)
    log.message("resumed from ...")                           # logs/log.txt, and shown above the progress bar
    log.close()

Every trainer writes ``train`` (its loss and the learning rate, every ``train.log_every`` steps)
and ``val`` (held-out metrics). On resume, CSV rows and TensorBoard events after the checkpoint's
step are dropped, so a resumed run's logs read as one run. TensorBoard is used when the ``tensorboard`` package is installed;
``tensorboard --logdir RUN/logs`` shows it (nothing is uploaded anywhere).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional

import numpy as np


class RunLog:
    def __init__(self, folder: Path, resume_step: Optional[int] = None, show: bool = True):
        self.folder, self.show = Path(folder), show
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

    def message(self, text: str) -> None:
        """A line in logs/log.txt (time-stamped), also printed above any progress bar."""
        with open(self.folder / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        if self.show:
            from tqdm.auto import tqdm

            tqdm.write(text)

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
