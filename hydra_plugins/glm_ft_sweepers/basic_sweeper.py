"""`hydra/sweeper=basic` (Hydra's default; config.py replaces Hydra's entry of that name): Hydra's grid sweeper
(`-m method.r=4,8,16`), except that running the same sweep again in the same `hydra.sweep.dir` skips the jobs that
already finished there and resumes the one a kill cut short from its last complete checkpoint, so a sweep killed
in the middle of its third 6B job costs the rest of that job, not three.

A job counts as finished when glm_ft.sweep's callback recorded it COMPLETED (`<sweep dir>/.glm_ft_jobs/N.json`)
with exactly the same overrides, and its folder is still there. The skipped jobs' results are the recorded ones.
A job not finished is resumed (`resume=auto` added to its overrides) when its folder holds a complete checkpoint
(or final/) of a job that ran exactly these overrides (its `.hydra/overrides.yaml`).

A failed job does not stop the sweep (Hydra's stops after the batch it is in): every job runs, and the sweep ends
with one line per failed job and a count (SweepFailed), not the first failure's traceback. A job whose returned
score is NaN or infinite counts as failed, as the Optuna sweeper fails such a trial (glm_ft.search.sweep.no_score).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class ResumableBasicSweeper(BasicSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = SkippingLauncher(self.launcher, Path(str(config.hydra.sweep.dir)))

    @staticmethod
    def checked_jobs(config: DictConfig, config_loader) -> list[list[str]]:
        """The overrides of the sweep's first and last jobs (every swept key at its first, then its last value):
        glm_ft.search.precheck judges the sweep's config on them before any job starts."""
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        lines = [f"{k}={v}" for k, v in (OmegaConf.to_container(params, resolve=True) if params else {}).items()]
        parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(
            lines + list(config.hydra.overrides.task))
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
        return [jobs[0], jobs[-1]] if jobs else []

    def sweep(self, arguments: List[str]) -> Any:
        """Hydra's BasicSweeper.sweep, except for what a failed job does (see the module's docstring)."""
        from glm_ft.search.sweep import no_score, sweep_objective

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        metric = sweep_objective(self.config)[0]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides(self._parse_config() + list(arguments))
        swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
        self.overrides = self.split_arguments(parsed, self.max_batch_size)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, failures, num = [], [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=num)
            for i, ret in enumerate(results):
                shown = [o for o in ret.overrides if o.split("=", 1)[0] in swept] or list(ret.overrides)
                if ret.status != JobStatus.COMPLETED:
                    failures.append(f"job #{num + i} ({' '.join(shown)}): {failure_text(ret._return_value)}")
                    log_crash(f"job #{num + i} failed", ret._return_value)
                elif no_score(metric, ret._return_value):  # a NaN objective: a failed trial, as Optuna has it
                    failures.append(f"job #{num + i} ({' '.join(shown)}): {no_score(metric, ret._return_value)}")
            num += len(batch)
            returns.append(results)
        if failures:
            raise SweepFailed(failures, num, "jobs")
        return returns


class SweepFailed(CompactHydraException):
    """The end of a sweep some of whose jobs failed: one line per failed job, then the count. Compact, so Hydra
    prints the message alone: the sweeper's own traceback says nothing about the jobs."""

    def __init__(self, lines: list[str], launched: int, what: str) -> None:
        from glm_ft.tracking.redact import redact

        # redacted: a job's overrides or error may hold a tracking URI's password
        super().__init__(redact("\n".join([*lines, f"error: {len(lines)} of {launched} {what} failed"])))


def failure_text(error: BaseException | None) -> str:
    """A failed job's error in its line: a refusal's message as the job printed it (glm_ft.cli's JobFailed,
    Hydra's own compact errors), anything else with its type."""
    if isinstance(error, CompactHydraException):
        return str(error).removeprefix("error: ")
    return f"{type(error).__name__}: {error}"


def log_crash(what: str, error: BaseException | None) -> bool:
    """A crash (not a refusal) keeps its traceback, in the log (Hydra printed the first one's at the sweep's end).
    Whether it was one."""
    if not isinstance(error, BaseException) or isinstance(error, CompactHydraException):
        return False
    log.error("%s: %s", what, failure_text(error), exc_info=(type(error), error, error.__traceback__))
    return True


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
