"""glm_ft/stops.py with glm_ft.tracking.signals: a Ctrl-C or SIGTERM that Python dropped (raised inside a `__del__`)
is raised again as the job reaches its next stage, worded as the stage it was dropped in; at a job's start (a
sweep's next job), as that job's, not the previous job's."""

from __future__ import annotations

import sys

import pytest

from glm_ft import stops
from glm_ft.tracking.signals import SIGTERM_GUARD, Terminated


class Finalizer:
    """Raises `stop` from its `__del__`, as a signal's handler does when the signal lands in one."""

    def __init__(self, stop: BaseException):
        self.stop = stop

    def __del__(self):
        raise self.stop


@pytest.fixture
def guard():
    SIGTERM_GUARD.acquire()
    yield
    SIGTERM_GUARD.release()
    stops.reached(stops.STARTING)


@pytest.mark.parametrize("stop", [Terminated, KeyboardInterrupt])
def test_a_dropped_stop_is_raised_at_the_next_stage_as_the_stage_it_was_dropped_in(guard, stop):
    hook = sys.unraisablehook
    stops.reached(stops.FINAL_EVALUATION)
    Finalizer(stop())  # dropped at once: Python ignores what its __del__ raises
    assert sys.unraisablehook is hook  # the guard's, which recorded it (no traceback printed)
    with pytest.raises(stop):
        stops.reached(stops.TEST_PREDICTION)
    assert stops._stage() == stops.FINAL_EVALUATION
    stops.reached(stops.TEST_PREDICTION)  # raised once
    assert stops._stage() == stops.TEST_PREDICTION


def test_a_stop_dropped_before_a_job_starts_is_that_jobs(guard):
    stops.reached(stops.CLOSING)  # the previous job of a sweep
    Finalizer(Terminated())
    with pytest.raises(Terminated):
        stops.reached(stops.STARTING)
    assert stops._stage() == stops.STARTING


def test_other_exceptions_go_to_the_hook_python_had_and_outside_a_job_stops_do_too(monkeypatch):
    seen: list[BaseException] = []
    recorder = lambda unraisable: seen.append(unraisable.exc_value)  # noqa: E731
    monkeypatch.setattr(sys, "unraisablehook", recorder)
    SIGTERM_GUARD.acquire()
    try:
        Finalizer(ValueError("not a stop"))
        Finalizer(Terminated())
        assert [type(e) for e in seen] == [ValueError]
        with pytest.raises(Terminated):
            stops.reached(stops.FINAL_EVALUATION)
    finally:
        SIGTERM_GUARD.release()
        stops.reached(stops.STARTING)
    assert sys.unraisablehook is recorder
    Finalizer(Terminated())  # no job: Python's own hook (here the recorder) has it, as before
    assert [type(e) for e in seen] == [ValueError, Terminated]
    stops.reached(stops.STARTING)  # and nothing is raised later
