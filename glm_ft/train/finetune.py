"""The training job: composed config → model + data → Seq2SeqTrainer (train, evaluate with generation, predict).

    python train.py experiment=quickstart                               # tiny model, sample data, CPU, minutes
    python train.py method=lora model.path=/models/chatglm3-6b data.data_dir=/data/AdvertiseGen
    torchrun --nproc_per_node 2 train.py method=sft deepspeed=zero3 ... # several GPUs (or CPU processes, gloo)

Checkpoints hold only what was trained (LoRA adapter, P-Tuning v2 prefix, freeze-tuned tensors, or the full model
for SFT; each method's module in glm_ft/methods/ saves and reloads its own), as safetensors. A checkpoint counts
once `glm_ft_complete` is written into it, so `resume=auto` never picks up one that a crash left half-written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import warnings
import weakref
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import GenerationConfig, set_seed

from glm_ft import dist, methods, stops
from glm_ft.config.paths import InputPaths, input_paths
from glm_ft.config.schema import DATA_CACHE
from glm_ft.data.dataset import load_datasets
from glm_ft.errors import CheckpointError, ConfigError
from glm_ft import heap
from glm_ft.model import (base_model_dir, load_model_for_training, load_tokenizer, parameter_counts,
                          refused_weights_errors, refused_weights_reason)
from glm_ft.runs import (CURVES_FILE, EVAL_PREDICTIONS, FINAL, FINAL_LOG, PREDICTIONS, checkpoint_step,
                         disown_later, final_record, finished_step, mark_complete, read_progress, record_progress,
                         reset_progress, resume_checkpoint, write_run_info)
from glm_ft.search import TRIAL_ENV, trial_tags
from glm_ft.tracking.curves import run_log_history, write_training_curves
from glm_ft.tracking.parent import hydra_config
from glm_ft.tracking.signals import interrupt_behind
from glm_ft.tracking.store import ui_hint
from glm_ft.tracking.tracker import closing_interrupted, settle_previous_run, start_run
from glm_ft.data.collate import Collator
from glm_ft.train.best_model import best_model_tags, early_stopping
from glm_ft.train.evaluation import generation_config, metrics_fn, stop_token_ids, write_predictions
from glm_ft.train.disk_full import disk_full_named, resume_point
from glm_ft.train.trainer import (GlmTrainer, PruningCallback, TrackerCallback, Watchdog, changed_data_order,
                                  changed_precision)
from glm_ft.train.trainer_args import build_training_arguments

log = logging.getLogger("glm_ft")


def generation_config_for(cfg: DictConfig, tokenizer) -> GenerationConfig:
    """Evaluation's generation settings: training_args.generation_config."""
    return generation_config(tokenizer, **OmegaConf.to_container(cfg.training_args.generation_config))


def finetune(cfg: DictConfig, run_dir: Path, paths: dict[str, Path],
             where: InputPaths | None = None) -> dict[str, float]:
    """Train, evaluate and predict; returns the final eval_* and test_* metrics. `where`: the input paths as cli
    resolved them (resolved here when not given)."""
    # DeepSpeed calls these on every step; the deprecation is torch's business with DeepSpeed, not the user's.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)")

    done = completed_run(cfg, run_dir)
    if done is not None:
        log.info("resume=auto: %s is complete (trained, evaluated and predicted); nothing to train", run_dir)
        if not closing_interrupted(cfg, run_dir):
            settle_previous_run(cfg, run_dir)
            return done
        # Killed or stopped after its last stage, while its MLflow run was being closed (run files uploaded, status
        # set): continue that run and close it as the uninterrupted job did, FINISHED with its run files.
        log.info("resume=auto: the MLflow run of %s was not closed; closing it", run_dir)
        stops.reached(stops.CLOSING)
        with start_run(cfg, run_dir, tags=trial_tags()):
            return done
    dist.keep_collectives_on_loopback()
    if cfg.deepspeed is not None:
        dist.setup_single_process_group()
    try:
        with start_run(cfg, run_dir, tags=trial_tags()) as tracker, _disk_full_named(cfg, run_dir):
            return _train(cfg, run_dir, paths, where or input_paths(cfg), tracker)
    finally:
        dist.destroy_process_group()


def _train(cfg: DictConfig, run_dir: Path, paths: dict[str, Path], where: InputPaths, tracker) -> dict[str, float]:
    set_seed(cfg.seed)
    # Data before weights: the data is tokenized (and cached) with the tokenizer alone, so a problem with it
    # shows before the model loads (seconds here, minutes for 6B).
    model_dir = base_model_dir(where)
    tokenizer = load_tokenizer(model_dir)
    data_config = OmegaConf.to_container(cfg.data, resolve=True)
    data_config["data_dir"] = str(where.data_dir)
    data = load_datasets(data_config, tokenizer, cfg.max_input_length, cfg.max_output_length,
                         cache_dir=DATA_CACHE, skip_bad_rows=cfg.data.skip_bad_rows, eval_subset=cfg.eval_subset)
    collator = Collator(tokenizer.pad_token_id)
    budget = None
    if cfg.data.packing and data.train is not None:
        from glm_ft.data.packing import PackedCollator, pack_dataset, pack_max_length, packing_stats

        samples = len(data.train)
        budget = pack_max_length(cfg.data, cfg.max_input_length, cfg.max_output_length)
        data.train = pack_dataset(data.train, budget)
        data.stats.update(packing_stats(samples, data.train, budget))
        log.info("packing: %d training samples in %d rows", samples, len(data.train))
        collator = PackedCollator(tokenizer.pad_token_id)
    # Counts describe the run, they are not curves: tags keep them off MLflow's metric columns and charts.
    tracker.set_tags(data.stats)
    has_eval = data.val is not None and len(data.val) > 0
    if not has_eval:
        _check_needs_no_eval(cfg)
        log.warning("no validation samples: evaluation during training is skipped")
    stop_ids = stop_token_ids(tokenizer)
    gen_config = generation_config_for(cfg, tokenizer)

    model = load_model_for_training(cfg, model_dir)
    counts = parameter_counts(model)
    log.info("method=%s: %s trainable of %s parameters", cfg.method.name,
             f"{counts['model.trainable_parameters']:,}", f"{counts['model.total_parameters']:,}")
    tracker.set_tags(counts)
    tracker.set_tags({"glm_ft.base_model": str(model_dir)})
    _write_run_info(run_dir, cfg, model_dir)

    args = build_training_arguments(cfg, run_dir, paths.get("ds_config"), has_eval=has_eval,
                                    generation_config=gen_config)
    # in this order: see TrackerCallback
    callbacks = [TrackerCallback(tracker), Watchdog(), *early_stopping(cfg.training_args)]
    job_trial = _search_trial(cfg, tracker, has_eval, callbacks)
    trainer = GlmTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.val if has_eval else None,
        data_collator=collator, processing_class=tokenizer,
        compute_metrics=metrics_fn(tokenizer, stop_ids), method=cfg.method, gen_config=gen_config,
        eval_predictions=run_dir / EVAL_PREDICTIONS, eval_batch_tokens=cfg.eval_batch_tokens, callbacks=callbacks,
        data_inputs=_data_inputs(cfg, where, data.digests.get("train"), budget, args.world_size),
    )
    heap.freeze()  # start-up is done: what exists now lives until the job ends, no collection need walk it again

    trained_step = finished_training_step(cfg, run_dir)
    if trained_step is not None:
        # resume=auto after the training itself finished (a kill during the final evaluation or prediction):
        # the trained weights are final/, and only the missing stages are redone.
        log.info("resume=auto: training finished at step %d (%s); redoing only what is missing", trained_step,
                 run_dir / FINAL)
        trainer._load_from_checkpoint(str(run_dir / FINAL))
        _restore_final_state(trainer, run_dir, trained_step)
    else:
        _train_and_save(cfg, run_dir, trainer, tracker, job_trial)
    progress = read_progress(run_dir) if trained_step is not None else {}

    final: dict[str, float] = {}
    if has_eval:
        stops.reached(stops.FINAL_EVALUATION)
        # A redo (resume=auto after final/ was saved) did not train: what training evaluated is in the checkpoints.
        history = run_log_history(trainer.state.log_history, run_dir, trained=trained_step is None)
        last = next((h for h in reversed(history) if "eval_rouge-l" in h), None)
        # final/ may hold an earlier checkpoint's model (load_best_model_at_end): then it is evaluated again below
        if "evaluated" in progress:
            final.update(progress["evaluated"])
        elif last is not None and last["step"] == trainer.state.global_step == trainer.model_step:
            final.update({k: v for k, v in last.items() if k.startswith("eval_")})  # evaluated at the last step
        else:
            logged = len(trainer.state.log_history)
            final.update(trainer.evaluate())
            if trainer.model_step != trainer.state.global_step:
                # Step K's model again, which the training's curve has at K: no point at the last step there (a redo's
                # replaced that step's own evaluation). MLflow keeps it at the last step, so that the run's latest
                # values are final/'s; eval_metrics.json and the tag glm_ft.final_model_step say K.
                del trainer.state.log_history[logged:]
            tracker.log_metrics(final, step=trainer.state.global_step)
        if dist.is_rank_zero():
            tracker.settle()  # a resume skips a recorded stage: its points must be in the store first
            record_progress(run_dir, evaluated=final)
    if data.test is not None and len(data.test) > 0:
        stops.reached(stops.TEST_PREDICTION)
        if "predicted" in progress and (run_dir / PREDICTIONS).is_file():
            final.update(progress["predicted"])
        else:
            out = trainer.predict(data.test, metric_key_prefix="test")
            final.update(out.metrics)
            tracker.log_metrics(out.metrics, step=trainer.state.global_step)
            if dist.is_rank_zero():
                n = write_predictions(run_dir / PREDICTIONS, tokenizer, data.test, out.predictions,
                                      stop_ids, out.metrics)
                tracker.settle()
                record_progress(run_dir, predicted=out.metrics)
                log.info("test: %d predictions → %s; %s", n, run_dir / PREDICTIONS,
                         ", ".join(f"{k}={v:.4g}" for k, v in out.metrics.items() if "rouge" in k or "bleu" in k))
    stops.reached(stops.CLOSING)  # the curves, the run's records, and closing its MLflow run (uploading its files)
    heap.release_freed()  # what training freed, before the closing work would add to the job's peak
    if dist.is_rank_zero():
        _write_curves(cfg, run_dir, trainer.state.log_history, trained=trained_step is None)
        record_progress(run_dir, complete=True, step=trainer.state.global_step, metrics=final)
    if dist.is_rank_zero():  # one closing line per job, not per process
        log.info("run folder: %s", run_dir)
    if dist.is_rank_zero() and cfg.tracking.enabled:
        shown = tracker.store.shown_uri  # never a password in the log
        log.info("MLflow: experiment '%s' in %s; %s", cfg.tracking.experiment_name, shown, ui_hint(shown))
    return final


@contextlib.contextmanager
def _disk_full_named(cfg: DictConfig, run_dir: Path):
    """A full disk outside a checkpoint's or final/'s own save (which disk_full_named words): while an evaluation's
    or the test prediction's files or the run's records are written. One line, saying what resume=auto does next."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = err.filename or run_dir
        if finished_step(run_dir, int(cfg.training_args.get("max_steps", -1) or -1),
                         float(cfg.training_args.num_train_epochs)) is not None:
            raise CheckpointError(f"No space left on device while writing into {where}; the trained model, "
                                  f"{run_dir / FINAL}, is saved: free space, then resume=auto hydra.run.dir={run_dir} "
                                  "redoes only the evaluation or prediction that is missing") from err
        raise CheckpointError(f"No space left on device while writing into {where}; {resume_point(run_dir)}") from err


def _write_curves(cfg: DictConfig, run_dir: Path, log_history: list[dict], trained: bool) -> None:
    title = f"{cfg.method.name} on {cfg.model.name}: {run_dir.name}"
    try:
        write_training_curves(run_log_history(log_history, run_dir, trained), run_dir / CURVES_FILE, title)
    except Exception as err:  # a picture must not turn a finished training into a failed one
        log.warning("could not write %s: %s", run_dir / CURVES_FILE, err)


def _train_and_save(cfg: DictConfig, run_dir: Path, trainer, tracker, job_trial) -> None:
    resume_from = resume_checkpoint(cfg.resume, run_dir)
    # From here on the folder changes (stale stages and other trainings' checkpoints go): a stop says what it keeps.
    # A weak reference: a trainer kept alive to the interpreter's exit has its progress bars fail in their __del__.
    training = weakref.ref(trainer)
    stops.training(lambda: training().state.global_step if training() is not None else None,
                   resumed_from=checkpoint_step(Path(resume_from)) if resume_from else None)
    if dist.is_rank_zero():
        reset_progress(run_dir)
        # A checkpoint of another folder shares no history with this one's: all of this folder's are another's.
        own = resume_from is not None and Path(resume_from).resolve().parent == run_dir.resolve()
        start = checkpoint_step(Path(resume_from)) if own else 0
        stale = disown_later(run_dir, start)
        if stale:
            log.warning("%s held %s of another training (past step %d): they no longer count as complete; this "
                        "training saves over them", run_dir, ", ".join(p.name for p in stale), start)
    if resume_from:
        if dist.is_rank_zero():
            log.info("resuming from %s", resume_from)
            changed = changed_data_order(Path(resume_from), trainer.args, trainer.data_inputs)
            if changed:
                log.warning("resume: %s since %s: the resumed steps do not continue its data order (an "
                            "uninterrupted run would train other batches)", changed, resume_from)
            # Allowed, as the Trainer allows it (another GPU may have bf16, or memory may need it), and said: the
            # checkpoint's weights and AdamW states are cast to this run's dtypes as they load, without a word.
            changed = changed_precision(Path(resume_from), trainer.args, trainer.data_inputs)
            if changed:
                log.warning("resume: %s since %s: the resumed steps compute in another precision than its steps (the "
                            "weights and optimizer states it saved load cast to this run's dtypes; an uninterrupted "
                            "run would compute other losses)", changed, resume_from)
        tracker.set_tags({"glm_ft.resumed_from": resume_from})
    if resume_from and job_trial is not None and job_trial.pruned_by(checkpoint_step(Path(resume_from))):
        # A trial its pruner stopped, killed with its sweep after saving the checkpoint at that step and before the
        # study was told: pruned again here, not trained on past where the pruner stopped it.
        _pruned(cfg, run_dir, tracker, job_trial, None)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except BaseException as err:
        # A stop (Ctrl-C, SIGTERM, also when a library's cleanup failed on it) is worded by the CLI (glm_ft.stops).
        if resume_from and interrupt_behind(err) is None and isinstance(err, refused_weights_errors()):
            # The checkpoint's own files (weights, optimizer.pt, rng_state.pth): refused in one line, never run.
            raise CheckpointError(f"resume: {resume_from}: {refused_weights_reason(err)}") from None
        raise
    tracker.log_metrics({k: v for k, v in result.metrics.items() if k.startswith("train")}, trainer.state.global_step)
    if job_trial is not None and job_trial.pruned_at is not None:
        _pruned(cfg, run_dir, tracker, job_trial, trainer.state.log_history)
    # The final model is for inference: keep the KV cache on in its config (training turned it off).
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
    with disk_full_named(run_dir / FINAL, run_dir):
        trainer.save_model(str(run_dir / FINAL))
        if dist.is_rank_zero():
            # The whole training's log beside its model: a redo reads it there (a run with save_strategy=no has no
            # checkpoint-N/trainer_state.json to read it from).
            trainer.state.save_to_json(str(run_dir / FINAL / FINAL_LOG))
    if dist.is_rank_zero():
        # A resume from final/ logs nothing of the training again (train_loss, runtime...): they must be in the store
        # before final/ counts, as a checkpoint's points are before it does (TrackerCallback).
        tracker.settle()
        # the epochs trained (fractional when max_steps ended it): a later resume=auto with more trains on
        facts = trainer.final_model_facts()
        mark_complete(run_dir / FINAL, trainer.state.global_step, epoch=trainer.state.epoch,
                      num_input_tokens_seen=trainer.state.num_input_tokens_seen, **facts)
        tracker.set_tags({"glm_ft.final_model": str(run_dir / FINAL),
                          **best_model_tags(trainer.state, trainer.args, facts)})


def _check_needs_no_eval(cfg: DictConfig) -> None:
    """A validation file that holds no evaluation sample (all skipped, or no assistant turn that carries loss):
    what needs evaluations is refused before the model loads (validate.py refuses data.val_file=null)."""
    for key in ("load_best_model_at_end", "early_stopping_patience"):
        if cfg.training_args[key] not in (None, False):
            raise ConfigError(f"training_args.{key}: needs evaluations during training, and {cfg.data.val_file} "
                              "holds no validation sample")


def _data_inputs(cfg: DictConfig, where: InputPaths, train_sha256: str | None, pack_budget: int | None,
                 world_size: int) -> dict:
    """What decides each step's rows besides the Trainer's arguments, as each checkpoint records it
    (glm_ft.runs.DATA_ORDER_RECORD): the training file's contents (the digest the dataset cache already took), the
    lengths every sample is cut to, packing and its budget, and how many processes share each step's batches; and
    the dtype the weights load in (model.torch_dtype's "auto" resolved: it follows training_args.bf16 for LoRA)."""
    train_file = where.data_files.get("train")
    args = cfg.training_args
    dtype = methods.torch_dtype(cfg.model.torch_dtype, method=cfg.method.name, bf16=args.bf16, fp16=args.fp16)
    return {"model.torch_dtype": str(dtype).removeprefix("torch."),
            "data.train_file": str(train_file) if train_file else None, "data.train_sha256": train_sha256,
            "max_input_length": cfg.max_input_length, "max_output_length": cfg.max_output_length,
            "data.packing": bool(cfg.data.packing), "data.pack_max_length": pack_budget, "world_size": world_size}


def _pruned(cfg: DictConfig, run_dir: Path, tracker, job_trial, log_history: list[dict] | None) -> None:
    """Stopped by the study's pruner: the checkpoint at that step is saved; no final model, no test predictions.
    `log_history` None: nothing trained in this process (the checkpoint's log is the training's)."""
    from glm_ft.search.study import PRUNED_TAG, TrialPruned

    if dist.is_rank_zero():
        _write_curves(cfg, run_dir, log_history or [], trained=log_history is not None)
    tracker.set_tags({PRUNED_TAG: "true", "glm_ft.pruned_at_step": str(job_trial.pruned_at)})
    raise TrialPruned(f"trial {job_trial.number} pruned at step {job_trial.pruned_at}")


def _restore_final_state(trainer, run_dir: Path, step: int) -> None:
    """The counters the Trainer adds to every log (epoch, num_input_tokens_seen) as training left them: a fresh
    state would log 0 for both at the final step, which MLflow then shows as the run's values."""
    record = final_record(run_dir)
    trainer.state.global_step = step
    # the step whose weights final/ holds: the best checkpoint's with load_best_model_at_end
    trainer.loaded_model_step = int(record.get("model_step", step))
    trainer.state.epoch = record.get("epoch", trainer.state.epoch)
    tokens = record.get("num_input_tokens_seen")
    if tokens is None:  # a final/ marked before the count was recorded: the checkpoint at that step has it
        state_file = run_dir / f"checkpoint-{step}" / "trainer_state.json"
        if state_file.is_file():
            tokens = json.loads(state_file.read_text(encoding="utf-8")).get("num_input_tokens_seen")
    if tokens is not None:
        trainer.state.num_input_tokens_seen = tokens


def finished_training_step(cfg: DictConfig, run_dir: Path) -> int | None:
    """With resume=auto: the step training finished at, if final/ holds the model of the whole training."""
    if cfg.resume != "auto":
        return None
    return finished_step(run_dir, int(cfg.training_args.get("max_steps", -1) or -1),
                         float(cfg.training_args.num_train_epochs))


def completed_run(cfg: DictConfig, run_dir: Path) -> dict[str, float] | None:
    """resume=auto on a run whose every stage is done: its final metrics (nothing is to be redone)."""
    progress = read_progress(run_dir)
    step = finished_training_step(cfg, run_dir)
    if step is None or not progress.get("complete") or progress.get("step") != step:
        return None
    return dict(progress.get("metrics") or {})


def _search_trial(cfg: DictConfig, tracker, has_eval: bool, callbacks: list):
    """Inside an Optuna sweep (hydra/sweeper=optuna): this job's trial (its run was created with its tags,
    `trial_tags`), and a callback reporting `optimized_metric` at every evaluation so the study's pruner can stop
    it."""
    if TRIAL_ENV not in os.environ:
        return None  # not in a study: Optuna is not even imported
    from glm_ft.search.study import JobTrial, pruner_from_hydra

    job_trial = JobTrial.from_env(pruner_from_hydra(hydra_config()))
    if has_eval and cfg.optimized_metric:
        callbacks.append(PruningCallback(job_trial, cfg.optimized_metric))
    return job_trial


def _write_run_info(run_dir: Path, cfg: DictConfig, model_dir: Path) -> None:
    """What chat/export/predict need to reopen this run: the base model, the method, and the lengths and generation
    settings its evaluation used (so `predict` generates what the run's own test prediction did)."""
    if not dist.is_rank_zero():
        return
    info = {"base_model": str(model_dir), "method": OmegaConf.to_container(cfg.method, resolve=True),
            "max_input_length": cfg.max_input_length, "max_output_length": cfg.max_output_length,
            "skip_bad_rows": bool(cfg.data.skip_bad_rows),
            "generation_config": OmegaConf.to_container(cfg.training_args.generation_config, resolve=True)}
    write_run_info(run_dir, info)

