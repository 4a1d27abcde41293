"""The training job: composed config → model + data → Seq2SeqTrainer (train, evaluate with generation, predict).

    python train.py experiment=quickstart                               # tiny model, sample data, CPU, minutes
    python train.py method=lora model.path=/models/chatglm3-6b data.data_dir=/data/AdvertiseGen
    torchrun --nproc_per_node 2 train.py method=sft deepspeed=zero3 ... # several GPUs (or CPU processes, gloo)

Checkpoints hold only what was trained (LoRA adapter, P-Tuning v2 prefix, or the full model for SFT), as
safetensors. A checkpoint counts once `glm_ft_complete` is written into it, so `resume=auto` never picks up one
that a crash left half-written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from glm_ft.errors import CheckpointError, GlmFtError
from glm_ft.tracking.run_record import read_progress, record_progress, reset_progress
from glm_ft.config.schema import PROJECT_ROOT

log = logging.getLogger("glm_ft")

COMPLETE_MARKER = "glm_ft_complete"
DATA_CACHE = PROJECT_ROOT / ".cache" / "datasets"


class TrainingDiverged(GlmFtError):
    """The loss became NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with where to continue from."""


def setup_single_process_distributed(cfg: DictConfig) -> None:
    """DeepSpeed wants a process group even for one process; without a launcher it tries MPI and fails.

    The group is created here on an in-memory store: the env:// rendezvous would start a TCPStore server, which
    listens on every interface whatever MASTER_ADDR says. The variables stay set for the code that reads them."""
    if cfg.deepspeed is None or "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    keep_collectives_on_loopback()
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        dist.init_process_group(get_accelerator().communication_backend_name(), store=dist.HashStore(), rank=0,
                                world_size=1)


def keep_collectives_on_loopback() -> None:
    """gloo and NCCL listen on the interface of the machine's hostname unless told otherwise; a job whose ranks
    are all on this machine (one process, or torchrun/deepspeed on one node) needs nothing beyond loopback."""
    from glm_ft.launch import is_loopback

    world = os.environ.get("WORLD_SIZE", "1")
    if int(world) <= 1 or os.environ.get("LOCAL_WORLD_SIZE") == world or \
            is_loopback(os.environ.get("MASTER_ADDR", "")):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def complete_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        if not found:
            log.warning("resume=auto: no complete checkpoint in %s, starting from scratch", run_dir)
            return None
        return str(found[-1])
    path = Path(resume).expanduser().resolve()
    if not (path / COMPLETE_MARKER).is_file() and not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"resume: '{path}' is not a complete glm-ft checkpoint (no trainer_state.json)")
    return str(path)


def _trainer_classes():
    """Built lazily: transformers and torch load only when training really starts."""
    import torch
    from transformers import Seq2SeqTrainer, TrainerCallback
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.trainer_utils import EvalLoopOutput, EvalPrediction

    from glm_ft.train.evaluation import SAMPLE_INDEX, Indexed, in_sample_order, write_predictions
    from glm_ft.train.generation import generate
    from glm_ft.train.metrics import prefix_metrics

    class GlmTrainer(Seq2SeqTrainer):
        """Generation-based evaluation for a decoder-only model, and method-aware checkpoints.

        Evaluation and prediction return every sample once, in the dataset's order, and score exactly those
        rows. transformers 5.24 would not: under `train_sampling_strategy="group_by_length"` its eval sampler is a
        seeded LengthGroupedSampler (outputs come back shuffled), and with several processes the last batches are
        padded with repeated samples that Seq2SeqTrainer's plain `gather` keeps. Here the sampler is sequential
        and each row carries its sample index, so order and uniqueness hold by construction (`in_sample_order`).
        """

        def __init__(self, *args, method: str, gen_config, eval_predictions: Path | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.method = method
            self.gen_config = gen_config
            # Where the last evaluation's outputs are written (rank 0), so what was scored can be read.
            self.eval_predictions = eval_predictions

        def _get_eval_sampler(self, eval_dataset):
            from torch.utils.data import SequentialSampler

            return SequentialSampler(eval_dataset)

        def get_eval_dataloader(self, eval_dataset=None):
            if isinstance(eval_dataset, str):
                eval_dataset = self.eval_dataset[eval_dataset]
            eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            return super().get_eval_dataloader(Indexed(eval_dataset) if eval_dataset is not None else None)

        def get_test_dataloader(self, test_dataset):
            return super().get_test_dataloader(Indexed(test_dataset))

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
            if compute is not None:
                scores = compute(EvalPrediction(predictions=predictions, label_ids=labels))
                metrics.update(prefix_metrics(scores, metric_key_prefix))
            metrics[f"{metric_key_prefix}_samples"] = output.num_samples
            if metric_key_prefix == "eval" and self.eval_predictions is not None and self.is_world_process_zero():
                write_predictions(self.eval_predictions, self.processing_class, dataloader.dataset.dataset,
                                  predictions, self.gen_config.eos_token_id,
                                  {**metrics, "step": self.state.global_step}, metrics_name="eval_metrics.json")
            return EvalLoopOutput(predictions=predictions, label_ids=labels, metrics=metrics,
                                  num_samples=output.num_samples)

        def _save_checkpoint(self, model, trial):
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            with disk_full_named(folder, Path(self.args.output_dir)):
                return super()._save_checkpoint(model, trial)

        def _save(self, output_dir: str | None = None, state_dict=None):
            if self.method != "ptuning_v2":
                return super()._save(output_dir, state_dict)
            from glm_ft.chatglm3.prefix import save_prefix

            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            save_prefix(self.accelerator.unwrap_model(self.model), output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if self.method != "ptuning_v2":
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            from glm_ft.chatglm3.prefix import load_prefix

            load_prefix(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    class Watchdog(TrainerCallback):
        """Marks finished checkpoints and stops on a NaN loss, naming the step."""

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir() and state.is_world_process_zero:
                (ckpt / COMPLETE_MARKER).write_text(json.dumps({"step": state.global_step}) + "\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training loss is {loss} at step {state.global_step}; stopped. Last complete checkpoint: "
                    f"{(complete_checkpoints(Path(args.output_dir)) or ['none'])[-1]}. "
                    "Try a lower training_args.learning_rate or training_args.max_grad_norm")

    return GlmTrainer, Watchdog


@contextlib.contextmanager
def disk_full_named(folder: Path, run_dir: Path):
    """A full disk while writing `folder` becomes one line naming it. torch's zip writer reports ENOSPC as
    "inline_container.cc:...: unexpected pos" (no errno), so a RuntimeError counts as a full disk when the folder's
    filesystem has (almost) nothing left. The half-written folder has no completion marker: resume skips it."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not _is_disk_full(err, folder):
            raise
        last = (complete_checkpoints(run_dir) or [None])[-1]
        keep = (f"the last complete checkpoint, {last}, stays the resume point: free space, then continue with "
                f"resume=auto hydra.run.dir={run_dir}") if last else "there is no complete checkpoint yet"
        raise CheckpointError(f"No space left on device while saving {folder}; {keep}") from err


DISK_FULL_BELOW_BYTES = 16 << 20


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    import errno
    import shutil

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    probe = folder if folder.exists() else folder.parent
    try:
        return shutil.disk_usage(probe).free < DISK_FULL_BELOW_BYTES
    except OSError:
        return False


def generation_config_for(cfg: DictConfig, tokenizer, stop_ids: list[int]):
    from transformers import GenerationConfig

    gen = {k: v for k, v in OmegaConf.to_container(cfg.training_args.generation_config).items() if v is not None}
    return GenerationConfig(**gen, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)


def finetune(cfg: DictConfig, run_dir: Path, paths: dict[str, Path]) -> dict[str, float]:
    """Train, evaluate and predict; returns the final eval_* and test_* metrics."""
    import warnings

    from glm_ft.tracking.tracker import start_run

    # DeepSpeed calls these on every step; the deprecation is torch's business with DeepSpeed, not the user's.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)")

    done = completed_run(cfg, run_dir)
    if done is not None:
        log.info("resume=auto: %s is complete (trained, evaluated and predicted); nothing to train", run_dir)
        from glm_ft.tracking.tracker import settle_previous_run

        settle_previous_run(cfg, run_dir)
        return done
    keep_collectives_on_loopback()
    setup_single_process_distributed(cfg)
    try:
        with start_run(cfg, run_dir) as tracker:
            return _train(cfg, run_dir, paths, tracker)
    finally:
        destroy_process_group()


def destroy_process_group() -> None:
    """Tear the process group down while the interpreter is alive, on success and on failure alike.

    Left to interpreter shutdown, gloo's worker threads may still hold tensors when they are destroyed, which can
    abort a process whose run succeeded (SIGABRT); see also cli._exit_skipping_native_teardown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(cfg: DictConfig, run_dir: Path, paths: dict[str, Path], tracker) -> dict[str, float]:
    from transformers import set_seed

    from glm_ft.data.dataset import load_datasets
    from glm_ft.train.evaluation import Collator, metrics_fn, stop_token_ids, write_predictions
    from glm_ft.model import base_model_dir, load_model_for_training, load_tokenizer, parameter_counts
    from glm_ft.train.trainer_args import build_training_arguments
    from glm_ft.config.validate import resolve_path

    set_seed(cfg.seed)
    # Data before weights: the data is tokenized (and cached) with the tokenizer alone, so a problem with it
    # shows before the model loads (seconds here, minutes for 6B).
    model_dir = base_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    data_config = OmegaConf.to_container(cfg.data, resolve=True)
    data_config["data_dir"] = str(resolve_path(cfg.data.data_dir))
    data = load_datasets(data_config, tokenizer, cfg.max_input_length, cfg.max_output_length,
                         cache_dir=DATA_CACHE, skip_bad_rows=cfg.data.skip_bad_rows, eval_subset=cfg.eval_subset)
    collator = Collator(tokenizer.pad_token_id)
    if cfg.data.packing and data.train is not None:
        from glm_ft.data.packing import PackedCollator, pack_dataset, pack_max_length, packing_stats

        samples = len(data.train)
        data.train = pack_dataset(data.train, pack_max_length(cfg.data, cfg.max_input_length, cfg.max_output_length))
        data.stats.update(packing_stats(samples, data.train))
        log.info("packing: %d training samples in %d rows", samples, len(data.train))
        collator = PackedCollator(tokenizer.pad_token_id)
    # Counts describe the run, they are not curves: tags keep them off MLflow's metric columns and charts.
    tracker.set_tags(data.stats)
    if data.val is None or len(data.val) == 0:
        log.warning("no validation samples: evaluation during training is skipped")
    stop_ids = stop_token_ids(tokenizer)
    gen_config = generation_config_for(cfg, tokenizer, stop_ids)

    model = load_model_for_training(cfg, model_dir)
    counts = parameter_counts(model)
    log.info("method=%s: %s trainable of %s parameters", cfg.method.name,
             f"{counts['model.trainable_parameters']:,}", f"{counts['model.total_parameters']:,}")
    tracker.set_tags(counts)
    tracker.set_tags({"glm_ft.base_model": str(model_dir)})
    _write_run_info(run_dir, cfg, model_dir)

    has_eval = data.val is not None and len(data.val) > 0
    args = build_training_arguments(cfg, run_dir, paths.get("ds_config"), has_eval=has_eval,
                                    generation_config=gen_config)
    GlmTrainer, Watchdog = _trainer_classes()
    callbacks = [Watchdog(), tracker.trainer_callback()]
    job_trial = _search_trial(cfg, tracker, has_eval, callbacks)
    trainer = GlmTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.val if has_eval else None,
        data_collator=collator, processing_class=tokenizer,
        compute_metrics=metrics_fn(tokenizer, stop_ids), method=cfg.method.name, gen_config=gen_config,
        eval_predictions=run_dir / "eval_predictions.jsonl", callbacks=callbacks,
    )

    trained_step = finished_training_step(cfg, run_dir)
    if trained_step is not None:
        # resume=auto after the training itself finished (a kill during the final evaluation or prediction):
        # the trained weights are final/, and only the missing stages are redone.
        log.info("resume=auto: training finished at step %d (%s); redoing only what is missing", trained_step,
                 run_dir / "final")
        trainer._load_from_checkpoint(str(run_dir / "final"))
        trainer.state.global_step = trained_step
    else:
        _train_and_save(cfg, run_dir, trainer, tracker, job_trial)
    progress = read_progress(run_dir) if trained_step is not None else {}

    final: dict[str, float] = {}
    if has_eval:
        last = next((h for h in reversed(trainer.state.log_history) if "eval_rouge-l" in h), None)
        if "evaluated" in progress:
            final.update(progress["evaluated"])
        elif last is not None and last["step"] == trainer.state.global_step:
            final.update({k: v for k, v in last.items() if k.startswith("eval_")})  # evaluated at the last step
        else:
            final.update(trainer.evaluate())
            tracker.log_metrics(final, step=trainer.state.global_step)
        if is_main_process():
            record_progress(run_dir, evaluated=final)
    if data.test is not None and len(data.test) > 0:
        if "predicted" in progress and (run_dir / "predictions.jsonl").is_file():
            final.update(progress["predicted"])
        else:
            out = trainer.predict(data.test, metric_key_prefix="test")
            final.update(out.metrics)
            tracker.log_metrics(out.metrics, step=trainer.state.global_step)
            if is_main_process():
                n = write_predictions(run_dir / "predictions.jsonl", tokenizer, data.test, out.predictions,
                                      stop_ids, out.metrics)
                record_progress(run_dir, predicted=out.metrics)
                log.info("test: %d predictions → %s; %s", n, run_dir / "predictions.jsonl",
                         ", ".join(f"{k}={v:.4g}" for k, v in out.metrics.items() if "rouge" in k or "bleu" in k))
    if is_main_process():
        _write_curves(cfg, run_dir, trainer.state.log_history, trained=trained_step is None)
        record_progress(run_dir, complete=True, step=trainer.state.global_step, metrics=final)
    log.info("run folder: %s", run_dir)
    if is_main_process() and cfg.tracking.enabled:
        log.info("MLflow: run `make ui` and open http://127.0.0.1:5000 (experiment '%s')",
                 cfg.tracking.experiment_name)
    return final


def _write_curves(cfg: DictConfig, run_dir: Path, log_history: list[dict], trained: bool) -> None:
    from glm_ft.tracking.curves import CURVES_FILE, run_log_history, write_training_curves

    title = f"{cfg.method.name} on {cfg.model.name}: {run_dir.name}"
    try:
        write_training_curves(run_log_history(log_history, run_dir, trained), run_dir / CURVES_FILE, title)
    except Exception as err:  # a picture must not turn a finished training into a failed one
        log.warning("could not write %s: %s", run_dir / CURVES_FILE, err)


def _train_and_save(cfg: DictConfig, run_dir: Path, trainer, tracker, job_trial) -> None:
    from glm_ft.model import refused_weights_errors, refused_weights_reason

    if is_main_process():
        reset_progress(run_dir)
    resume_from = resume_checkpoint(cfg.resume, run_dir)
    if resume_from:
        log.info("resuming from %s", resume_from)
        tracker.set_tags({"glm_ft.resumed_from": resume_from})
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt as err:
        last = (complete_checkpoints(run_dir) or ["none"])[-1]
        raise Interrupted(f"at step {trainer.state.global_step}; last complete checkpoint: {last} (continue with "
                          f"resume=auto hydra.run.dir={run_dir})") from err
    except refused_weights_errors() as err:
        if not resume_from:
            raise
        # The checkpoint's own files (weights, optimizer.pt, rng_state.pth): refused in one line, never run.
        raise CheckpointError(f"resume: {resume_from}: {refused_weights_reason(err)}") from None
    tracker.log_metrics({k: v for k, v in result.metrics.items() if k.startswith("train")})
    if job_trial is not None and job_trial.pruned_at is not None:
        from glm_ft.search.study import PRUNED_TAG, TrialPruned

        # Stopped by the study's pruner: the checkpoint at that step is saved; no final model, no test predictions.
        if is_main_process():
            _write_curves(cfg, run_dir, trainer.state.log_history, trained=True)
        tracker.set_tags({PRUNED_TAG: "true", "glm_ft.pruned_at_step": str(job_trial.pruned_at)})
        raise TrialPruned(f"trial {job_trial.number} pruned at step {job_trial.pruned_at}")
    # The final model is for inference: keep the KV cache on in its config (training turned it off).
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
    with disk_full_named(run_dir / "final", run_dir):
        trainer.save_model(str(run_dir / "final"))
    if is_main_process():
        (run_dir / "final" / COMPLETE_MARKER).write_text(json.dumps({"step": trainer.state.global_step}) + "\n")
        tracker.set_tags({"glm_ft.final_model": str(run_dir / "final")})


def finished_training_step(cfg: DictConfig, run_dir: Path) -> int | None:
    """With resume=auto: the step training finished at, if final/ holds the model of the whole training."""
    marker = run_dir / "final" / COMPLETE_MARKER
    if cfg.resume != "auto" or not marker.is_file():
        return None
    try:
        step = int(json.loads(marker.read_text()).get("step", -1))
    except (OSError, ValueError, AttributeError):
        return None
    max_steps = int(cfg.training_args.get("max_steps", -1) or -1)
    # A larger max_steps than final/ was trained to means "train on": resume from the last checkpoint instead.
    return step if step >= 0 and (max_steps <= 0 or step >= max_steps) else None


def completed_run(cfg: DictConfig, run_dir: Path) -> dict[str, float] | None:
    """resume=auto on a run whose every stage is done: its final metrics (nothing is to be redone)."""
    progress = read_progress(run_dir)
    step = finished_training_step(cfg, run_dir)
    if step is None or not progress.get("complete") or progress.get("step") != step:
        return None
    return dict(progress.get("metrics") or {})


def _search_trial(cfg: DictConfig, tracker, has_eval: bool, callbacks: list):
    """Inside an Optuna sweep (hydra/sweeper=optuna): this job's trial, tagged on its run, and a callback reporting
    `optimized_metric` at every evaluation so the study's pruner can stop it."""
    from glm_ft.search.study import TRIAL_ENV

    if TRIAL_ENV not in os.environ:
        return None
    from glm_ft.search.study import JobTrial, pruner_from_hydra, pruning_callback
    from glm_ft.tracking.tracker import hydra_config

    job_trial = JobTrial.from_env(pruner_from_hydra(hydra_config()))
    tracker.set_tags(job_trial.tags())
    if has_eval and cfg.optimized_metric:
        callbacks.append(pruning_callback(job_trial, cfg.optimized_metric))
    return job_trial


def _write_run_info(run_dir: Path, cfg: DictConfig, model_dir: Path) -> None:
    """What chat/export need to reopen this run: the base model and the method."""
    if not is_main_process():
        return
    info = {"base_model": str(model_dir), "method": OmegaConf.to_container(cfg.method, resolve=True),
            "max_input_length": cfg.max_input_length, "max_output_length": cfg.max_output_length}
    (run_dir / "glm_ft_run.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")

