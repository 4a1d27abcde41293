"""One sweep process per sweep folder: a second `train.py -m ... hydra.sweep.dir=D` while one runs fails at once.

Continuing a sweep (the Optuna study, the grid's finished jobs, the MLflow parent run) relies on it: while the lock
is held, anything a previous sweep left "running" in that folder died with it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".glm_ft_sweep.lock"

_held: dict[Path, list] = {}  # path → [open handle, depth]: the callback and the sweeper of one process share it


class SweepLocked(RuntimeError):
    pass


class SweepLock:
    """An exclusive flock on `<sweep dir>/.glm_ft_sweep.lock`, re-entrant within a process, released by the OS if
    the sweep dies (even by SIGKILL), so a re-run after a kill is never blocked by a stale lock."""

    def __init__(self, sweep_dir: Path):
        self.path = (Path(sweep_dir) / LOCK_FILE).resolve()

    def acquire(self) -> None:
        if self.path in _held:
            _held[self.path][1] += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise SweepLocked(f"hydra.sweep.dir: another sweep (pid {owner}) is running in {self.path.parent}; "
                              "wait for it or choose another hydra.sweep.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _held[self.path] = [handle, 1]

    def release(self) -> None:
        entry = _held.get(self.path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()
            del _held[self.path]

    def __enter__(self) -> "SweepLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
