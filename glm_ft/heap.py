"""Python's cyclic garbage collector against the millions of objects a training job keeps for its whole life.

torch, transformers, peft, datasets and MLflow leave millions of objects that live as long as the process, and every
full collection walks all of them: 0.1 s at first, 0.3-0.6 s once MLflow and the model are in (2-core CPU). Run
as Python starts it, a tiny LoRA job made ten full collections while it started, plus the one accelerate forces as
training begins (`free_memory` → `gc.collect()`): about 1.5 s of a 9 s start, a sixth of the time to the first step.

So, within `job_heap()` (one training job in `glm_ft.cli.run`; one `chat`, `predict` or `serve` session):
- `long_lived()` wraps loading that lasts as long as the job (the training modules, MLflow's modules and client,
  an inference checkpoint with its modules): no automatic collection while it runs, and what exists after it is
  frozen (`gc.freeze()`), so no later collection walks it again;
- `freeze()`, once everything training (or the server) needs is built, freezes what exists then;
- when the job ends everything is unfrozen, so garbage it left in cycles is collected as usual, and the next job of a
  sweep in the same process starts from an ordinary heap;
- at interpreter exit (`freeze_at_exit`, registered by the first job) everything is frozen again: finalization's
  own collections would walk the whole heap once more, about 3 s of every job's exit on this CPU against 0.4 s.
  Objects are still released as modules are cleared; only garbage in reference cycles is left to the OS, as Python
  leaves whatever outlives finalization (every file glm-ft writes is closed before then).

`release_freed()`, once training is over, hands the memory the training freed back to the OS (glibc keeps it in its
arenas otherwise), so that the job's closing work (the curves, its MLflow run's files) does not add to its peak.

The collector keeps running between these, so garbage made while the job starts is still collected; and refcounting
frees frozen objects as before. Only garbage in reference cycles among frozen objects waits for the job's end. A
server gains most: a full collection in the middle of a request no longer walks the model and every module.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
from typing import Iterator

_jobs = 0  # job_heap() contexts open in this process: freezing is only done inside one, which will undo it
_exit_frozen = False  # the atexit handler is registered (once per process)


@contextlib.contextmanager
def job_heap() -> Iterator[None]:
    """Around one job: whatever `long_lived` and `freeze` froze is unfrozen when it ends."""
    global _jobs
    freeze_at_exit()
    _jobs += 1
    try:
        yield
    finally:
        _jobs -= 1
        if _jobs == 0:
            gc.unfreeze()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic collection inside: for code whose many new objects all outlive it, where each collection would
    walk them again for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def long_lived() -> Iterator[None]:
    """Loading whose objects last as long as the job: the collector paused, then everything frozen (in a job)."""
    with collector_paused():
        yield
        freeze()


def freeze() -> None:
    """Freeze every object alive now (in a job): later collections walk only what is made after this."""
    if _jobs:
        gc.freeze()


def freeze_at_exit() -> None:
    """Freeze the whole heap when the interpreter exits (once per process; every job does it, and the `glm-ft`
    command for its other subcommands). Every other exit handler (MLflow's, logging's flush) still runs: freezing
    changes only what the collections of finalization, which come after all of them, walk."""
    global _exit_frozen
    if not _exit_frozen:
        _exit_frozen = True
        atexit.register(gc.freeze)


def release_freed() -> None:
    """glibc's `malloc_trim(0)`: free memory at the top of the heap and in its arenas' free pages goes back to the
    OS. 5 MiB of the tracked tiny job's peak (bench/README.md); nothing elsewhere than glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
