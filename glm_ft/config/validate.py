"""Semantic checks on a composed config: what types alone can't say. Runs before any model weights or data load.

Every error names the config key (and the allowed values or the conflicting key), so a bad sweep fails in a
second instead of after an hour on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import stat
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from glm_ft.config import hf_choices
from glm_ft.errors import ConfigError
from glm_ft import methods
from glm_ft.config.keys import did_you_mean, no_keys_message, unknown_key_message
from glm_ft.config.paths import SPLIT_KEYS, InputPaths, input_paths, resolve_path
from glm_ft.config.schema import DATA_CACHE, TINY_MODEL_DIR, TrainingArgs

TRAINING_ARGS_DEFAULTS = TrainingArgs()

SEED_LIMIT = 2**32  # numpy's seed range (transformers' set_seed seeds numpy too)
QUICKSTART_HINT = "or try the bundled tiny setup: python train.py experiment=quickstart"


def validate(cfg: DictConfig, *, check_paths: bool = True) -> InputPaths | None:
    """Raise ConfigError on the first problem found, naming the key. Returns the input paths, resolved once
    (with check_paths)."""
    _check_finite(_resolved(cfg))
    _check_unknown_keys(cfg)
    _check_method(cfg)
    # Before training_args' checks: their fp16 one asks for a GPU; this refusal holds on any machine.
    methods.check_training_dtype(cfg.model.torch_dtype, cfg.method.name, bf16=cfg.training_args.bf16,
                                 fp16=cfg.training_args.fp16, deepspeed=cfg.deepspeed is not None)
    _check_lengths(cfg)
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise ConfigError(f"seed: must be in [0, 2**32), got {cfg.seed}")
    _check_training_args(cfg.training_args)
    _check_best_model(cfg)
    _check_generation(cfg.training_args.generation_config)
    _check_tracking(cfg.tracking, reach=not cfg.dry_run)
    _check_optimized_metric(cfg)
    if cfg.deepspeed is not None:
        from glm_ft.config.ds_config import check_deepspeed, check_zero_keys

        check_deepspeed(cfg)
        check_zero_keys(cfg)
    _check_model(cfg.model)
    if not check_paths:
        return None
    where = input_paths(cfg)
    check_model_path(where, cfg.model)
    check_data_files(where, cfg.data)
    _check_resume(cfg)
    return where


def _check_unknown_keys(node: Any, prefix: str = "") -> None:
    # `+key=value` opens the struct flag, so keys added that way reach us: every dataclass node is checked here.
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        allowed = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in allowed:
                full = f"{prefix}{key}"
                if prefix == "method." and allowed == ["name"]:
                    raise ConfigError(no_keys_message(full, node.get("name")))
                raise ConfigError(unknown_key_message(full, allowed))
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_unknown_keys(child, f"{prefix}{key}.")


def _check_method(cfg: DictConfig) -> None:
    methods.get(cfg.method.name).validate(cfg.method, cfg)


MODEL_DTYPES = ("auto", *methods.DTYPE_NAMES)
ATTENTION = ("sdpa", "eager")


def _check_model(model: DictConfig) -> None:
    if model.torch_dtype not in MODEL_DTYPES:
        raise ConfigError(f"model.torch_dtype: '{model.torch_dtype}' is not one of {', '.join(MODEL_DTYPES)}")
    if model.attn_implementation not in ATTENTION:
        raise ConfigError(f"model.attn_implementation: '{model.attn_implementation}' is not one of "
                          f"{', '.join(ATTENTION)}")


def _check_lengths(cfg: DictConfig) -> None:
    # a prompt keeps at least [gMASK] sop and one token of its own (glm_ft.data.dataset)
    for key, least in (("max_input_length", 3), ("max_output_length", 1)):
        if cfg[key] < least:
            raise ConfigError(f"{key}: must be >= {least}, got {cfg[key]}")
    if cfg.eval_subset is not None and cfg.eval_subset <= 0:
        raise ConfigError(f"eval_subset: must be > 0 or null (all), got {cfg.eval_subset}")
    if cfg.eval_batch_tokens is not None and cfg.eval_batch_tokens <= 0:
        raise ConfigError(f"eval_batch_tokens: must be > 0 or null (batches of per_device_eval_batch_size rows), "
                          f"got {cfg.eval_batch_tokens}")
    longest = cfg.max_input_length + cfg.max_output_length + 1
    if cfg.data.pack_max_length is not None and cfg.data.pack_max_length < longest:
        raise ConfigError(f"data.pack_max_length: must be >= max_input_length + max_output_length + 1 = {longest} "
                          f"(the longest sample), or null for that; got {cfg.data.pack_max_length}")


def _check_set_by_glm_ft(args: DictConfig) -> None:
    """Documented training_args that glm-ft sets itself: another value would be ignored, or break evaluation."""
    if args.output_dir != TRAINING_ARGS_DEFAULTS.output_dir:
        raise ConfigError(f"training_args.output_dir: the run folder is Hydra's, where glm-ft writes the checkpoints; "
                          f"set hydra.run.dir={args.output_dir} instead")
    if args.deepspeed is not None:
        raise ConfigError("training_args.deepspeed: glm-ft sets it to the run's rendered ds_config.json; choose a "
                          "DeepSpeed config with deepspeed=zero2 or deepspeed=zero3 and change its keys with "
                          "deepspeed.KEY=VALUE")
    if args.remove_unused_columns:
        raise ConfigError("training_args.remove_unused_columns: must be false: glm-ft's batches carry what the model "
                          "does not take (the reference reply for generation, each sample's index)")
    if not args.predict_with_generate:
        raise ConfigError("training_args.predict_with_generate: must be true: glm-ft evaluates and predicts by "
                          "generating replies and scoring them (ROUGE, BLEU-4)")


def _resolved(cfg: DictConfig) -> dict:
    """The config with every interpolation resolved: a missing key or a cycle is named here, not in a traceback."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except RecursionError:
        raise ConfigError("an interpolation refers back to itself (a ${...} cycle); check the keys set to "
                          "${...} on the command line and in the chosen config files") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{key}: {reason}") from None


def _check_finite(node: Any, prefix: str = "") -> None:
    # NaN slips through every `<= 0` check (all comparisons with NaN are false), so it is refused everywhere.
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_finite(value, f"{prefix}{i}.")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix[:-1]}: must be a finite number, got {node}")


def _check_choice(key: str, value: str, choices: tuple[str, ...], source: str) -> None:
    if value in choices:
        return
    hint = did_you_mean(value, list(choices))
    hint = f"{hint} " if hint else ""
    shown = ", ".join(choices) if len(choices) <= 12 else f"{', '.join(choices[:8])}, ... ({len(choices)} in all)"
    raise ConfigError(f"training_args.{key}: '{value}' is not one of {source} ({hint}{shown})")


# transformers' schedulers that cannot run under glm-ft, refused here rather than where transformers fails on them.
_ON_EVAL_LOSS = ("steps the rate on eval_loss, which glm-ft's evaluation (generation, scored by ROUGE/BLEU) does not "
                 "compute: the first evaluation would fail")
UNRUNNABLE_SCHEDULERS = {"reduce_lr_on_plateau": _ON_EVAL_LOSS, "greedy": _ON_EVAL_LOSS}
# The min_lr schedulers take exactly one of these (their bodies raise otherwise, once the model has loaded).
_ONE_OF = ("min_lr", "min_lr_rate")
# Each argument means the same in every scheduler that takes it. transformers checks none of these ranges: outside
# them the rate rises instead of decaying (num_cycles < 0 with restarts, min_lr above the rate), turns negative
# (lr_end) or sits at 0 early (min_lr), or training fails (power < 0 after the last step, timescale 0 at once).
_RATIO = (lambda v, lr: 0 <= v <= 1, "in [0, 1]")
_KWARG_RANGES = {"num_cycles": (lambda v, lr: v > 0, "> 0"), "power": (lambda v, lr: v > 0, "> 0"),
                 "timescale": (lambda v, lr: v > 0, "> 0"), "lr_end": (lambda v, lr: v >= 0, ">= 0"),
                 "num_decay_steps": (lambda v, lr: v >= 0, ">= 0"), "num_stable_steps": (lambda v, lr: v >= 0, ">= 0"),
                 "min_lr": (lambda v, lr: 0 <= v <= lr, "in [0, training_args.learning_rate]"),
                 "min_lr_rate": _RATIO, "min_lr_ratio": _RATIO, "warmup_lr_rate": _RATIO}


def scheduler_choices() -> tuple[str, ...]:
    """The installed transformers' SchedulerType values that glm-ft runs: a rate from the step alone."""
    return tuple(name for name in hf_choices.enum_values("SchedulerType") if name not in UNRUNNABLE_SCHEDULERS)


def _check_scheduler_kwargs(args: DictConfig) -> None:
    """lr_scheduler_kwargs against the chosen scheduler's signature (read from transformers' source): a name it does
    not take failed with a TypeError once the model had loaded, or was ignored (constant, constant_with_warmup)."""
    key, name = "training_args.lr_scheduler_kwargs", args.lr_scheduler_type
    given = OmegaConf.to_container(args.lr_scheduler_kwargs, resolve=True)
    spec = hf_choices.scheduler_args(name)
    names = spec.names or ()  # None (**kwargs) only for the UNRUNNABLE_SCHEDULERS, refused before
    takes = f"it takes {', '.join(names)}" if names else "it takes none"
    for kwarg, value in given.items():
        if kwarg not in names:
            hint = did_you_mean(str(kwarg), list(names))
            hint = f"{hint} " if hint else ""
            raise ConfigError(f"{key}.{kwarg}: not an argument of lr_scheduler_type={name} ({hint}{takes})")
        if value is None and kwarg in spec.optional_none:
            continue
        if kwarg in spec.choices and value not in spec.choices[kwarg]:
            raise ConfigError(f"{key}.{kwarg}: '{value}' is not one of {', '.join(spec.choices[kwarg])}")
        if kwarg in spec.text and not isinstance(value, str):
            raise ConfigError(f"{key}.{kwarg}: must be a string, got {value!r}")
        if kwarg not in spec.text and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{key}.{kwarg}: must be a number, got {value!r}")
        in_range, allowed = _KWARG_RANGES.get(kwarg, (lambda v, lr: True, ""))
        if kwarg not in spec.text and not in_range(value, args.learning_rate):
            raise ConfigError(f"{key}.{kwarg}: must be {allowed}, got {value!r}")
    missing = [kwarg for kwarg in spec.required if given.get(kwarg) is None]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: lr_scheduler_type={name} needs it")
    if name == "polynomial" and given.get("lr_end") is not None and given["lr_end"] >= args.learning_rate:
        # get_polynomial_decay_schedule_with_warmup raises on it, once the model has loaded
        raise ConfigError(f"{key}.lr_end: must be below training_args.learning_rate ({args.learning_rate}), "
                          f"got {given['lr_end']}")
    if all(kwarg in names for kwarg in _ONE_OF) and sum(given.get(k) is not None for k in _ONE_OF) != 1:
        raise ConfigError(f"{key}: lr_scheduler_type={name} needs exactly one of min_lr (a learning rate) or "
                          "min_lr_rate (a fraction of training_args.learning_rate)")


def _check_training_args(args: DictConfig) -> None:
    # Choices are transformers' own enums, read from the installed transformers (glm_ft.config.hf_choices).
    strategies = hf_choices.enum_values("IntervalStrategy")
    for key in ("evaluation_strategy", "save_strategy", "logging_strategy"):
        _check_choice(key, args[key], strategies, "transformers' IntervalStrategy")
    reason = UNRUNNABLE_SCHEDULERS.get(args.lr_scheduler_type)
    if reason is not None:
        raise ConfigError(f"training_args.lr_scheduler_type: {args.lr_scheduler_type} {reason}; use one of "
                          f"{', '.join(scheduler_choices())}")
    _check_choice("lr_scheduler_type", args.lr_scheduler_type, scheduler_choices(), "transformers' SchedulerType")
    _check_scheduler_kwargs(args)
    _check_choice("optim", args.optim, hf_choices.enum_values("OptimizerNames"), "transformers' OptimizerNames")
    _check_choice("log_level", args.log_level, hf_choices.log_levels(), "transformers' log levels")
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps", "eval_steps", "learning_rate", "adam_epsilon"]
    for key in positive:
        if args[key] <= 0:
            raise ConfigError(f"training_args.{key}: must be > 0, got {args[key]}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise ConfigError(f"training_args.max_steps: must be > 0 (or -1 to use num_train_epochs), got {args.max_steps}")
    if args.max_steps == -1 and args.num_train_epochs <= 0:
        raise ConfigError(f"training_args.num_train_epochs: must be > 0 when max_steps is -1, "
                          f"got {args.num_train_epochs}")
    for key in ("dataloader_num_workers", "weight_decay"):
        if args[key] < 0:
            raise ConfigError(f"training_args.{key}: must be >= 0, got {args[key]}")
    if args.warmup_steps < 0:
        raise ConfigError(f"training_args.warmup_steps: must be >= 0 (a step count, or a fraction in [0, 1) of the "
                          f"training steps), got {args.warmup_steps}")
    if args.max_grad_norm < 0:
        # transformers skips clipping for any value <= 0, so a negative one would silently mean "no clipping".
        raise ConfigError(f"training_args.max_grad_norm: must be >= 0 (0 turns gradient clipping off), "
                          f"got {args.max_grad_norm}")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        # transformers keeps every checkpoint for any value <= 0, silently.
        raise ConfigError(f"training_args.save_total_limit: must be >= 1 (or null to keep every checkpoint), "
                          f"got {args.save_total_limit}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= args[key] < 1:
            raise ConfigError(f"training_args.{key}: must be in [0, 1), got {args[key]}")
    _check_set_by_glm_ft(args)
    if args.fp16 and args.bf16:
        raise ConfigError("training_args.fp16 and training_args.bf16 are both true: choose one")
    if args.fp16 and not cuda_available():
        raise ConfigError("training_args.fp16=true needs a CUDA GPU and none is available; "
                          "use training_args.bf16=true on CPU or drop fp16")


def _check_best_model(cfg: DictConfig) -> None:
    """load_best_model_at_end and early stopping: transformers refused their contradictions only once the model had
    loaded (TrainingArguments), its default metric (the loss) only at the first evaluation (a KeyError)."""
    from glm_ft.train.metrics import METRIC_NAMES, eval_metric_name

    args, key = cfg.training_args, "training_args.metric_for_best_model"
    evaluated = [f"eval_{metric}" for metric in METRIC_NAMES]
    name = args.metric_for_best_model
    if name is not None:
        full = eval_metric_name(name)
        if full == "eval_loss":
            raise ConfigError(f"{key}: {name} is not computed: glm-ft evaluates by generating replies and scoring "
                              f"them, with no loss; use one of {', '.join(evaluated)}")
        if full not in evaluated:
            hint = did_you_mean(full, evaluated, f"one of {', '.join(evaluated)}")
            raise ConfigError(f"{key}: '{name}' is not a metric glm-ft's evaluation reports ({hint})")
    patience = args.early_stopping_patience
    if patience is not None and patience < 1:
        raise ConfigError(f"training_args.early_stopping_patience: must be >= 1 (evaluations without improvement "
                          f"before stopping), or null for no early stopping; got {patience}")
    if args.early_stopping_threshold < 0:
        raise ConfigError(f"training_args.early_stopping_threshold: must be >= 0, got {args.early_stopping_threshold}")
    wanted = [k for k, on in (("load_best_model_at_end", args.load_best_model_at_end),
                              ("early_stopping_patience", patience is not None)) if on]
    if not wanted:
        return
    need = f"training_args.{wanted[0]}: needs evaluations during training"
    if cfg.data.val_file is None:
        raise ConfigError(f"{need}, and data.val_file is null (no evaluation set)")
    if args.evaluation_strategy == "no":
        raise ConfigError(f"{need}, and training_args.evaluation_strategy is no")
    if not args.load_best_model_at_end:
        return
    if args.save_strategy != args.evaluation_strategy:
        raise ConfigError(f"training_args.save_strategy: must match training_args.evaluation_strategy "
                          f"({args.save_strategy} vs {args.evaluation_strategy}) with load_best_model_at_end: the "
                          "best model is chosen among checkpoints saved where it was evaluated")
    if args.save_strategy == "steps" and args.save_steps % args.eval_steps:
        raise ConfigError(f"training_args.save_steps: must be a multiple of training_args.eval_steps "
                          f"({args.save_steps} vs {args.eval_steps}) with load_best_model_at_end: every checkpoint "
                          "must be evaluated for the best one to be known")


# What transformers' generate() refuses (its logits processors raise on these; num_beams=0 divides by zero at the
# first evaluation): tests/config/test_hf_choices.py generates with transformers under each boundary value.
def _check_generation(gen: DictConfig) -> None:
    key = "training_args.generation_config"
    if gen.max_new_tokens <= 0:
        raise ConfigError(f"{key}.max_new_tokens: must be > 0, got {gen.max_new_tokens}")
    if gen.num_beams < 1:
        raise ConfigError(f"{key}.num_beams: must be >= 1 (1 = no beam search), got {gen.num_beams}")
    if gen.repetition_penalty is not None and gen.repetition_penalty <= 0:
        raise ConfigError(f"{key}.repetition_penalty: must be > 0 (1 = none), got {gen.repetition_penalty}")
    if gen.do_sample:
        if gen.temperature is not None and gen.temperature <= 0:
            raise ConfigError(f"{key}.temperature: must be > 0 with do_sample=true, got {gen.temperature}")
        if gen.top_p is not None and not 0 <= gen.top_p <= 1:
            raise ConfigError(f"{key}.top_p: must be in [0, 1] with do_sample=true, got {gen.top_p}")


def _check_optimized_metric(cfg: DictConfig) -> None:
    """A study optimises what the run reports: a misspelt name would only fail after the whole training."""
    check_optimized_metric(cfg.optimized_metric, cfg.data)


def check_optimized_metric(name: Any, data: Any) -> None:
    """`name` one of the metrics a run reports, whose split `data` (a mapping of data.* keys; a key it lacks is
    not judged) does not set to null. Also the command line's check (glm_ft.config.preflight), before a sweep."""
    from glm_ft.train.metrics import METRIC_NAMES

    if name is None:
        return
    reported = [f"{split}_{metric}" for split in ("eval", "test") for metric in METRIC_NAMES]
    if name not in reported:
        hint = did_you_mean(str(name), reported, f"one of {', '.join(reported)}")
        raise ConfigError(f"optimized_metric: '{name}' is not a metric a run reports ({hint})")
    split_key = "val_file" if name.startswith("eval_") else "test_file"
    if split_key in data and data[split_key] is None:
        raise ConfigError(f"optimized_metric: {name} needs data.{split_key}, which is null")


def _check_tracking(tracking: DictConfig, reach: bool) -> None:
    """The store is judged with the config: a bad URI fails here in one line rather than in MLflow's traceback
    after the model loaded. `reach`: contact it too (a server's health, an SQLite store's folder), for a real run."""
    if tracking.run_name is not None and not str(tracking.run_name).strip():
        raise ConfigError("tracking.run_name: must not be empty; leave it null for MLflow's own name")
    if not tracking.enabled:
        return
    if not str(tracking.experiment_name).strip():
        raise ConfigError("tracking.experiment_name: must not be empty (the MLflow experiment to log into, "
                          "default glm-ft)")
    from glm_ft.tracking.store import check_reachable, check_uri, tracking_uri

    uri, source = tracking_uri(tracking)
    check_uri(uri, source)
    if reach:
        check_reachable(uri, source)


def cuda_available() -> bool:
    # Only asked when fp16 is requested, so the common path never pays for importing torch.
    import torch

    return torch.cuda.is_available()


def check_model_path(where: InputPaths, model: DictConfig) -> None:
    path = where.model_dir
    if where.builds_tiny_model:
        return
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        tiny = (f" (the tiny model is built only at its own location, {TINY_MODEL_DIR}: leave model.path unset "
                "to use it)") if model.build_if_missing else ""
        raise ConfigError(
            f"model.path: '{path}' {what}{tiny}. Point it at a local chatglm3-6b checkpoint folder "
            f"(config.json, tokenizer.model, weights), e.g. model.path=/models/chatglm3-6b, {QUICKSTART_HINT}")


def check_data_files(where: InputPaths, data: DictConfig) -> None:
    base = where.data_dir
    for split, path in where.data_files.items():
        key = SPLIT_KEYS[split]
        if path is not None and path.exists() and not path.is_file():
            # A FIFO would block the run forever on its first read; a directory is a wrong path.
            raise ConfigError(f"data.{key}: '{path}' is {_file_kind(path)}, not a data file; point data.{key} "
                              "at a .json or .jsonl file")
        if path is not None and not path.is_file():
            where = "data.data_dir does not exist" if not base.exists() else f"no such file (data.{key})"
            raise ConfigError(f"data: '{path}': {where}. Point data.data_dir=... at your data folder "
                              f"(or data.{key}=... at the file), {QUICKSTART_HINT}")
    if data.num_proc <= 0:
        raise ConfigError(f"data.num_proc: must be > 0, got {data.num_proc}")


def check_data_rows(where: InputPaths, data: DictConfig, *, log_skips: bool = True) -> None:
    """Read and check every row of the configured files: FILE:LINE errors come before any model loads. A file whose
    contents passed before is not read again (glm_ft/data/rows.py, `check_rows`), unless skips are to be logged."""
    from glm_ft.data.rows import check_rows  # not dataset.py, which brings numpy and pyarrow

    for path in where.data_files.values():
        if path is not None:
            check_rows(path, skip_bad_rows=data.skip_bad_rows, log_skips=log_skips, records=DATA_CACHE / "checked")


def _file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _check_resume(cfg: DictConfig) -> None:
    """resume=PATH: a complete checkpoint of this method, known before the model loads (glm_ft.runs reads it)."""
    from glm_ft.runs import is_run_folder, not_resumable

    resume = cfg.resume
    if resume in (None, "auto"):
        return
    path = resolve_path(resume)
    if not path.is_dir():
        raise ConfigError(f"resume: '{resume}' is not a checkpoint folder; use resume=auto with "
                          "hydra.run.dir=<run folder>, or resume=<run folder>/checkpoint-N")
    if is_run_folder(path) or any(path.glob("checkpoint-*")):
        raise ConfigError(f"resume: '{resume}' is a run folder, not one of its checkpoints; use resume=auto "
                          f"hydra.run.dir={resume}, or resume={resume}/checkpoint-N")
    problem = not_resumable(path, resume)
    if problem:
        raise ConfigError(problem)
    kind, method = methods.kind_of(path), methods.get(cfg.method.name)
    if kind is not None and kind != method.KIND:
        other = methods.by_kind(kind)
        raise ConfigError(f"resume: '{resume}' holds a checkpoint of method={other.NAME} ({other.DESCRIPTION}); "
                          f"this run is method={method.NAME}")
