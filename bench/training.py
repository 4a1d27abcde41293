"""Training throughput, one side per process: glm-ft's training path or the reference demo's data path.

Both sides train one epoch over the same samples from the same weights, through the HF Trainer:
- baseline: the reference's data path: `DataCollatorForSeq2Seq(padding="longest")` batches in file order
  (`train_sampling_strategy="sequential"`), eager attention, a plain `Seq2SeqTrainer`;
- glm_ft: `glm_ft.model.load_for_training` (the configured attention, SDPA by default), `glm_ft.data`, the
  `Collator`, the Seq2SeqTrainingArguments that `glm_ft.train.trainer_args` builds and glm-ft's own trainer class,
  with glm-ft's configured sampler (random order unless `training_args.group_by_length=true`);
- glm_ft_grouped: the same with `training_args.group_by_length=true`;
- glm_ft_grouped_bf16: and `training_args.bf16=true` too (bf16 autocast; fp32 weights and optimizer, as
  `torch_dtype: auto` keeps them for full fine-tuning). A switch the reference's Trainer had as well, shown for
  what this CPU's bf16 matmuls give; its losses differ from the fp32 sides by bf16 rounding;
- glm_ft_packed: glm-ft's default path with `data.packing=true` (glm_ft/data/packing.py): the same samples, packed
  several to a row up to max_input_length + max_output_length + 1 tokens, so one epoch is fewer, fuller steps.

Same work is shown twice: the loss of the untrained model over the whole set, summed over every target token with
each side's own batching and attention (order and padding must not change it), and the token-weighted mean training
loss of the epoch. Tokens are the non-pad tokens of the timed steps; the first `warmup` steps are not timed.
MLflow tracking is left out on both sides (glm-ft logs to it every `logging_steps`, here every step).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

SIDES = ("baseline", "glm_ft", "glm_ft_grouped", "glm_ft_grouped_bf16", "glm_ft_packed")


class RecordingCollator:
    """Wraps a collator and notes what every batch holds, in the order the Trainer asks for them."""

    def __init__(self, collate):
        self.collate = collate
        self.batches: list[dict[str, Any]] = []

    def __call__(self, features):
        batch = self.collate(features)
        mask = batch["attention_mask"]
        self.batches.append({
            "tokens": int(mask.sum()),
            "slots": int(mask.numel()),
            "targets": int((batch["labels"][:, 1:] != -100).sum()),
            # a packed row's samples count one by one (their attention is per sample)
            "samples": sum(len(f.get("lengths", [0])) for f in features),
            "lengths": [n for f in features for n in f.get("lengths", [len(f["input_ids"])])],
        })
        return batch


def overrides(spec: dict[str, Any], side: str) -> list[str]:
    out = [
        "experiment=quickstart",
        f"method={spec['method']}",
        f"model.path={spec['model_dir']}",
        f"model.build_if_missing={str(spec['size'] == 'tiny').lower()}",
        f"data.data_dir={spec['data_dir']}",
        "data.train_file=train.json",
        "data.val_file=null",
        "data.test_file=null",
        f"max_input_length={spec['max_input_length']}",
        f"max_output_length={spec['max_output_length']}",
        f"seed={spec['seed']}",
        f"training_args.per_device_train_batch_size={spec['batch_size']}",
        f"training_args.max_steps={spec['steps']}",
        f"training_args.learning_rate={spec['learning_rate']}",
        "training_args.warmup_steps=0",
        "training_args.logging_steps=1",
        "training_args.save_strategy=no",
        "training_args.evaluation_strategy=no",
        "training_args.disable_tqdm=true",
        "tracking.enabled=false",
    ]
    if side.startswith("glm_ft_grouped"):
        out.append("training_args.group_by_length=true")
    if side.endswith("_bf16"):
        out.append("training_args.bf16=true")
    if side == "glm_ft_packed":
        out.append("data.packing=true")
    return out + list(spec.get("extra_overrides", []))


def _loss_over_set(model, dataset, order: list[int], batch_size: int, collate, bf16: bool):
    """Token-weighted mean loss of `model` over every sample, batched in `order` and computed in the side's
    precision; the target-token count; and each sample's summed loss, keyed by a digest of its tokens (a packed
    row's samples are told apart by its `lengths`)."""
    import torch
    import torch.nn.functional as F

    total, count, per_sample = 0.0, 0, {}
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(order), batch_size):
            features = [dataset[i] for i in order[start:start + batch_size]]
            batch = collate(features)
            n = int((batch["labels"][:, 1:] != -100).sum())
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "segment_ids")}
            out = model(**inputs, labels=batch["labels"])
            total += float(out.loss) * n
            count += n
            token_loss = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:],
                                         reduction="none")
            token_loss = F.pad(token_loss, (1, 0))  # token t's loss is that of predicting it
            for row, feature in enumerate(features):
                ids, lengths = feature["input_ids"], feature.get("lengths", [len(feature["input_ids"])])
                # unpacked rows are left-padded, packed ones right-padded
                offset = batch["input_ids"].shape[1] - len(ids) if "lengths" not in feature else 0
                for length in lengths:
                    digest = hashlib.sha256(json.dumps(ids[:length]).encode()).hexdigest()[:16]
                    per_sample[digest] = float(token_loss[row, offset + 1:offset + length].sum())
                    ids, offset = ids[length:], offset + length
    model.train()
    return total / count, count, per_sample


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import random

    import numpy as np
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, TrainerCallback, set_seed

    from bench.common import training_flops
    from bench.prepare import data_config, glm_ft_config, model_config, weights_checksum
    from glm_ft.data.dataset import load_datasets
    from glm_ft.train.evaluation import Collator
    from glm_ft.train.finetune import generation_config_for
    from glm_ft.train.trainer import GlmTrainer
    from glm_ft.model import apply_method, load_base_model, load_for_training, load_tokenizer
    from glm_ft.data.packing import PackedCollator
    from glm_ft.train.trainer_args import build_training_arguments
    from glm_ft.config.validate import validate

    side = spec["side"]
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}")
    cfg = glm_ft_config(overrides(spec, side))
    validate(cfg)
    set_seed(cfg.seed)
    work = Path(spec["work_dir"])

    if side == "baseline":
        model_dir = Path(spec["model_dir"])
        tokenizer = load_tokenizer(model_dir)
        model = load_base_model(model_dir, torch.float32, attn_implementation="eager")
        model.config.use_cache = False
        model = apply_method(model, cfg.method, cfg.seed)
    else:
        tokenizer, model, _ = load_for_training(cfg)
    checksum = weights_checksum(model)
    attn = model.config._attn_implementation

    # Preprocessed once by the orchestrator; both sides read the same cached dataset.
    data = load_datasets(data_config(cfg), tokenizer, cfg.max_input_length, cfg.max_output_length,
                         cache_dir=work / "datasets")
    train = data.train
    expected = spec["steps"] * spec["batch_size"]
    if len(train) != expected:
        raise RuntimeError(f"{len(train)} training samples, expected steps × batch = {expected}")
    steps, warmup = spec["steps"], spec["warmup_steps"]
    if cfg.data.packing:
        from glm_ft.data.packing import pack_dataset, pack_max_length

        train = pack_dataset(train, pack_max_length(cfg.data, cfg.max_input_length, cfg.max_output_length))
        steps = -(-len(train) // spec["batch_size"])  # still one epoch over the same samples
        warmup = max(1, round(warmup * steps / spec["steps"]))

    args = build_training_arguments(cfg, work / f"run-{spec['size']}-{side}", None, has_eval=False,
                                    generation_config=generation_config_for(cfg, tokenizer))
    args.max_steps = steps
    if side == "baseline":
        args.train_sampling_strategy = "sequential"
        collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
        recorder = RecordingCollator(collate)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, data_collator=recorder,
                                 processing_class=tokenizer)
    else:
        collate = (PackedCollator if cfg.data.packing else Collator)(tokenizer.pad_token_id)
        recorder = RecordingCollator(collate)
        trainer = GlmTrainer(model=model, args=args, train_dataset=train, data_collator=recorder,
                             processing_class=tokenizer, method=cfg.method,
                             gen_config=None)

    # The same-work check walks the set in this side's own order; RNG states are put back so training is unaffected.
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        set_seed(cfg.seed)
        sampler = trainer._get_train_sampler()
        order = list(sampler) if sampler is not None else list(range(len(train)))
        initial_loss, targets, per_sample_loss = _loss_over_set(model, train, order, spec["batch_size"], collate, args.bf16)
    random.setstate(py_state)
    np.random.set_state(np_state)

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_end: list[float] = []
            self.cpu_end: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end.append(time.perf_counter())
            self.cpu_end.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()

    batches = recorder.batches[:steps]
    if len(clock.step_end) != steps or len(clock.losses) != steps:
        raise RuntimeError(f"expected {steps} steps and losses, got {len(clock.step_end)} and {len(clock.losses)}")
    timed = batches[warmup:]
    seconds = clock.step_end[-1] - clock.step_end[warmup - 1]
    tokens = sum(b["tokens"] for b in timed)
    samples = sum(b["samples"] for b in timed)
    lengths = [n for b in timed for n in b["lengths"]]
    flops = training_flops(model_config(spec["size"]), lengths, all_weights_train=cfg.method.name == "sft")
    weighted = sum(loss * b["targets"] for loss, b in zip(clock.losses, batches))
    order_digest = hashlib.sha256(json.dumps([b["lengths"] for b in batches]).encode()).hexdigest()[:16]
    return {
        "attn_implementation": attn,
        "bf16": args.bf16,
        "sampler": args.train_sampling_strategy,
        "weights_sha256_16": checksum,
        "initial_loss_over_set": initial_loss,
        "target_tokens": targets,
        "per_sample_loss": per_sample_loss,
        "train_loss_token_weighted": weighted / sum(b["targets"] for b in batches),
        "timed_steps": steps - warmup,
        "timed_s": seconds,
        # CPU seconds of this process (all threads) over the same steps: less sensitive to a busy machine than
        # wall time, though threads that spin-wait for a descheduled sibling still inflate it
        "timed_cpu_s": clock.cpu_end[-1] - clock.cpu_end[warmup - 1],
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "steps_per_s": (steps - warmup) / seconds,
        "padding_fraction": 1 - sum(b["tokens"] for b in batches) / sum(b["slots"] for b in batches),
        "model_flops_per_s": flops / seconds,
        "first_batch_order": order[: spec["batch_size"]],
        # per timed step, for combining rounds (bench.common.combine_rounds); the digest shows the rounds
        # trained the same batches in the same order
        "step_s": [b - a for a, b in zip(clock.step_end[warmup - 1:], clock.step_end[warmup:])],
        "step_tokens": [b["tokens"] for b in timed],
        "step_samples": [b["samples"] for b in timed],
        "step_flops": [training_flops(model_config(spec["size"]), b["lengths"],
                                      all_weights_train=cfg.method.name == "sft") for b in timed],
        "batches_digest": order_digest,
    }
