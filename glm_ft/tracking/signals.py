"""Signal safety around MLflow: what MLflow itself does not do.

- `signals_deferred`: Ctrl-C or SIGTERM arriving inside an MLflow write is held until the write returns.
- `SIGTERM_GUARD`: SIGTERM ends the open runs KILLED (never left RUNNING), shared by the sweep parent and the job's run.
- `raise_lost_stop`: a Ctrl-C or SIGTERM whose exception Python dropped (raised inside a `__del__`), raised again.
- `interrupt_behind`: the Ctrl-C or SIGTERM that another exception was raised while unwinding from; `restated`: the
  same kind of stop saying where it stopped; `stop_behind`: that, or the launcher's end (glm_ft.dist.launcher_gone)
  or stop (glm_ft.dist.launcher_stopped_by) behind a failed collective.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the enclosed MLflow call returns, then deliver them.

    Raised inside a SQLite write, KeyboardInterrupt leaves that connection's transaction, and its lock, open while
    the exception (and its traceback) lives; marking the run KILLED then waits on the process's own lock and fails,
    leaving the run RUNNING. Only the main thread receives signals, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in DEFERRED_SIGNALS}
    held = [sig for sig, handler in previous.items() if handler not in (None, signal.SIG_IGN)]
    pending: list[int] = []
    for sig in held:
        signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig in held:
            signal.signal(sig, previous[sig])
        for signum in pending:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:  # SIG_DFL: what the signal would have done
                signal.raise_signal(signum)


class SignalSafeClient:
    """An MlflowClient whose every call runs with signals deferred (see `signals_deferred`)."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with signals_deferred():
                return attribute(*args, **kwargs)

        return call


class Terminated(SystemExit):
    """SIGTERM, raised like Ctrl-C so `finally` blocks run and the run ends KILLED; exits with 143. `where`: where it
    stopped, as a KeyboardInterrupt's message says it (its str, so the CLI words both stops with the same code)."""

    def __init__(self, where: str = "") -> None:
        super().__init__(128 + signal.SIGTERM)
        self.where = where

    def __str__(self) -> str:
        return self.where


class _SigtermGuard:
    """Reference-counted SIGTERM handler shared by the sweep parent and the job's run (one process, basic launcher).

    With the default handler in place, SIGTERM raises `Terminated` once (later ones are ignored while unwinding).
    When someone else handles SIGTERM (submitit ignores it on purpose), their handler stays in charge: ours only
    marks the open runs KILLED first, since a SIGKILL usually follows.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.previous: Any = None
        self.terminating = False
        # Set on SIGTERM or Ctrl-C inside a run: the sweep parent then ends KILLED rather than FAILED.
        self.interrupted = False
        self.open_runs: dict[str, Any] = {}  # run id -> the Store it is in
        self.lost: BaseException | None = None  # a stop Python dropped (see raise_lost_stop)
        self.previous_unraisable: Any = None

    def acquire(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self.depth == 0:
            self.previous = signal.getsignal(signal.SIGTERM)
            if self.previous is signal.SIG_IGN:
                return
            signal.signal(signal.SIGTERM, self._handle)
            self.previous_unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
        self.depth += 1

    def release(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
            sys.unraisablehook = self.previous_unraisable or sys.__unraisablehook__
            self.terminating = self.interrupted = False
            self.lost = None

    def _unraisable(self, unraisable: Any) -> None:
        """A Ctrl-C or SIGTERM that landed inside a `__del__` (a garbage collection runs them at any allocation)
        raised there, and Python ignores what a `__del__` raises: it printed a traceback and the job went on."""
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
            self.lost = self.lost or unraisable.exc_value
            return
        (self.previous_unraisable or sys.__unraisablehook__)(unraisable)

    def _handle(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        if callable(self.previous):
            for run_id, store in list(self.open_runs.items()):
                with contextlib.suppress(Exception):
                    store.end_run(run_id, "KILLED")
            self.previous(signum, frame)
            return
        if self.terminating:
            return
        self.terminating = True
        raise Terminated()


SIGTERM_GUARD = _SigtermGuard()


def raise_lost_stop() -> None:
    """Raise the Ctrl-C or SIGTERM that Python dropped, if one was (`_SigtermGuard._unraisable`).

    The handler raises a stop once (a second SIGTERM is ignored while the first unwinds), and the orphaned rank's
    watch sends one SIGTERM: lost inside a `__del__`, the rank trained on for good after its launcher was killed.
    Called where a job may stop cleanly: every Trainer step, evaluation and save, and each stage of the job."""
    lost, SIGTERM_GUARD.lost = SIGTERM_GUARD.lost, None
    if lost is not None:
        raise restated(lost, str(lost))


def interrupt_behind(err: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or `Terminated` that `err` is, or that it was raised while handling.

    A signal lands at any bytecode, also inside a library's own cleanup: Ctrl-C inside tqdm's write lock makes tqdm
    raise "RuntimeError: cannot release un-acquired lock" as the interrupt unwinds. That RuntimeError is still the
    user's Ctrl-C (the run is KILLED, its checkpoints kept), not a failure with a traceback.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (KeyboardInterrupt, Terminated)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def restated(stop: BaseException, where: str) -> BaseException:
    """The same kind of stop as `stop` (Ctrl-C or SIGTERM), saying `where`: the CLI words both alike and exits with
    the kind's code (130, 143)."""
    return KeyboardInterrupt(where) if isinstance(stop, KeyboardInterrupt) else Terminated(where)


def stop_behind(err: BaseException) -> BaseException | None:
    """The stop that `err` stands for: the interrupt behind it; or, when this rank's launcher is gone (a `Terminated`)
    or was stopped (the same kind of stop as its signal), that stop: what then fails, a collective whose peer already
    stopped, is the job being stopped, not a failure. A stop in any phase of a multi-process run (a step, a
    checkpoint's save, an evaluation) so ends every rank as the stop, whichever rank its signal reached first."""
    from glm_ft import dist

    interrupt = interrupt_behind(err)
    if interrupt is not None:
        return interrupt
    if dist.launcher_gone():
        return Terminated()
    by = dist.launcher_stopped_by()
    if by is None:
        return None
    # The launcher's signal to this rank may still be on its way: it is this same stop, already being acted on
    # (ignored as a second SIGTERM is; a second Ctrl-C would raise KeyboardInterrupt while the rank exits).
    SIGTERM_GUARD.terminating = True
    if by == "SIGINT":
        with contextlib.suppress(ValueError):  # only the main thread may set a handler
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return KeyboardInterrupt()
    return Terminated()
