"""`hydra/sweeper=basic` (Hydra's default; config.py replaces Hydra's entry of that name): Hydra's grid sweeper
(`-m method.r=4,8,16`), except that running the same sweep again in the same `hydra.sweep.dir` skips the jobs that
already finished there and resumes the one a kill cut short from its last complete checkpoint, so a sweep killed
in the middle of its third 6B job costs the rest of that job, not three.

A job counts as finished when glm_ft.sweep's callback recorded it COMPLETED (`<sweep dir>/.glm_ft_jobs/N.json`)
with exactly the same overrides, and its folder is still there. The skipped jobs' results are the recorded ones.
A job not finished is resumed (`resume=auto` added to its overrides) when its folder holds a complete checkpoint
(or final/) of a job that ran exactly these overrides (its `.hydra/overrides.yaml`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ResumableBasicSweeper(BasicSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = SkippingLauncher(self.launcher, Path(str(config.hydra.sweep.dir)))


class SkippingLauncher:
    """Wraps the configured launcher: launches only the jobs not finished yet, keeping Hydra's job numbers."""

    def __init__(self, launcher: Any, sweep_dir: Path):
        self.launcher, self.sweep_dir = launcher, sweep_dir

    def __getattr__(self, name: str) -> Any:
        return getattr(self.launcher, name)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from glm_ft.search.sweep import JOBS_DIR
        from glm_ft.tracking.redact import redact

        results: list[JobReturn | None] = [None] * len(job_overrides)
        job_overrides, skipped, resumed = [list(o) for o in job_overrides], [], []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            outcome = _read(self.sweep_dir / JOBS_DIR / f"{num}.json")
            if (outcome and outcome.get("status") == JobStatus.COMPLETED.name
                    and _without_resume(outcome.get("overrides")) == [redact(o) for o in overrides]  # recorded masked
                    and (self.sweep_dir / str(num)).is_dir()):
                results[i] = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                       _return_value=outcome.get("return_value"),
                                       working_dir=str(self.sweep_dir / str(num)))
                skipped.append(f"#{num} ({' '.join(overrides)})")
            elif any(o.startswith("resume=") for o in overrides):
                continue  # the user's own resume
            elif self._resumable(num, overrides):
                job_overrides[i] = [*overrides, RESUME_AUTO]
                resumed.append(f"#{num}")
            else:
                # Trained from scratch: what its folder holds is a job's with other overrides. Disowned now, before
                # Hydra records this job's overrides there: a kill before the job itself disowns them (while it
                # loads data and model) left them looking like this job's, and the next run resumed from them.
                _disown(self.sweep_dir / str(num))
        if skipped:
            log.info("Skipping %d job(s) that finished in an earlier run of %s: %s", len(skipped), self.sweep_dir,
                     ", ".join(skipped))
        if resumed:
            log.info("Resuming %s from the checkpoints an earlier run of %s left (resume=auto)", ", ".join(resumed),
                     self.sweep_dir)
        # Launch the rest in runs of consecutive job numbers, so each keeps its number (and folder).
        start = 0
        while start < len(job_overrides):
            if results[start] is not None:
                start += 1
                continue
            end = start
            while end < len(job_overrides) and results[end] is None:
                end += 1
            launched = self.launcher.launch(list(job_overrides[start:end]), initial_job_idx=initial_job_idx + start)
            results[start:end] = list(launched)
            start = end
        return results

    def _resumable(self, num: int, overrides: Sequence[str]) -> bool:
        return resumable_job(self.sweep_dir / str(num), overrides)


def resumable_job(folder: Path, overrides: Sequence[str]) -> bool:
    """A job folder an earlier run left with a complete checkpoint (or final/) of a job run with exactly these
    overrides: `resume=auto` there continues it. Also the Optuna sweeper's test for a trial a kill cut short."""
    from omegaconf import OmegaConf

    from glm_ft.runs import FINAL, is_complete, last_complete_checkpoint
    from glm_ft.tracking.redact import redact

    if not (folder / ".hydra" / "overrides.yaml").is_file():
        return False
    try:
        ran = [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]
    except Exception:  # an unreadable record: run the job afresh, as before
        return False
    return (_without_resume(ran) == [redact(o) for o in overrides]  # written masked
            and (last_complete_checkpoint(folder) is not None or is_complete(folder / FINAL)))


def _disown(folder: Path) -> None:
    from glm_ft.runs import disown_later

    stale = disown_later(folder, 0) if folder.is_dir() else []
    if stale:
        log.info("%s held %s of a job with other overrides: they no longer count as complete", folder,
                 ", ".join(p.name for p in stale))


RESUME_AUTO = "resume=auto"  # added by the launcher to a job it resumes; not part of what the user asked


def _without_resume(overrides: Sequence[str] | None) -> list[str] | None:
    return None if overrides is None else [o for o in overrides if o != RESUME_AUTO]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
