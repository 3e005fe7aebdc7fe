"""Where a run's numbers go, behind one :meth:`Metrics.log`: ``metrics.jsonl`` (always), TensorBoard (when
installed) and the progress bar. Only the main process writes; on the others every call does nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kern.log import get_logger

log = get_logger(__name__)

TENSORBOARD_TAGS = {"t": "timesteps"}  # TensorBoard's name for a key, where it is not the key itself


class Metrics:
    """``log(step, {"loss": ..., "lr": ..., "t": tensor})`` once per optimizer step.

    Numbers are scalars (a line of ``metrics.jsonl``, a TensorBoard scalar); a tensor is a list in the line and a
    histogram in TensorBoard; ``loss`` also goes to the progress bar. A fresh run starts ``metrics.jsonl`` anew, a
    resumed one (``start`` > 0 from a checkpoint) appends after the lines up to its step."""

    def __init__(self, out: Path, total: int, start: int, resumed: bool, enabled: bool) -> None:
        self.file = self.writer = self.bar = None
        if not enabled:
            return
        self.writer = _tensorboard(out / "tensorboard")
        if resumed:
            truncate_metrics(out / "metrics.jsonl", start)
        self.file = open(out / "metrics.jsonl", "a" if resumed else "w", encoding="utf-8")
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.file is None:
            return
        host = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        record = {"step": step} | {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in host.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in host.items():
                tag = TENSORBOARD_TAGS.get(k, k)
                if isinstance(v, torch.Tensor):
                    self.writer.add_histogram(tag, v.float(), step)
                else:
                    self.writer.add_scalar(tag, v, step)
        if "loss" in values:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Close the bar and the files (again: nothing)."""
        for closing in (self.bar, self.writer, self.file):
            if closing is not None:
                closing.close()
        self.file = self.writer = self.bar = None

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a resumed run restarts from), and a line torn
    by a killed process (it is the last one; any unreadable line is dropped with a warning)."""
    from kern.core.io import write_text

    if not path.is_file():
        return
    keep, torn = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            at = int(record.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            torn += line.strip() != ""
            continue
        if at <= step:
            keep.append(line)
    if torn:
        log.warning("unreadable metrics lines dropped (a write torn by a killed process)", file=str(path), lines=torn)
    write_text(path, "".join(line + "\n" for line in keep))


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: metrics.jsonl always has the same scalars
        log.info("tensorboard not installed; scalars go to metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))
