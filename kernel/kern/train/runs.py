"""A training run's folder: one process at a time, an earlier run never silently replaced, no debris.

* :class:`RunLock` — an advisory ``flock`` on ``<run>/.kern.lock``. The kernel drops it when the process ends,
  however it ends (``kill -9`` included), so a lock nobody holds is stale by definition and is taken over; a
  held one names the process that holds it.
* :func:`earlier_outputs` / :func:`clear_outputs` — what an earlier run left in the folder, and its removal for
  ``--overwrite`` (only the files kern writes; anything else in the folder is left alone).
* :func:`remove_orphans` — temporary files and folders of atomic writes that a killed process left behind.
* :func:`open_run_folder` — all of the above at the start of a run, under the lock, and the checkpoint to resume.
* :func:`check_continuation` — ``--resume`` of a finished run goes on only to more steps than it has.
* :class:`StopSignals` — SIGINT / SIGTERM during training: finish the step, checkpoint, exit 130 / 143.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from kern.core.io import TMP_SUFFIX
from kern.errors import Interrupted, UsageError
from kern.log import get_logger
from kern.train.checkpoints import newest_intact_checkpoint

log = get_logger(__name__)

LOCK_NAME = ".kern.lock"


class RunLock:
    """Exclusive use of a run folder by one ``kern train`` process (``with RunLock(folder):``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise UsageError(
                f"{self.folder}: in use by another kern train ({holder}); wait for it to end, "
                "or choose another --out (save.out)"
            ) from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            log.warning(
                "taking over a stale run lock (its process ended without releasing it)",
                folder=str(self.folder),
                previous=_describe(previous),
            )
        info = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)  # empty: released cleanly (the file stays, so no one ever locks a stale inode)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode("utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that did not say which"


def output_names(name: str) -> tuple[str, ...]:
    """The files and folders a run writes into its folder (``name`` is ``save.name``; ``<name>_ema.safetensors``
    with ``train.ema_decay``)."""
    return (
        f"{name}.safetensors",
        f"{name}_ema.safetensors",
        "config.toml",
        "metrics.jsonl",
        "loss.png",
        "checkpoints",
        "samples",
        "tensorboard",
        "trackers.json",  # the trackers' run ids (kern.train.metrics)
        "wandb",  # wandb's files, when it logs into the run folder
    )


def earlier_outputs(folder: str | Path, name: str) -> list[str]:
    folder = Path(folder)
    return [n for n in output_names(name) if (folder / n).exists() or (folder / n).is_symlink()]


def clear_outputs(folder: str | Path, name: str) -> None:
    """Remove what :func:`earlier_outputs` lists (``--overwrite``); a symlink is removed, never what it points to."""
    folder = Path(folder)
    for n in earlier_outputs(folder, name):
        path = folder / n
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    log.info("removed the earlier run's outputs (--overwrite)", folder=str(folder))


def remove_orphans(folder: str | Path) -> int:
    """Delete ``.<name>.<random>.tmp`` files and folders in the run folder and its ``checkpoints/`` and
    ``samples/``: left by a process killed mid-write. Only safe under the run's lock; returns how many."""
    folder = Path(folder)
    removed = 0
    for where in (folder, folder / "checkpoints", folder / "samples"):
        if not where.is_dir() or where.is_symlink():
            continue
        for path in where.iterdir():
            if not (path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed temporary files of an interrupted run", folder=str(folder), count=removed)
    return removed


def open_run_folder(
    out: Path, name: str, acc: Any, resume: bool, overwrite: bool, steps: int | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """Under the lock: refuse to replace an earlier run unasked, pick the checkpoint to resume from, clear debris.
    Returns the checkpoint (its folder and state) when ``resume``; ``steps`` (``train.steps``) is checked against
    it (:func:`check_continuation`)."""
    earlier = earlier_outputs(out, name)
    resume_from = newest_intact_checkpoint(out) if resume else None
    if resume_from is not None and steps is not None:
        check_continuation(out, name, resume_from, steps)
    if earlier and not (resume or overwrite):
        raise UsageError(
            f"{out} holds an earlier run ({', '.join(earlier)}): continue it with --resume, replace it "
            "with --overwrite, or choose another --out"
        )
    acc.wait_for_everyone()  # every process has judged the folder before the main one changes it
    if acc.is_main_process:
        if overwrite and earlier:
            clear_outputs(out, name)
        remove_orphans(out)
    return resume_from


def check_continuation(out: Path, name: str, found: tuple[Path, dict[str, Any]], steps: int) -> None:
    """``--resume`` to ``steps`` from the checkpoint ``found``: a run never goes back, and a finished one (its final
    adapter saved) goes on only to more steps than it has. A run whose last checkpoint is at ``steps`` but whose
    final adapter was not written yet (killed in between) is finished: the loop has nothing left to do."""
    checkpoint, state = found
    done = int(state["step"])
    finished = _saved_steps(out / f"{name}.safetensors")
    if done > steps or (finished is not None and finished >= steps):
        have = max(done, finished or 0)
        raise UsageError(
            f"--resume: the run in {out} already has {have} steps (train.steps is {steps}; newest checkpoint "
            f"{checkpoint.name}); to train it further pass --steps N (or --set train.steps=N) with N above {have}"
        )
    if finished is not None:
        log.info("continuing a finished run", folder=str(out), finished=finished, checkpoint=done, steps=steps)


def _saved_steps(adapter: Path) -> int | None:
    """The steps a final adapter kern saved records; None when there is none (or it does not say)."""
    from kern.adapters.network.metadata import saved_steps
    from kern.core.safetensors_read import read_header
    from kern.errors import KernError

    if not adapter.is_file():
        return None
    try:
        _, metadata = read_header(adapter)
    except KernError:
        return None
    return saved_steps(metadata)


class StopSignals:
    """SIGINT and SIGTERM while training. Between steps (``deferred``) a signal is only recorded: the loop finishes
    its step, writes a checkpoint and raises :class:`Interrupted`. Otherwise (caching, loading, the final save) it
    raises :class:`Interrupted` at once; atomic writes leave nothing half-written. A second signal always stops at
    once. Installed only in the main thread (signal handlers can be set nowhere else)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.deferred and self.signum is None:
            self.signum = signum
            log.warning(f"{name}: finishing this step, then writing a checkpoint (send it again to stop at once)")
            return
        raise Interrupted(signum, f"stopped by {name}; nothing half-written was kept")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def requested_anywhere(self, acc: Any) -> bool:
        """Whether any process got SIGINT / SIGTERM: all of them must write the checkpoint together."""
        flag = self.requested
        if acc.num_processes > 1:
            import torch

            t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
            flag = bool(acc.reduce(t, reduction="sum").item() > 0)
            if flag and self.signum is None:
                self.signum = 15
        return flag

    def interrupted(self, message: str) -> Interrupted:
        """The error that ends the run after its checkpoint: ``stopped by SIGTERM <message>``."""
        signum = self.signum or 15
        return Interrupted(signum, f"stopped by {signal_name(signum)} {message}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
