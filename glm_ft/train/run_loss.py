"""The run's training loss across resumes and processes: what the Trainer reports for one train() call, made the
whole run's.

transformers' Trainer sums the step losses between logs in `_tr_loss` (this process's own), drains them into
`_total_loss_scalar` at each log (averaged over the processes), and at the end reports train_loss as that total over
the steps of this train() call. Three things follow that glm-ft corrects here, so that a run killed and resumed
reports what the uninterrupted run reports:
- resumed, train_loss would average only the steps since the resume;
- the steps after the last log entered train_loss as rank 0's own losses, not the mean over the processes;
- resumed from a checkpoint saved between two logs, the next logged loss would average only the steps since the
  resume, not the whole logging window.
Each checkpoint's trainer_state.json records the losses logged so far, the ones not yet logged and the step of the
last log (`stateful_callbacks`, which the Trainer saves and loads as they are); a resume restores them.
"""

from __future__ import annotations

from transformers.trainer_pt_utils import nested_gather

RECORD = "GlmFtLossSum"


class WholeRunLoss:
    """A mixin for the Trainer (before it in the bases)."""

    _loss_before: float | None = 0.0  # the losses logged before this train() call; None: unknown (an old checkpoint)
    _restore_window: tuple[float, int] | None = None  # (losses not yet logged, step of the last log) at the resume

    def _init_training_state(self, *args, **kwargs):
        out = super()._init_training_state(*args, **kwargs)
        self._loss_before, self._restore_window = 0.0, None
        if self.state.global_step > 0:  # resumed
            record = ((self.state.stateful_callbacks or {}).get(RECORD) or {}).get("attributes") or {}
            total, pending = record.get("loss_sum"), record.get("pending", 0.0)
            self._loss_before = None if total is None else total - pending
            if total is not None and "last_logged" in record:
                self._restore_window = (pending, int(record["last_logged"]))
        return out

    def _run_epoch(self, *args, **kwargs):
        # The Trainer zeroes its log window after _init_training_state; the first epoch of a resumed call puts the
        # checkpoint's back, so the next logged loss averages the same steps as the uninterrupted run's.
        self._restore_log_window()
        return super()._run_epoch(*args, **kwargs)

    def _restore_log_window(self) -> None:
        if self._restore_window is not None:
            pending, last_logged = self._restore_window
            self._restore_window = None
            self._tr_loss += pending
            self._globalstep_last_logged = last_logged

    def _pending_loss(self) -> float:
        """The losses since the last log, averaged over the processes as a log averages them (a collective: every
        process calls it at the same point)."""
        return nested_gather(self._tr_loss, self.args.parallel_mode).mean().item()

    def _save_checkpoint(self, model, trial):
        pending = self._pending_loss()
        if self._loss_before is not None:
            self.state.stateful_callbacks[RECORD] = {"args": {}, "attributes": {
                "loss_sum": self._loss_before + self._total_loss_scalar + pending, "pending": pending,
                "last_logged": self._globalstep_last_logged}}
        return super()._save_checkpoint(model, trial)

    def _finalize_training(self, *args, **kwargs):
        # Resumed from the last step's checkpoint no epoch runs: its unlogged losses still count.
        self._restore_log_window()
        # The Trainer would add the unlogged losses as this process's own (`.item()`, no gather).
        pending = self._pending_loss()
        self._tr_loss -= self._tr_loss
        self._total_loss_scalar += pending
        return super()._finalize_training(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs and self._loss_before is not None:
            logs["train_loss"] = (self._loss_before + self._total_loss_scalar) / max(self.state.global_step, 1)
        super().log(logs, start_time)
