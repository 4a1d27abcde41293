"""glm_ft/heap.py: a job's long-lived objects are frozen out of full collections while it runs, and given back when
it ends; a real training job starts without walking its heap again and again, and exits without walking it either;
inference works with the loaded model frozen."""

from __future__ import annotations

import gc
import os
import re
import sys
import weakref

import pytest

from conftest import ROOT, run_process
from glm_ft import heap
from inference_fixtures import base_dir, runs  # noqa: F401


class Node:
    """A container object the collector tracks, able to form a reference cycle and to be weakly referenced."""

    def __init__(self):
        self.other = None


def cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def ordinary_heap():
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable()


def test_long_lived_freezes_what_it_loads_and_the_job_gives_it_back():
    with heap.job_heap():
        with heap.long_lived():
            assert not gc.isenabled()  # no automatic collection walks the objects being loaded
            kept = [Node() for _ in range(1000)]
            garbage_while_loading = cycle()
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)
        gc.collect()
        assert garbage_while_loading() is not None  # frozen: it waits for the job's end
        later = cycle()
        gc.collect()
        assert later() is None  # what the job makes after start-up is collected as usual
        heap.freeze()
        assert gc.get_freeze_count() > frozen
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert garbage_while_loading() is None


def test_outside_a_job_nothing_is_frozen():
    with heap.long_lived():
        garbage = cycle()
    heap.freeze()
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gc.collect()
    assert garbage() is None


def test_a_failing_job_leaves_an_ordinary_heap():
    with pytest.raises(RuntimeError), heap.job_heap():
        with heap.long_lived():
            raise RuntimeError("the model would not load")
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    with pytest.raises(RuntimeError), heap.job_heap():
        heap.freeze()
        raise RuntimeError("training failed")
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_collector_paused_restores_a_disabled_collector_as_disabled():
    gc.disable()
    with heap.collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


# A handler registered before any job runs after job_heap's own (atexit: last registered, first run).
AT_EXIT = """
import atexit, gc, sys
atexit.register(lambda: print(f"at exit: frozen={gc.get_freeze_count()}", flush=True))
"""


RELEASE = """
import sys
from glm_ft import heap
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
blocks = [bytearray(2048) for _ in range(100_000)]  # 200 MiB of malloc'd blocks, each below its mmap threshold
newest = blocks[-1]  # kept: it pins the top of the heap, so free() alone can give nothing back
del blocks
before = rss_mib()
heap.release_freed()
print(before, rss_mib())
"""


def test_release_freed_gives_the_memory_freed_inside_the_heap_back_to_the_os():
    """What training freed stays in glibc's arenas (a live block above it pins the heap): the closing work would
    then add to the job's peak. release_freed, called once training is over, hands it back."""
    out = run_process([sys.executable, "-c", RELEASE], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert before > 200 and after < before - 150, (before, after)


def test_the_glm_ft_command_exits_with_its_heap_frozen():
    code = AT_EXIT + """
from glm_ft.command import main
main(["compare", "--help"])
"""
    result = run_process([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert int(re.search(r"at exit: frozen=(\d+)", result.stdout)[1]) > 1000


@pytest.mark.parametrize("jobs", [0, 2])
def test_a_process_that_ran_a_job_exits_with_its_heap_frozen(jobs):
    code = AT_EXIT + f"""
from glm_ft.heap import job_heap
kept = [[] for _ in range(1000)]  # objects the collector tracks
for _ in range({jobs}):
    with job_heap():
        pass
print(f"jobs over: frozen={{gc.get_freeze_count()}}", flush=True)
"""
    result = run_process([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "jobs over: frozen=0" in result.stdout  # a sweep's next job would start from an ordinary heap
    at_exit = int(re.search(r"at exit: frozen=(\d+)", result.stdout)[1])
    # finalization's collections skip what is frozen (about 3 s of every training job's exit, walking torch,
    # transformers and MLflow); a process that ran no job is left as Python leaves it
    assert at_exit > 1000 if jobs else at_exit == 0


# Prints a line for every full (generation 2) collection, with how many objects were frozen then, into the same
# stream as the Trainer's log lines, and the collector's state once the jobs are over.
PROBE = AT_EXIT + """
def full_collections(phase, info):
    if phase == "stop" and info["generation"] == 2:
        print(f"full collection, frozen={gc.get_freeze_count()}", flush=True)
gc.callbacks.append(full_collections)
sys.argv = ["train.py", *sys.argv[1:]]
from glm_ft.cli import main
try:
    main()
finally:
    print(f"jobs over: frozen={gc.get_freeze_count()} enabled={gc.isenabled()}", flush=True)
"""


@pytest.mark.slow
def test_a_tracked_sweep_starts_each_job_without_walking_its_heap(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    args = ["-m", "experiment=quickstart", "training_args.learning_rate=1e-3,2e-3", "training_args.max_steps=2",
            "training_args.logging_steps=1", "data.val_file=null", "data.test_file=null",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = run_process([sys.executable, str(script), *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "full collection" in line or "'loss'" in line]
    first_loss = next(i for i, line in enumerate(lines) if "'loss'" in line)
    before = [int(re.search(r"frozen=(\d+)", line)[1]) for line in lines[:first_loss]]
    # Python, left alone, ran about ten full collections before this job's first step.
    assert 1 <= len(before) <= 3, lines
    # accelerate forces one as training begins: torch's, transformers', MLflow's and the model's objects are frozen.
    assert before[-1] > 100_000, lines
    assert sum("'loss'" in line for line in lines) == 4  # two jobs, two steps each
    assert "jobs over: frozen=0 enabled=True" in result.stdout
    assert int(re.search(r"at exit: frozen=(\d+)", result.stdout)[1]) > 100_000


# Runs an inference command with `uvicorn.Server.run` (serve) and `generate_all` (predict) replaced by a report of the
# collector's state at the moment the command would start its real work.
INFERENCE_PROBE = """
import gc, sys
import uvicorn
import glm_ft.infer.predict as predict
def report(*args, **kwargs):
    print(f"working: frozen={gc.get_freeze_count()} enabled={gc.isenabled()}", flush=True)
    return [[] for _ in args[2]] if len(args) > 2 else None
uvicorn.Server.run, predict.generate_all = report, report
from glm_ft.command import main
try:
    main(sys.argv[1:])
finally:
    print(f"done: frozen={gc.get_freeze_count()} enabled={gc.isenabled()}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "predict"])
def test_inference_works_with_the_loaded_model_frozen(command, runs, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(INFERENCE_PROBE)
    args = {"serve": ["serve", str(runs["lora"]), "--port", "0"],
            "predict": ["predict", str(runs["lora"]), str(ROOT / "data" / "sample" / "test.jsonl"),
                        "--out", str(tmp_path / "predictions.jsonl")]}[command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    result = run_process([sys.executable, str(script), *args], cwd=tmp_path, env=env)
    working = re.search(r"working: frozen=(\d+) enabled=(\w+)", result.stdout)
    assert working, result.stdout[-2000:] + result.stderr[-3000:]
    # torch's, transformers' and the model's objects, frozen; the collector on for what the work makes
    assert int(working[1]) > 100_000 and working[2] == "True"
    assert "done: frozen=0 enabled=True" in result.stdout
