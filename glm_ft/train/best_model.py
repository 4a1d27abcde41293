"""Keeping the best evaluated checkpoint as final/ (training_args.load_best_model_at_end) and stopping early
(training_args.early_stopping_patience: transformers' EarlyStoppingCallback), across glm-ft's checkpoints and resumes.

transformers chooses the best checkpoint (metric_for_best_model; state.best_metric, best_global_step,
best_model_checkpoint in each trainer_state.json) and protects it from save_total_limit; glm-ft's own rotation
(glm_ft.runs.rotate_checkpoints, after the completion marker) keeps it too. What is corrected here: the methods' own
checkpoint files as the best model, the patience count across a resume, the best so far of another run folder (a
resume from its checkpoint starts afresh), the step the evaluated model is of, and the end-of-training deletion.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback

from glm_ft import dist, methods
from glm_ft.runs import checkpoint_step

log = logging.getLogger(__name__)


class BestModel:
    """A mixin for the Trainer (before it in the bases)."""

    # The step of the checkpoint the model was last loaded from after training (the best one, or final/'s model_step
    # in a job that only redoes the final stages); None: the model is the last trained step's.
    loaded_model_step: int | None = None

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        out = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                           resume_from_checkpoint, trial)
        self._restore_early_stopping(afresh=self._drop_foreign_best(resume_from_checkpoint))
        return out

    @property
    def model_step(self) -> int:
        """The step whose weights the model holds: what an evaluation's numbers are of."""
        return self.state.global_step if self.loaded_model_step is None else self.loaded_model_step

    def _drop_foreign_best(self, resume_from_checkpoint: str | None) -> bool:
        """A resume from another run folder's checkpoint starts the best so far (and early stopping's count against
        it) afresh; True when it did. Its trainer_state.json names that folder's best checkpoint, which this folder
        lacks: final/ was loaded from the other folder; with it deleted, its score stayed the bar (final/ was the last
        step's model unless a later one beat it); and where this folder held another training's checkpoint-K, the
        Trainer pointed the best at that one (rotated away, final/ then held the last step's model, its marker K)."""
        state = self.state
        if resume_from_checkpoint is None or state.best_metric is None and state.best_global_step is None:
            return False
        if Path(resume_from_checkpoint).resolve().parent == Path(self.args.output_dir).resolve():
            return False
        if dist.is_rank_zero():
            log.warning("resume: the best checkpoint so far, %s (%s=%s), is another run folder's: the best model "
                        "and early stopping start afresh in %s", state.best_model_checkpoint or
                        f"checkpoint-{state.best_global_step}", self.args.metric_for_best_model, state.best_metric,
                        self.args.output_dir)
        state.best_metric = state.best_global_step = state.best_model_checkpoint = None
        return True

    def _restore_early_stopping(self, afresh: bool = False) -> None:
        """EarlyStoppingCallback's count of evaluations without improvement, as the resumed checkpoint saved it in
        trainer_state.json. transformers restores it only with restore_callback_states_from_checkpoint (off by
        default), and then with the checkpoint's patience and threshold: a resumed run counted from 0 again and
        trained past where the uninterrupted one stopped. Here the count comes back, the patience stays this run's."""
        saved = (self.state.stateful_callbacks or {}).get(EarlyStoppingCallback.__name__)
        saved = saved[0] if isinstance(saved, list) and saved else saved
        count = 0 if afresh else ((saved or {}).get("attributes") or {}).get("early_stopping_patience_counter", 0)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, EarlyStoppingCallback):
                callback.early_stopping_patience_counter = int(count or 0)
                # a checkpoint saved without early stopping has no entry, where _save_checkpoint looks it up
                self.state.stateful_callbacks.setdefault(EarlyStoppingCallback.__name__, callback.state())

    def stopped_early(self) -> bool:
        """Whether early stopping's patience ran out (training_args.early_stopping_patience)."""
        return any(callback.early_stopping_patience_counter >= callback.early_stopping_patience
                   for callback in self.callback_handler.callbacks if isinstance(callback, EarlyStoppingCallback))

    def _load_best_model(self) -> None:
        # The method's own checkpoint files (a P-Tuning v2 prefix, freeze's trained tensors, a PiSSA adapter saved
        # converted), which the Trainer's loader does not know: it skipped them with a warning.
        best = self.state.best_model_checkpoint
        log.info("loading the best model, %s (%s=%s)", best, self.args.metric_for_best_model, self.state.best_metric)
        if not self._loaded(Path(best)):
            # Deleted (or its weights) since it was saved: transformers only warns that it "could not locate the
            # best model" and loads nothing; final/ then holds the last step's model, and its record says so.
            log.warning("the best model, %s, is gone or holds no weights: the model stays the last step's (step %d)",
                        best, self.state.global_step)
            return
        self.loaded_model_step = checkpoint_step(Path(best))

    def _loaded(self, folder: Path) -> bool:
        """Load the best checkpoint's weights into the model; False when it has none to load."""
        model = self.accelerator.unwrap_model(self.model)
        if not folder.is_dir():
            return False
        if methods.get(self.method.name).load_for_resume(model, str(folder)):
            return True
        if not self._trainer_loads_weights(folder, model):
            return False
        super()._load_best_model()
        return True

    def _trainer_loads_weights(self, folder: Path, model) -> bool:
        """Whether transformers' best-model loader finds weights it loads in `folder` (DeepSpeed's and FSDP's
        loaders fail when they find none). Where it finds none it warns and returns with the model as it was."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return True
        from peft import PeftModel
        from transformers.utils import (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                        SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

        names = ((ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME) if isinstance(model, PeftModel) else
                 (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME))
        return any((folder / name).is_file() for name in names)

    def _finalize_training(self, *args, **kwargs):
        # With save_total_limit=1 the Trainer deletes every checkpoint but the best here, before final/ is saved and
        # marked: the newest, which resume=auto continues from (a kill during final/'s save, a longer max_steps),
        # would be gone. Watchdog's rotation has kept the best and the newest, as during training.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            return super()._finalize_training(*args, **kwargs)
        finally:
            self.args.save_total_limit = limit

    def final_model_facts(self) -> dict[str, Any]:
        """What final/ holds, for its completion marker: `model_step`, the step whose weights it holds (the best
        checkpoint's with load_best_model_at_end, else the last step's), `stopped_early` when the patience ran out."""
        facts: dict[str, Any] = {"model_step": self.model_step}
        if self.stopped_early():
            facts["stopped_early"] = True
        return facts


def best_model_tags(state, args, facts: dict[str, Any]) -> dict[str, str]:
    """MLflow tags naming what final/ holds and the best evaluation, beside glm_ft.final_model."""
    tags = {"glm_ft.final_model_step": str(facts["model_step"])}
    best = state.best_model_checkpoint
    if args.load_best_model_at_end and best is not None and checkpoint_step(Path(best)) == facts["model_step"]:
        tags["glm_ft.final_model_checkpoint"] = str(best)  # not when it could not be loaded (BestModel)
    if args.metric_for_best_model is not None and state.best_metric is not None:
        tags.update({"glm_ft.metric_for_best_model": args.metric_for_best_model,
                     "glm_ft.best_metric": repr(float(state.best_metric)),
                     "glm_ft.best_model_checkpoint": str(state.best_model_checkpoint)})
    if facts.get("stopped_early"):
        tags["glm_ft.stopped_early_at_step"] = str(state.global_step)
    return tags


def early_stopping(training_args) -> list[EarlyStoppingCallback]:
    """The callback training_args.early_stopping_patience asks for (none when null)."""
    if training_args.early_stopping_patience is None:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience,
                                  early_stopping_threshold=training_args.early_stopping_threshold)]
