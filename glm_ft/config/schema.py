"""The config schema: dataclasses that Hydra composes into, so OmegaConf rejects unknown keys and wrong types.

The documented top-level keys of the reference demo's YAML (max_input_length, max_output_length, training_args)
stay top-level; the method, data, model and DeepSpeed groups are Hydra config groups. Semantic checks that types
can't express (ranges, contradictions) live in `glm_ft.config.validate`. This module must stay light: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from glm_ft.methods import METHODS, freeze, lora, ptuning_v2, sft

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Where model=tiny builds its random tiny ChatGLM3; no other missing model.path is ever built (conf/model/tiny.yaml).
TINY_MODEL_DIR = PROJECT_ROOT / ".cache" / "tiny-chatglm3"
# model=tiny_demo: the tiny model trained a little (glm_ft/train/demo_base.py), built the same way at its own place
DEMO_MODEL_DIR = PROJECT_ROOT / ".cache" / "tiny-chatglm3-demo"
# Preprocessed splits (glm_ft/data/dataset.py), and the records of data files already checked (glm_ft/data/rows.py)
DATA_CACHE = PROJECT_ROOT / ".cache" / "datasets"
# Tokens one evaluation/prediction batch may hold, rows x (longest prompt + max_new_tokens): 32768 is ~0.9 GB of
# bf16 KV cache at chatglm3-6b's shape, and lets a small model decode many short rows per step
# (glm_ft/train/evaluation.py).
EVAL_BATCH_TOKENS = 32768


# --- method group: one dataclass per method, each in its own module (glm_ft/methods/) ----------------------------

METHOD_SCHEMAS = {name: method.Schema for name, method in METHODS.items()}
# The schema's names as they were before the methods had modules of their own.
LoraMethod, PTuningV2Method, SftMethod, FreezeMethod = lora.Schema, ptuning_v2.Schema, sft.Schema, freeze.Schema


# --- data and model groups ------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = MISSING
    data_dir: str = MISSING
    train_file: str = MISSING
    val_file: Optional[str] = None
    test_file: Optional[str] = None
    num_proc: int = 16
    # Well-formed but unusable rows (unknown role, no assistant turn) are skipped and counted instead of failing.
    skip_bad_rows: bool = False
    # Several training samples per row (glm_ft/data/packing.py); the budget defaults to the longest possible sample.
    packing: bool = False
    pack_max_length: Optional[int] = None


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING
    # Build the tiny random ChatGLM3 when `path` is missing; only ever at TINY_MODEL_DIR (model=tiny).
    build_if_missing: bool = False
    torch_dtype: str = "auto"
    attn_implementation: str = "sdpa"


# --- training_args: the documented keys first, then the common Seq2SeqTrainingArguments switches ----------------


@dataclass
class GenerationArgs:
    max_new_tokens: int = 512
    do_sample: bool = False
    num_beams: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None


def _open_mapping() -> DictConfig:
    """An empty mapping whose keys the command line adds without `+` (training_args.lr_scheduler_kwargs.num_cycles=2):
    it has no keys of its own to misspell, and Hydra's struct flag would refuse every one."""
    return OmegaConf.create({}, flags={"struct": False})


@dataclass
class TrainingArgs:
    # Documented keys (finetune_configs_zh.md), with their documented defaults.
    output_dir: str = "./output"
    max_steps: int = 3000
    learning_rate: float = 5e-5
    per_device_train_batch_size: int = 4
    dataloader_num_workers: int = 16
    remove_unused_columns: bool = False
    save_strategy: str = "steps"
    save_steps: int = 500
    log_level: str = "info"
    logging_strategy: str = "steps"
    logging_steps: int = 10
    per_device_eval_batch_size: int = 16
    # Documented name; translated to transformers' `eval_strategy` at the Trainer boundary.
    evaluation_strategy: str = "steps"
    eval_steps: int = 500
    predict_with_generate: bool = True
    generation_config: GenerationArgs = field(default_factory=GenerationArgs)
    use_cpu: Optional[bool] = None
    # Set by glm-ft to the rendered ds_config.json when a deepspeed group is chosen.
    deepspeed: Optional[str] = None
    # Not in the documented YAML; rendered into finetune.yaml only when changed from these defaults.
    num_train_epochs: float = 3.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    # Batches of similar lengths: less padding, same expected result (bench/README.md: 1.1-1.5x tokens/s).
    # Translated to transformers' train_sampling_strategy="group_by_length"; false = random order.
    group_by_length: bool = True
    save_total_limit: Optional[int] = None
    # An int counts steps; a float in [0, 1) is a fraction of the training steps (transformers 5).
    warmup_steps: float = 0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    # The chosen scheduler's own arguments (min_lr_rate, num_cycles, num_decay_steps, ...), passed to transformers'
    # get_scheduler; validate.py checks them against that scheduler's signature.
    lr_scheduler_kwargs: Dict[str, Any] = field(default_factory=_open_mapping)
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # transformers' own default: one fused kernel for all weights instead of a kernel per tensor (5-10 % shorter
    # steps for full fine-tuning of the tiny model on CPU, same losses).
    optim: str = "adamw_torch_fused"
    logging_first_step: bool = False
    disable_tqdm: Optional[bool] = None
    dataloader_pin_memory: bool = True
    ddp_find_unused_parameters: Optional[bool] = None
    torch_compile: bool = False
    # Keep the best evaluated checkpoint as final/ (transformers' switches). metric_for_best_model null: eval_rouge-l
    # when load_best_model_at_end or early stopping is on (transformers' own default, loss, is never computed here);
    # greater_is_better null: derived from the metric's name, as transformers derives it.
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    # transformers' EarlyStoppingCallback: stop after this many evaluations without an improvement of
    # metric_for_best_model by more than early_stopping_threshold; null = off. Not TrainingArguments fields.
    early_stopping_patience: Optional[int] = None
    early_stopping_threshold: float = 0.0


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Absolute, so Hydra's run folder doesn't matter; MLFLOW_TRACKING_URI wins when set.
    tracking_uri: str = "sqlite:///${project_root:}/mlflow.db"
    # null: mlartifacts/ beside a SQLite store, the server's own choice for an http:// store.
    artifact_location: Optional[str] = None
    experiment_name: str = "glm-ft"
    run_name: Optional[str] = None
    # SFT checkpoints are gigabytes: logged as a path tag unless this is set.
    log_full_model: bool = False


@dataclass
class Config:
    method: Any = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    deepspeed: Optional[Dict[str, Any]] = None
    max_input_length: int = 256
    max_output_length: int = 512
    training_args: TrainingArgs = field(default_factory=TrainingArgs)
    seed: int = 42
    # Evaluate during training on the first N validation samples (the reference used 50); null = all.
    eval_subset: Optional[int] = 50
    # Evaluation and prediction batches: up to this many tokens, at least per_device_eval_batch_size rows of the
    # longest prompt; null = that floor only.
    eval_batch_tokens: Optional[int] = EVAL_BATCH_TOKENS
    dry_run: bool = False
    # null: start fresh; "auto": newest checkpoint of the run folder; otherwise a checkpoint path.
    resume: Optional[str] = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # The final metric train.py returns to an Optuna sweep (set by conf/hparams_search/*); the job fails if missing.
    optimized_metric: Optional[str] = None



def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore; conf/*.yaml name these as their first default."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, node in METHOD_SCHEMAS.items():
        cs.store(group="schema/method", name=name, node=node)
    cs.store(group="schema/data", name="data", node=DataConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)


register_configs()
