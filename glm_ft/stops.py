"""The one line a job stopped by Ctrl-C or SIGTERM prints: where it stopped, and what its run folder keeps.

The job names its stage as it reaches it (`reached`); `stop_line` words the stop from that stage and from what the
folder holds (its complete checkpoints, final/'s marker, glm_ft_progress.json), so a stop anywhere -- config
validation, the data check, model loading, a step, final/'s save, the final evaluation, the test prediction, the
MLflow run's close -- says the same kind of line, whichever exception carried it to the CLI (glm_ft.cli.stopped).
Light: nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from glm_ft.runs import FINAL, finished_step, last_complete_checkpoint, read_progress
from glm_ft.tracking.signals import raise_lost_stop

STARTING = "before training started"
# Before the job changed anything of its folder (validation, the data check, loading: it has trained nothing yet).
STARTING_LINE = f"{STARTING}; nothing was trained or saved (continue with the same command)"
FINAL_EVALUATION = "during the final evaluation"
TEST_PREDICTION = "during the test prediction"
CLOSING = "while closing the run"

_stage: Callable[[], str] = lambda: STARTING
_sweep_dir: Path | None = None  # the sweep this process runs (`-m`), if any


def reached(stage: str | Callable[[], str]) -> None:
    """The job's stage from now on; a callable is asked when a stop is worded (a training's current step). A stop
    Python dropped in the stage before is raised here, as that stage's; at a job's start (a sweep's next job), as
    this job's, before it started."""
    global _stage
    if stage == STARTING:
        _stage = lambda: STARTING
    raise_lost_stop()
    _stage = stage if callable(stage) else (lambda: stage)


def sweeping(sweep_dir: Path) -> None:
    """This process runs the sweep in `sweep_dir`: a stop outside its jobs says how to continue it."""
    global _sweep_dir
    _sweep_dir = sweep_dir


def continue_sweep(sweep_dir: Path | str) -> str:
    """How a stopped sweep goes on: its default folder is named after the time it started, so the same command
    alone would start another sweep and train every job again."""
    return f"continue the sweep with the same command and hydra.sweep.dir={sweep_dir}"


def outside_job_line() -> str:
    """The line of a stop outside any job: before a single run's job started, or in a sweep's own work (recording a
    job's end, launching the next, closing its parent run), where jobs may have trained and the sweep goes on."""
    if _sweep_dir is None:
        return STARTING_LINE
    return f"between the jobs of the sweep in {_sweep_dir}; {continue_sweep(_sweep_dir)}"


def training(step: Callable[[], int | None], resumed_from: int | None = None) -> None:
    """A training from now on: a stop says the step it reached, `step()` (None once the Trainer is gone). A training
    resumed from a checkpoint at step `resumed_from` counts from 0 until the Trainer has restored that checkpoint's
    state (its model, its trainer_state.json): a stop before then is at `resumed_from`, not at step 0."""
    def where() -> str:
        now = step()
        if now is None:
            return "in training"
        if resumed_from and not now:
            return f"before training resumed from step {resumed_from}"
        return f"at step {now}"

    reached(where)


def stop_line(cfg: DictConfig, run_dir: Path) -> str:
    """Where the job stopped and what its folder keeps, ending in `(continue with ...)` when there is more to do
    (the sweep replaces that hint by its own)."""
    where = _stage()
    if where == STARTING:
        return STARTING_LINE
    resume = f"resume=auto hydra.run.dir={run_dir}"
    args = cfg.training_args
    step = finished_step(run_dir, int(args.get("max_steps", -1) or -1), float(args.num_train_epochs))
    if step is None:
        last = last_complete_checkpoint(run_dir)
        if last is None and cfg.get("resume") not in (None, "auto"):
            # Resumed from another folder's checkpoint, and nothing saved here yet: resume=auto here would start from
            # scratch; that checkpoint is still where this training continues from.
            last = Path(cfg.resume).expanduser().resolve()
            resume = f"resume={last} hydra.run.dir={run_dir}"
        return f"{where}; last complete checkpoint: {last or 'none'} (continue with {resume})"
    progress = read_progress(run_dir)
    missing = [name for name, done, wanted in (("the final evaluation", "evaluated", cfg.data.get("val_file")),
                                               ("the test prediction", "predicted", cfg.data.get("test_file")))
               if wanted and done not in progress]
    if progress.get("complete") or not missing:
        done = f"{where}; every stage is done: {run_dir} holds the trained model, its metrics and predictions"
        if not cfg.tracking.get("enabled"):
            return done
        # The stop ended its MLflow run KILLED, maybe before its run files were logged: resume=auto closes it.
        return f"{done} (continue with {resume}, which trains nothing and closes its MLflow run FINISHED)"
    return (f"{where}; the trained model, {Path(run_dir) / FINAL} (step {step}), is complete (continue with {resume}, "
            f"which trains nothing and redoes only {' and '.join(missing)})")
