"""One training, one MLflow run, whatever happens to the process: SIGKILL then resume=auto continues the same run;
resume=auto on a finished run trains nothing and redoes only what is missing; a full disk while saving a checkpoint
is one line naming it, and the previous complete checkpoint stays the resume point."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_train
from glm_ft.runs import CURVES_FILE
from glm_ft.search import STUDY_ENV, TRIAL_ENV
from glm_ft.tracking.curves import read_series
from lifecycle_helpers import (QUICK, background, complete, fill, kill_group, killed_once_final_is_saved, logged_losses,
                               mlflow_run_id, signalled_at, stopped, tmpfs, train_cmd, trainer_losses, wait_for,
                               wait_until_stopped)

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path) -> dict:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    return {"env": {"MLFLOW_TRACKING_URI": uri}, "client": MlflowClient(uri)}


def runs_of(client, run_dir) -> list:
    exp = client.get_experiment_by_name("glm-ft")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("glm_ft.run_dir") == str(run_dir)]


def test_sigkill_then_resume_continues_the_same_mlflow_run(tmp_path, store):
    args = [*QUICK, "training_args.max_steps=8", "training_args.save_steps=2"]
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    with background(train_cmd(args, run_dir, stop_after="checkpoint-4"), log, env=store["env"]) as proc:
        wait_until_stopped(proc, log, "checkpoint-4")
        kill_group(proc)
        proc.wait()
    assert not complete(run_dir, 8)
    run_id = mlflow_run_id(run_dir)
    assert store["client"].get_run(run_id).info.status == "RUNNING"  # what SIGKILL leaves behind

    resumed = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=store["env"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert f"MLflow: run {run_id} was left RUNNING by process" in said and "marked KILLED" in said
    assert mlflow_run_id(run_dir) == run_id
    (run,) = runs_of(store["client"], run_dir)  # one training, one run
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["glm_ft.resumes"] == "1"
    assert run.data.params["resume"] == "null"  # params stay those of the first start ...
    assert json.loads(run.data.tags["glm_ft.resume_changed_params"]) == {"resume": "auto"}  # ... changes listed
    # The curve continues at its global steps: the steps redone after checkpoint-4 carry the resumed values.
    assert logged_losses(store["client"], run_id) == trainer_losses(run_dir, 8)
    # training_curves.png, written when the resumed training ends, draws the whole training, not only its second half.
    assert dict(map(tuple, read_series(run_dir / CURVES_FILE)["loss"])) == trainer_losses(run_dir, 8)


def test_a_trial_killed_while_its_model_loads_still_names_its_trial(tmp_path, store):
    """A job of an Optuna sweep creates its MLflow run with its trial's tags: SIGKILLed as soon as the run exists,
    its model still loading, the run still says which trial and study it belonged to. (The environment has no study
    storage: a job that got further would fail opening its trial, and its run would have to be tagged by then.)"""
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    env = {**store["env"], TRIAL_ENV: "7", STUDY_ENV: "lora_optuna"}
    with background(train_cmd(QUICK, run_dir), log, env=env) as proc:
        wait_for(lambda: (run_dir / "mlflow_run.json").is_file(), "the job's MLflow run", proc, log)
        kill_group(proc)
        proc.wait()
    tags = store["client"].get_run(mlflow_run_id(run_dir)).data.tags
    assert (tags["glm_ft.trial"], tags["glm_ft.study"]) == ("7", "lora_optuna")


def file_digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_redoes_only_what_is_missing(tmp_path, store):
    """Killed once final/ is saved, before the test prediction: resume=auto predicts (same MLflow run) without
    training; once all is done, resume=auto says so and changes nothing."""
    args = [*QUICK, "data.test_file=test.jsonl", "training_args.max_steps=4", "training_args.save_steps=2",
            "training_args.eval_steps=2", "training_args.generation_config.max_new_tokens=16"]
    run_dir = tmp_path / "run"
    killed_once_final_is_saved(args, run_dir, store["env"])
    assert (run_dir / "final" / "glm_ft_complete").is_file() and not (run_dir / "predictions.jsonl").exists()
    trained = file_digests(run_dir / "final")
    run_id = mlflow_run_id(run_dir)

    redo = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=store["env"])
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "resume=auto: training finished at step 4" in redo.stdout + redo.stderr
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # no step 5
    assert file_digests(run_dir / "final") == trained  # final/ not rewritten
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    conversations = [json.loads(line) for line in (ROOT / "data" / "sample" / "test.jsonl").read_text().splitlines()]
    references = [m["content"] for c in conversations for m in c["conversations"] if m["role"] == "assistant"]
    assert len(rows) == len(references)  # one prediction per assistant turn of the test file
    (run,) = runs_of(store["client"], run_dir)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    test_metrics = json.loads((run_dir / "test_metrics.json").read_text())
    for key in ("test_rouge-l", "test_bleu-4"):
        assert run.data.metrics[key] == pytest.approx(test_metrics[key])
        assert [m.step for m in store["client"].get_metric_history(run_id, key)] == [4]
    assert logged_losses(store["client"], run_id) == trainer_losses(run_dir, 4)
    # Training evaluated at its last step: the redo takes that evaluation (checkpoint-4's log), not evaluating twice.
    evaluated = [h for h in json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
                 if "eval_rouge-l" in h]
    assert [h["step"] for h in evaluated] == [2, 4]
    assert [m.step for m in store["client"].get_metric_history(run_id, "eval_rouge-l")] == [2, 4]
    assert json.loads((run_dir / "glm_ft_progress.json").read_text())["evaluated"] == {
        k: v for k, v in evaluated[-1].items() if k.startswith("eval_")}
    # The redone prediction's log carries the Trainer's counters: as training left them, not a fresh state's zeros.
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] > 0 and state["epoch"] > 0
    for key in ("num_input_tokens_seen", "epoch"):
        assert run.data.metrics[key] == pytest.approx(state[key])
    # The redo trained nothing; its training_curves.png draws the training from checkpoint-4's trainer_state.json.
    assert dict(map(tuple, read_series(run_dir / CURVES_FILE)["loss"])) == trainer_losses(run_dir, 4)

    before = file_digests(run_dir)
    again = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=store["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resume=auto: {run_dir} is complete" in again.stdout + again.stderr
    after = file_digests(run_dir)
    hydra_log = {k for k in before.keys() | after.keys() if k.startswith(".hydra/") or k.endswith(".log")}
    assert {k: v for k, v in after.items() if k not in hydra_log} == \
        {k: v for k, v in before.items() if k not in hydra_log}  # nothing trained, saved or predicted again
    assert store["client"].get_run(run_id).info.status == "FINISHED"


def test_full_disk_while_saving_a_checkpoint(tmp_path, store):
    args = [*QUICK, "training_args.max_steps=8", "training_args.save_steps=2"]
    with tmpfs(tmp_path / "run", "8m") as run_dir:
        log = tmp_path / "train.log"
        with background(train_cmd(args, run_dir, stop_after="checkpoint-2"), log, env=store["env"]) as proc:
            wait_until_stopped(proc, log, "checkpoint-2")
            filler = fill(run_dir, leave_bytes=64 << 10)
            kill_group(proc, signal.SIGCONT)
            wait_for(lambda: proc.poll() is not None, "the failure", may_exit=True)
        text = log.read_text(errors="replace")
        assert proc.returncode == 1, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, text[-3000:]
        match = re.fullmatch(r"error: No space left on device while saving (\S+); the last complete checkpoint, "
                             r"(\S+), stays the resume point: free space, then continue with resume=auto "
                             r"hydra.run.dir=(\S+)", errors[0])
        assert match, errors[0]
        failed, last = match[1], match[2]
        assert not os.path.exists(os.path.join(failed, "glm_ft_complete"))
        complete_now = sorted(run_dir.glob("checkpoint-*/glm_ft_complete"))
        assert last == str(max((p.parent for p in complete_now), key=lambda p: int(p.name.split("-")[1])))
        assert "inline_container" not in text and "Traceback" not in text
        (run,) = runs_of(store["client"], run_dir)
        assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["glm_ft.error"]

        filler.unlink()
        resumed = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=store["env"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming from {last}" in resumed.stdout + resumed.stderr
        assert complete(run_dir, 8)


def test_full_disk_once_the_final_model_is_saved(tmp_path, store):
    """The disk fills after final/ is saved, while the test prediction and the run's records are written: one line
    naming the run folder and saying that final/ is saved (a traceback ending in a bare `OSError: [Errno 28]` before),
    no half-written temporary files left holding space, the run FAILED with the reason; resume=auto, space freed,
    trains nothing and predicts."""
    args = [*QUICK, "data.test_file=test.jsonl", "training_args.max_steps=4", "training_args.save_steps=2"]
    with tmpfs(tmp_path / "run", "8m") as run_dir:
        log = tmp_path / "train.log"
        with background(train_cmd(args, run_dir, stop_after="final"), log, env=store["env"]) as proc:
            wait_until_stopped(proc, log, "final/")
            filler = fill(run_dir)
            with contextlib.suppress(OSError), open(filler, "ab") as out:  # the last pages too: no write fits
                while True:
                    out.write(b"\0" * 4096)
                    out.flush()
            kill_group(proc, signal.SIGCONT)
            wait_for(lambda: proc.poll() is not None, "the failure", may_exit=True)
        text = log.read_text(errors="replace")
        assert proc.returncode == 1, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert errors == [f"error: No space left on device while writing into {run_dir}; the trained model, "
                          f"{run_dir / 'final'}, is saved: free space, then resume=auto hydra.run.dir={run_dir} "
                          "redoes only the evaluation or prediction that is missing"], text[-3000:]
        assert "Traceback" not in text
        assert (run_dir / "final" / "glm_ft_complete").is_file()
        assert not list(run_dir.glob(".*.tmp"))
        (run,) = runs_of(store["client"], run_dir)
        assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["glm_ft.error"]

        filler.unlink()
        resumed = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=store["env"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resume=auto: training finished at step 4" in resumed.stdout + resumed.stderr
        assert (run_dir / "predictions.jsonl").is_file()
        (run,) = runs_of(store["client"], run_dir)
        assert run.info.status == "FINISHED"
        assert logged_losses(store["client"], run.info.run_id) == trainer_losses(run_dir, 4)


# The job stops itself (SIGSTOP) once glm_ft_progress.json says the run is complete: after its last stage, before
# its MLflow run is closed (run files uploaded, status set).
STOP_WHEN_COMPLETE = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import glm_ft.runs as runs
record = runs.record_progress
def record_then_stop(run_dir, **stages):
    record(run_dir, **stages)
    if stages.get("complete"):
        os.kill(os.getpid(), signal.SIGSTOP)
runs.record_progress = record_then_stop  # before glm_ft.train imports it by name
sys.argv = ["train.py", *sys.argv[1:]]
from glm_ft.cli import main
main()
"""


def artifacts_of(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifacts_of(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_killed_while_closing_its_mlflow_run_a_complete_run_resumes_to_finished(tmp_path, store):
    """SIGKILL after the last stage, while the MLflow run is being closed: resume=auto trains and predicts nothing,
    and closes the same run as the uninterrupted job does, FINISHED with its run files, not KILLED without them."""
    import sys

    args = [*QUICK, "training_args.max_steps=2", "training_args.save_steps=2"]
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    cmd = [sys.executable, "-c", STOP_WHEN_COMPLETE, *args, f"hydra.run.dir={run_dir}"]
    with background(cmd, log, env=store["env"]) as proc:
        wait_for(lambda: stopped(proc), "the complete run (the job stops there)", proc, log)
        kill_group(proc)
        proc.wait()
    run_id = mlflow_run_id(run_dir)
    assert store["client"].get_run(run_id).info.status == "RUNNING"

    again = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=store["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resume=auto: {run_dir} is complete" in again.stdout + again.stderr
    (run,) = runs_of(store["client"], run_dir)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert {"finetune.yaml", CURVES_FILE, "model/adapter_model.safetensors"} <= artifacts_of(store["client"], run_id)


@pytest.mark.parametrize(("stop_at", "signum"), [
    ("glm_ft.tracking.store:ui_hint", signal.SIGTERM),  # the job's last line: complete recorded, its run not closed
    ("glm_ft.tracking.lifecycle:close_run", signal.SIGINT),  # as its MLflow run's closing begins
    ("glm_ft.tracking.tracker:Tracker._log_run_files", signal.SIGTERM),  # as its run files are uploaded
], ids=["complete_sigterm", "close_ctrl_c", "uploading_files_sigterm"])
def test_stopped_while_closing_its_mlflow_run_a_complete_run_resumes_to_finished(stop_at, signum, tmp_path, store):
    """Ctrl-C or SIGTERM after the last stage, while the MLflow run is being closed: the run ended KILLED (its run
    files unlogged when the stop came before their upload) and resume=auto, taking the job as complete, left it so for
    good. Now the stop line says resume=auto closes it, and resume=auto closes the same run FINISHED with its files."""
    args = [*QUICK, "training_args.max_steps=2", "training_args.save_steps=2"]
    run_dir = tmp_path / "run"
    code, out = signalled_at(stop_at, signum, args, run_dir, store["env"])
    assert code == 128 + signum and "Traceback" not in out, out[-3000:]
    said = [line.rpartition("\r")[2] for line in out.splitlines() if "interrupted" in line]
    assert said == [f"interrupted while closing the run; every stage is done: {run_dir} holds the trained model, its "
                    f"metrics and predictions (continue with resume=auto hydra.run.dir={run_dir}, which trains nothing "
                    "and closes its MLflow run FINISHED)"], out[-3000:]
    assert json.loads((run_dir / "glm_ft_progress.json").read_text())["complete"] is True
    run_id = mlflow_run_id(run_dir)
    assert store["client"].get_run(run_id).info.status == "KILLED"

    again = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=store["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert f"resume=auto: {run_dir} is complete" in said and f"the MLflow run of {run_dir} was not closed" in said
    (run,) = runs_of(store["client"], run_dir)
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.tags["glm_ft.resumes"] == "1"
    assert json.loads((run_dir / "mlflow_run.json").read_text())["ended"] == {"status": "FINISHED", "closed": True}
    logged = artifacts_of(store["client"], run_id)
    assert {"finetune.yaml", "eval_predictions.jsonl", CURVES_FILE, ".hydra/config.yaml"} <= logged
    # The model logged is the run folder's final/, byte for byte.
    model = {p for p in logged if p.startswith("model/")}
    assert model == {f"model/{name}" for name in file_digests(run_dir / "final")}
    copy = store["client"].download_artifacts(run_id, "model", str(tmp_path / "downloaded"))
    assert file_digests(Path(copy)) == file_digests(run_dir / "final")


def test_a_redone_prediction_reports_what_the_uninterrupted_run_reports(tmp_path, store):
    """Killed once final/ is saved: the prediction resume=auto redoes (a Trainer that did not train) reports the same
    metrics as the uninterrupted run's, not also the Trainer's `test_model_preparation_time`."""
    args = [*QUICK, "data.test_file=test.jsonl", "training_args.max_steps=2", "training_args.save_steps=2"]
    run_dir = tmp_path / "run"
    killed_once_final_is_saved(args, run_dir, store["env"])
    redo = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=store["env"])
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "resume=auto: training finished at step 2" in redo.stdout + redo.stderr
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert not [k for k in metrics if "model_preparation_time" in k]
    logged = store["client"].get_run(mlflow_run_id(run_dir)).data.metrics
    assert not [k for k in logged if "model_preparation_time" in k]
    assert not [k for k in json.loads((run_dir / "glm_ft_progress.json").read_text())["metrics"]
                if "model_preparation_time" in k]


def test_a_redo_in_a_run_without_checkpoints_keeps_what_training_logged(tmp_path, store):
    """save_strategy=no: final/ is the only saved state. Killed once final/ is saved, the redo's training_curves.png
    still draws the loss and the evaluations training logged, and the evaluation training made at its last step is
    taken, not made again (the training's log came only from a checkpoint's trainer_state.json: the picture drew
    nothing, and eval_* got a second point at step 4)."""
    args = [*QUICK, "training_args.max_steps=4", "training_args.save_strategy=no", "training_args.eval_steps=2"]
    run_dir = tmp_path / "run"
    killed_once_final_is_saved(args, run_dir, store["env"])
    assert not list(run_dir.glob("checkpoint-*"))
    run_id = mlflow_run_id(run_dir)
    redo = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=store["env"])
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "resume=auto: training finished at step 4" in redo.stdout + redo.stderr
    series = read_series(run_dir / CURVES_FILE)
    losses = logged_losses(store["client"], run_id)
    assert sorted(losses) == [1, 2, 3, 4]
    assert dict(map(tuple, series.get("loss", []))) == losses
    assert [step for step, _ in series.get("eval_rouge-l", [])] == [2, 4]
    assert [m.step for m in store["client"].get_metric_history(run_id, "eval_rouge-l")] == [2, 4]


def test_the_interrupt_behind_an_error_is_found_through_its_chain():
    """What a library's cleanup raises while a Ctrl-C or SIGTERM unwinds still counts as that signal; an error that
    no signal caused does not, and an exception chain that loops ends the search."""
    from glm_ft.tracking.signals import Terminated, interrupt_behind

    def raised_while_handling(first: BaseException) -> BaseException:
        try:
            try:
                raise first
            finally:
                raise RuntimeError("cannot release un-acquired lock")
        except RuntimeError as err:
            return err

    sigterm = raised_while_handling(Terminated())
    assert isinstance(interrupt_behind(sigterm), Terminated)
    assert isinstance(interrupt_behind(raised_while_handling(KeyboardInterrupt())), KeyboardInterrupt)
    assert interrupt_behind(raised_while_handling(ValueError("bad row"))) is None
    looped = RuntimeError("a")
    looped.__context__ = RuntimeError("b")
    looped.__context__.__context__ = looped
    assert interrupt_behind(looped) is None


LOSING_A_STOP = """
import os, signal, sys, time
sys.path.insert(0, os.getcwd())
import glm_ft.runs as runs
signum, mark_complete = int(sys.argv[1]), runs.mark_complete
class Finalizer:
    def __del__(self):
        os.kill(os.getpid(), signum)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the signal's handler runs in here: what it raises, Python drops
            pass
def mark_then_lose_a_stop(folder, step, **facts):
    mark_complete(folder, step, **facts)
    if folder.name == "checkpoint-2":
        Finalizer()  # unreferenced at once: its __del__ runs here, in the main thread, as a garbage collection would
runs.mark_complete = mark_then_lose_a_stop  # before glm_ft.train imports it by name
sys.argv = ["train.py", *sys.argv[2:]]
from glm_ft.cli import main
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_a_stop_landing_inside_a_finalizer_still_stops_the_job(signum, tmp_path, store):
    """A signal's handler runs at whatever bytecode is next, also inside a `__del__` that a garbage collection
    started; Python drops what a `__del__` raises. The stop was lost with a traceback, and the job trained on: a rank
    whose launcher had been SIGKILLed (it gets one SIGTERM) trained for good. Now the job stops once that save is
    marked complete (the marker's write dropped it)."""
    args = [*QUICK, "training_args.max_steps=8", "training_args.save_steps=2"]
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    cmd = [sys.executable, "-c", LOSING_A_STOP, str(int(signum)), *args, f"hydra.run.dir={run_dir}"]
    with background(cmd, log, env=store["env"]) as proc:
        proc.wait()
    out = log.read_text(errors="replace")
    assert proc.returncode == 128 + signum, out[-3000:]
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    said = [line[line.index("interrupted"):] for line in out.splitlines() if "interrupted" in line]  # after tqdm's
    assert said == [f"interrupted at step 2; last complete checkpoint: {run_dir / 'checkpoint-2'} (continue with "
                    f"resume=auto hydra.run.dir={run_dir})"], out[-3000:]
    assert complete(run_dir, 2) and not (run_dir / "checkpoint-4").exists()
    assert store["client"].get_run(mlflow_run_id(run_dir)).info.status == "KILLED"
