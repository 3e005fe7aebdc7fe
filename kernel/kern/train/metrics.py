"""Where a run's numbers go, behind one :meth:`Metrics.log`: ``metrics.jsonl`` (always), the trackers of
``train.log_with`` (accelerate's tracker API: TensorBoard by default, wandb, ...) and the progress bar. Only the main
process writes; on the others every call does nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any

import torch

from kern.errors import ConfigError
from kern.log import get_logger

log = get_logger(__name__)

TENSORBOARD_TAGS = {"t": "timesteps"}  # TensorBoard's name for a key, where it is not the key itself
# A tracker's packages (any one will do) and how to install them, for the trackers accelerate knows.
TRACKER_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard (a dependency of kern-tuner)"),
    "wandb": (("wandb",), "pip install kern-tuner[wandb]"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "aim": (("aim",), "pip install aim"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "clearml": (("clearml",), "pip install clearml"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "trackio": (("trackio",), "pip install trackio"),
}
TRACKERS_FILE = "trackers.json"  # the run's tracker ids (wandb's run id), so a resumed run continues its runs


def _installed(name: str) -> bool:
    packages = TRACKER_PACKAGES.get(name, ((name,), ""))[0]
    return any(importlib.util.find_spec(p) is not None for p in packages)


def check_trackers(job: Any) -> None:
    """Before any work: every name in ``train.log_with`` is a tracker accelerate knows and its package is installed.
    The default (TensorBoard, a dependency) missing from a broken install is a warning, not an error."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = job.train.log_with
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"{job.source}: train.log_with: unknown tracker {name!r}; known: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}"
                " (or [] for metrics.jsonl only)"
            )
        if not _installed(name) and "train.log_with" in job.given:
            hint = TRACKER_PACKAGES.get(name, ((), f"pip install {name}"))[1]
            raise ConfigError(f"{job.source}: train.log_with: tracker {name!r} is not installed: {hint}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{job.source}: train.log_with names a tracker twice: {names}")


def active_trackers(job: Any) -> list[str]:
    """The trackers of ``train.log_with`` that are installed (:func:`check_trackers` refused the rest unless they
    are the default)."""
    active = [name for name in job.train.log_with if _installed(name)]
    if active != list(job.train.log_with):
        log.warning("tracker not installed; its scalars go to metrics.jsonl only", trackers=job.train.log_with)
    return active


class Metrics:
    """``log(step, {"loss": ..., "lr": ..., "t": tensor})`` once per optimizer step (and more keys, e.g. a
    validation loss, in calls of their own for the same step).

    Numbers are scalars (a line of ``metrics.jsonl``, a tracker scalar); a tensor is a list in the line and a
    histogram in TensorBoard; ``loss`` also goes to the progress bar. A fresh run starts ``metrics.jsonl`` anew, a
    resumed one (``start`` > 0 from a checkpoint) appends after the lines up to its step. With an accelerator
    ``acc`` whose ``log_with`` names trackers and the ``job``, the trackers are started here (project
    ``train.tracker_project``, default ``save.name``; config: the resolved job, flattened)."""

    def __init__(
        self, out: Path, total: int, start: int, resumed: bool, enabled: bool, acc: Any = None, job: Any = None
    ) -> None:
        self.file = self.bar = self.acc = None
        if not enabled:
            return
        if resumed:
            truncate_metrics(out / "metrics.jsonl", start)
        self.file = open(out / "metrics.jsonl", "a" if resumed else "w", encoding="utf-8")
        if acc is not None and job is not None and acc.log_with:
            self.acc = acc
            start_trackers(acc, job, out, start if resumed else None)
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.file is None:
            return
        host = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        record = {"step": step} | {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in host.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.acc is not None:
            scalars = {
                TENSORBOARD_TAGS.get(k, k): v
                for k, v in host.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if scalars:
                self.acc.log(scalars, step=step)
            tensors = {k: v for k, v in host.items() if isinstance(v, torch.Tensor)}
            writer = _tensorboard_writer(self.acc)
            if writer is not None:
                for k, v in tensors.items():
                    writer.add_histogram(TENSORBOARD_TAGS.get(k, k), v.float(), step)
        if "loss" in values:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        if step > self.bar.n:  # a second call for a step (a validation loss) does not move the bar again
            self.bar.update(step - self.bar.n)

    def close(self, failed: bool = False) -> None:
        """Close the bar, the file and the trackers (again: nothing). ``failed``: the run ended in an error, which
        wandb records as a failed run."""
        for closing in (self.bar, self.file):
            if closing is not None:
                closing.close()
        if self.acc is not None:
            for tracker in self.acc.trackers:
                if failed and tracker.name == "wandb":
                    tracker.run.finish(exit_code=1)
                else:
                    tracker.finish()
            self.acc.trackers.clear()  # finished: accelerate's end_training has nothing left to finish
        self.file = self.bar = self.acc = None

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(failed=exc_type is not None)


def start_trackers(acc: Any, job: Any, out: Path, resumed_at: int | None) -> None:
    """``acc.init_trackers`` for the run in ``out``: TensorBoard in ``out/tensorboard/<project>``, wandb's files in
    ``out`` (or ``$WANDB_DIR``). A resumed run (``resumed_at``: its checkpoint's step) continues them: TensorBoard
    hides the events past the checkpoint (``purge_step``), wandb resumes the same run (its id kept in
    ``trackers.json``)."""
    names = {str(t) for t in acc.log_with}
    project = job.train.tracker_project or job.save.name
    ids = _read_ids(out / TRACKERS_FILE) if resumed_at is not None else {}
    init: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names and resumed_at is not None:
        init["tensorboard"] = {"purge_step": resumed_at + 1}
    if "wandb" in names:
        ids.setdefault("wandb", secrets.token_hex(4))
        init["wandb"] = {"name": job.save.name, "id": ids["wandb"], "resume": "allow"}
        if not os.environ.get("WANDB_DIR"):
            init["wandb"]["dir"] = str(out)
    if ids:
        from kern.core.io import write_text

        write_text(out / TRACKERS_FILE, json.dumps(ids, indent=1) + "\n")
    acc.init_trackers(project, config=flat_config(_resolved_job(job, out)), init_kwargs=init)
    log.info("trackers started", trackers=sorted(names), project=project, resumed=resumed_at is not None)


def _read_ids(path: Path) -> dict[str, str]:
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(ids, dict) else {}


def _resolved_job(job: Any, out: Path) -> dict[str, Any]:
    """The run's ``config.toml`` (the job as resolved: variant, absolute paths), else the job as given."""
    try:
        return tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return job.to_dict()


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"train": {"steps": 10}}`` as ``{"train.steps": 10}``: the hyper-parameter form trackers take (TensorBoard
    takes only numbers, booleans and strings, so a list or table is its JSON text)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat |= flat_config(value, f"{prefix}{key}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def _tensorboard_writer(acc: Any) -> Any:
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            return tracker.tracker
    return None


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
