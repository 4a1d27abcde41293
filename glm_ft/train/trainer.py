"""The Trainer glm-ft trains with, and its callbacks: generation-based evaluation in sample order, method-aware
checkpoints, completion markers, a NaN watchdog and MLflow logging.

Heavy (torch, transformers): imported once training starts (glm_ft.train.finetune), never on the light path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
from pathlib import Path

import accelerate.utils.other
from accelerate.utils import DummyOptim  # transformers' stand-in for a DeepSpeed config's optimizer, not yet built
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Seq2SeqTrainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction

from glm_ft import dist, methods
from glm_ft.atomic import write_text_atomic
from glm_ft.errors import GlmFtError
from glm_ft.config.schema import EVAL_BATCH_TOKENS
from glm_ft.runs import (COMPLETE_MARKER, DATA_ORDER_RECORD, changed_data_inputs, changed_precision_inputs,
                         checkpoint_dir, last_complete_checkpoint, mark_complete, rotate_checkpoints, shown_value,
                         write_json)
from glm_ft.data.collate import SAMPLE_INDEX
from glm_ft.train.best_model import BestModel
from glm_ft.train.disk_full import disk_full_named
from glm_ft.train.evaluation import Indexed, in_sample_order, plan_generation, write_predictions
from glm_ft.train.generation import generate
from glm_ft.train.metrics import prefix_metrics
from glm_ft.train.optimizer import decay_groups, optimizer_state_fits
from glm_ft.train.run_loss import WholeRunLoss
from glm_ft.tracking.signals import raise_lost_stop

log = logging.getLogger(__name__)
# A checkpoint's record of the Trainer's arguments. The Trainer's own is a pickle of the arguments object
# (training_args.bin), which only an unsafe load (weights_only=False) can read: glm-ft writes JSON instead.
TRAINING_ARGS_JSON = "training_args.json"


def _deepspeed_in_use(available=accelerate.utils.other.is_deepspeed_available):
    """accelerate's unwrap_model imports deepspeed, on every Trainer, only to ask whether the model is a
    DeepSpeedEngine: 0.3 s and 15 MiB on a run without DeepSpeed, and deepspeed imports mlflow, 1.3 s and 47 MiB
    more when tracking is off. No model is an engine until deepspeed has been imported (a DeepSpeed run imports it
    before wrapping), so asking only then gives the same answer."""
    return "deepspeed" in sys.modules and available()


accelerate.utils.other.is_deepspeed_available = _deepspeed_in_use


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order (`group_by_length`), drawn from `seed + epoch` instead of the global RNG.
    The global RNG at an epoch's start depends on all that was drawn before it (dropout among others), which a run
    resumed in a later epoch never drew, so that epoch came out in another order than uninterrupted. Seeded by the
    epoch, as accelerate seeds the random order with `data_seed`, the order is the same however the run got there."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer's data loader before each epoch
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


@contextlib.contextmanager
def global_rng_kept(device: torch.device):
    """Python's, numpy's, torch's CPU and `device`'s generators as they were before the block, after it: the states
    the Trainer saves in each checkpoint's rng_state.pth and restores on resume."""
    python, numpy = random.getstate(), np.random.get_state()
    devices, kind = [], "cuda"  # fork_rng's default kind; no device forked on CPU
    if device.type not in ("cpu", "meta"):
        kind = device.type
        devices = [device.index if device.index is not None else getattr(torch, kind).current_device()]
    with torch.random.fork_rng(devices=devices, device_type=kind):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class TrainingDiverged(GlmFtError):
    """The loss became NaN or infinite."""


class GlmTrainer(WholeRunLoss, BestModel, Seq2SeqTrainer):
    """Generation-based evaluation for a decoder-only model, and method-aware checkpoints.

    Evaluation and prediction batch by a token budget, longest prompts first (`generation_batches`: at least
    `per_device_eval_batch_size` rows of the longest prompt, more rows of shorter ones up to `eval_batch_tokens`),
    and return every sample once, in the dataset's order, scoring exactly those rows: each row carries its sample
    index, so order and uniqueness hold by construction (`in_sample_order`), whatever order the batches ran in and
    whatever repeats filled a distributed run's last batches (Seq2SeqTrainer's plain `gather` would keep those).
    """

    def __init__(self, *args, method, gen_config, eval_predictions: Path | None = None,
                 eval_batch_tokens: int | None = EVAL_BATCH_TOKENS, data_inputs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # What each checkpoint records of the data its steps trained (DATA_ORDER_RECORD), for a resume to compare.
        self.data_inputs = data_inputs
        self.method = method  # the method's config (cfg.method); its module saves, loads, builds the optimizer
        self.gen_config = gen_config
        self.eval_batch_tokens = eval_batch_tokens
        # Where the last evaluation's outputs are written (rank 0), so what was scored can be read.
        self.eval_predictions = eval_predictions

    def evaluate(self, *args, **kwargs):
        # An evaluation inside training leaves the global RNGs where it found them: torch's DataLoader draws each
        # iterator's base seed from the global generator (_BaseDataLoaderIter.__init__), sampling generation draws
        # more, and the dropout of every later step draws from what is left. The uninterrupted run and its resume do
        # not evaluate at the same steps (the run extended past its max_steps evaluated there before saving the
        # checkpoint, per DefaultFlowCallback; a resume's eval_steps are its own), so with dropout (LoRA's, the
        # P-Tuning v2 prefix's) their steps drew other masks after the first evaluation one of them had alone.
        with global_rng_kept(self.args.device):
            return super().evaluate(*args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        return self._generation_dataloader(eval_dataset, "Evaluation")

    def get_test_dataloader(self, test_dataset):
        return self._generation_dataloader(test_dataset, "test")

    def _generation_dataloader(self, dataset, description: str) -> DataLoader:
        # The batch list has no batch_size: accelerate then hands its batches to the ranks round-robin as they are
        # and truncates nothing at the end (generation_batches makes each step's batches the same size).
        args = self.args
        batches = plan_generation(dataset, args.eval_batch_size, self.gen_config, self.eval_batch_tokens,
                                  self.accelerator.num_processes)
        loader = DataLoader(
            Indexed(dataset), batch_sampler=batches,
            collate_fn=self._get_collator_with_removed_columns(self.data_collator, description=description),
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor)
        return self.accelerator.prepare(loader)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        index = inputs.pop(SAMPLE_INDEX)
        # accelerate autocasts the wrapped model's forward, but a PEFT model's generate calls the base
        # model's forward, which would run the adapter outside the training precision.
        with torch.no_grad(), self.accelerator.autocast():
            # Finished rows leave the batch (glm_ft/train/generation.py); same ids as model.generate.
            generated = generate(model, inputs["input_ids"], inputs["attention_mask"], self.gen_config,
                                 synced_gpus=is_deepspeed_zero3_enabled())
        # The index rides with the labels through padding, gathering and concatenation.
        return None, generated, (index, labels)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # Scored below, once the rows are in the dataset's order and each sample is there once.
        compute, self.compute_metrics = self.compute_metrics, None
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            self.compute_metrics = compute
        index, labels = output.label_ids
        predictions, labels = in_sample_order(index, output.num_samples, output.predictions, labels)
        metrics = dict(output.metrics)
        # The Trainer adds how long it took to prepare a model it had not prepared yet: only a Trainer that has not
        # trained (resume=auto redoing the final evaluation or prediction) reports it, so a resumed run's metrics,
        # test_metrics.json and MLflow run would have a key the uninterrupted run's lack.
        metrics.pop(f"{metric_key_prefix}_model_preparation_time", None)
        if compute is not None:
            scores = compute(EvalPrediction(predictions=predictions, label_ids=labels))
            metrics.update(prefix_metrics(scores, metric_key_prefix))
        metrics[f"{metric_key_prefix}_samples"] = output.num_samples
        if metric_key_prefix == "eval" and self.eval_predictions is not None and dist.is_rank_zero():
            write_predictions(self.eval_predictions, self.processing_class, dataloader.dataset.dataset,
                              predictions, self.gen_config.eos_token_id,
                              {**metrics, "step": self.model_step}, metrics_name="eval_metrics.json")
        return EvalLoopOutput(predictions=predictions, label_ids=labels, metrics=metrics,
                              num_samples=output.num_samples)

    def _run_epoch(self, *args, **kwargs):
        # The epoch's order, set on the sampler itself: a resumed multi-process run wraps it in accelerate's
        # SkipBatchSampler > BatchSamplerShard > BatchSampler, and neither accelerate's set_epoch nor the Trainer's
        # reach that deep, so the resumed epoch would be drawn from `seed + 0` (the first epoch's order).
        sampler = getattr(self, "_epoch_sampler", None)
        if sampler is not None and "epoch" in kwargs:
            sampler.set_epoch(kwargs["epoch"])
        if self.state.global_step >= self.state.max_steps or self.stopped_early():
            # Resumed from the last step's checkpoint (killed while final/ was saved): nothing is left to train. The
            # Trainer would train one step past max_steps before it looked, and final/ would hold another model.
            # The same for a checkpoint saved at the evaluation that stopped the run early.
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The rate this step trains at, read before it: where DeepSpeed runs the optimizer of its config (ZeRO-3's),
        # its engine steps the scheduler inside backward, and the Trainer's reading after that logged the next step's.
        self._step_learning_rate = self.optimizer.param_groups[0]["lr"]
        return super().training_step(model, inputs, num_items_in_batch)

    def _get_learning_rate(self):
        rate = getattr(self, "_step_learning_rate", None)
        return super()._get_learning_rate() if rate is None else float(rate)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self._epoch_sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
            return self._epoch_sampler
        return sampler

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self.args.output_dir)
        folder = checkpoint_dir(run_dir, self.state.global_step)
        if dist.is_rank_zero():  # a folder saved over (a run resumed from an earlier step) is incomplete until marked
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        # transformers deletes older checkpoints at the end of this call, before Watchdog marks this one complete:
        # with save_total_limit=1 a kill in between left nothing to resume from. Watchdog rotates after the marker.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            with disk_full_named(folder, run_dir):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save and (folder / TRAINING_ARGS_JSON).is_file():
            write_text_atomic(folder / TRAINING_ARGS_JSON, self.args.to_json_string())  # with the limit restored
        if self.args.should_save and self.data_inputs is not None and folder.is_dir():
            write_json(folder / DATA_ORDER_RECORD, self.data_inputs)  # before Watchdog's marker, as all the rest
        if dist.is_multi_process():
            torch.distributed.barrier()  # every rank's files (RNG state, ZeRO shard) are on disk before the marker

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if not methods.get(self.method.name).save(self.accelerator.unwrap_model(self.model), output_dir):
            super()._save(output_dir, state_dict)
            Path(output_dir, TRAINING_ARGS_NAME).unlink(missing_ok=True)
        elif self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if self.args.should_save:
            write_text_atomic(Path(output_dir) / TRAINING_ARGS_JSON, self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        unwrapped = self.accelerator.unwrap_model(model or self.model)
        if not methods.get(self.method.name).load_for_resume(unwrapped, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _init_training_state(self, max_steps, *args, **kwargs):
        out = super()._init_training_state(max_steps, *args, **kwargs)
        # A resumed state comes with the checkpoint's logging, eval and save steps, which the Trainer then follows
        # (it only warns that they differ); this run's training_args are what finetune.yaml and MLflow record.
        self.state.compute_steps(self.args, max_steps)
        return out

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        with optimizer_state_fits(resume_from_checkpoint):  # under DeepSpeed its load_checkpoint loads it here
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with optimizer_state_fits(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
        # Under a DeepSpeed config that brings its own optimizer (ZeRO-3's), accelerate wraps the Trainer's schedule
        # (a LambdaLR, which DeepSpeed's engine steps and restored in load_checkpoint) in DeepSpeedSchedulerWrapper.
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        if checkpoint is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        # The scheduler's state also brings back the checkpoint's base rates: a resume with another
        # training_args.learning_rate (or LoRA+ ratio), which its finetune.yaml and MLflow's
        # glm_ft.resume_changed_params record, trains at this run's, group by group (LoRA+'s embedding group keeps its
        # absolute loraplus_lr_embedding). Set, not scaled: what the checkpoint restored, or didn't (final/ holds no
        # schedule), does not matter.
        scheduler.base_lrs = self._base_learning_rates(len(scheduler.optimizer.param_groups))
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"] = base
        # The optimizer's state brings back the rate the checkpoint's schedule had reached, but the schedule is this
        # run's (resume=auto with a larger max_steps or num_train_epochs stretches it): until the first
        # scheduler.step() the resumed step would train at the old rate, 0 at the end of a linear or cosine schedule.
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs

    def _base_learning_rates(self, groups: int) -> list[float]:
        """Each parameter group's base rate as this run's arguments build the optimizer: the method's own optimizer
        (LoRA+) says per group, the Trainer's gives every group training_args.learning_rate."""
        built = methods.get(self.method.name).create_optimizer(self.model, self.args, self.method)
        if built is None:
            return [self.args.learning_rate] * groups
        rates = [group["lr"] for group in built.param_groups]
        # DeepSpeed removes the groups without parameters from the optimizer it is given (LoRA+'s embedding and
        # no-decay groups, unless there are such adapters): the groups left are the built ones that hold parameters.
        held = [group["lr"] for group in built.param_groups if group["params"]]
        for candidate in (rates, held):
            if len(candidate) == groups:
                return candidate
        raise GlmFtError(f"resume: the optimizer has {groups} parameter groups, method={self.method.name} builds "
                         f"{len(rates)}; cannot tell each group's learning rate")

    def create_optimizer(self, model=None):
        if isinstance(self.optimizer, DummyOptim):  # the DeepSpeed config's own AdamW (ZeRO-3's), not built yet
            self.optimizer.params = decay_groups(self, self.model if model is None else model)
            return self.optimizer
        if self.optimizer is None:  # the method's own optimizer (LoRA+), else the Trainer's
            self.optimizer = methods.get(self.method.name).create_optimizer(self.model if model is None else model,
                                                                           self.args, self.method)
        return super().create_optimizer(model) if self.optimizer is None else self.optimizer


# What decides which rows each step trains: changed on resume, the resumed steps do not continue the checkpoint's order.
DATA_ORDER_ARGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "train_sampling_strategy", "seed",
                   "data_seed")
# The mixed-precision switches: changed on resume, the resumed steps compute in another precision than the saved ones.
PRECISION_ARGS = ("bf16", "fp16")


def changed_data_order(checkpoint: Path, args, data_inputs: dict | None = None) -> str | None:
    """What a resume changes of what each step trains, as one phrase: the data-order arguments against the
    checkpoint's training_args.json, and `data_inputs` (the data, lengths, packing, processes) against its
    DATA_ORDER_RECORD. What a checkpoint did not record is not compared."""
    changed = _changed_args(checkpoint, args, DATA_ORDER_ARGS) + changed_data_inputs(checkpoint, data_inputs or {})
    return ", ".join(changed) or None


def changed_precision(checkpoint: Path, args, data_inputs: dict | None = None) -> str | None:
    """What a resume changes of the precision each step computes in, as one phrase: the mixed-precision switches
    against training_args.json, the dtype the weights load in ("auto" resolved) against DATA_ORDER_RECORD."""
    changed = _changed_args(checkpoint, args, PRECISION_ARGS)
    return ", ".join(changed + changed_precision_inputs(checkpoint, data_inputs or {})) or None


def _changed_args(checkpoint: Path, args, keys: tuple[str, ...]) -> list[str]:
    try:
        saved = json.loads((Path(checkpoint) / TRAINING_ARGS_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    now = args.to_dict()
    return [f"training_args.{key} {shown_value(saved[key])} -> {shown_value(now[key])}" for key in keys
            if key in saved and key in now and saved[key] != now[key]]


class Watchdog(TrainerCallback):
    """Marks finished checkpoints complete, then deletes those past `save_total_limit`; stops on a NaN loss,
    naming the step; raises a Ctrl-C or SIGTERM that Python dropped (glm_ft.tracking.signals.raise_lost_stop)."""

    def on_step_end(self, args, state, control, **kwargs):
        raise_lost_stop()

    on_substep_end = on_prediction_step = on_evaluate = on_step_end

    def on_save(self, args, state, control, **kwargs):
        ckpt = checkpoint_dir(Path(args.output_dir), state.global_step)
        if ckpt.is_dir() and dist.is_rank_zero():
            mark_complete(ckpt, state.global_step)
            rotate_checkpoints(Path(args.output_dir), args.save_total_limit, keep=[ckpt, state.best_model_checkpoint])
        raise_lost_stop()  # after the marker: a stop dropped during the save keeps what it saved

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(
                f"training loss is {loss} at step {state.global_step}; stopped. Last complete checkpoint: "
                f"{last_complete_checkpoint(Path(args.output_dir)) or 'none'}. "
                "Try a lower training_args.learning_rate or training_args.max_grad_norm")

class TrackerCallback(TrainerCallback):
    """Every Trainer log (loss, learning_rate, eval_*, runtime, throughput) becomes MLflow metrics at
    step=state.global_step. Placed before Watchdog: a checkpoint is marked complete only once the points logged up
    to it reached the store (Tracker.settle), since a resume from it never logs them again."""

    def __init__(self, tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and dist.is_rank_zero():
            self.tracker.log_metrics(logs, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if dist.is_rank_zero():
            self.tracker.settle()


class PruningCallback(TrainerCallback):
    """Inside an Optuna sweep: reports `metric` to the job's trial (glm_ft.search.study.JobTrial) at every
    evaluation. When the pruner says stop, the trainer saves a checkpoint at that step and stops; all ranks follow
    rank 0's decision (one process reports)."""

    def __init__(self, job_trial, metric: str):
        self.job_trial, self.metric = job_trial, metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        prune = False
        if dist.is_rank_zero() and value is not None:
            prune = self.job_trial.report(float(value), state.global_step)
        prune = dist.broadcast_from_rank_zero(prune)
        if prune:
            self.job_trial.pruned_at = state.global_step
            log.info("trial %d pruned at step %d (%s=%s)", self.job_trial.number, state.global_step, self.metric,
                     value)
            control.should_save = True
            control.should_training_stop = True
