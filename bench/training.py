"""Training throughput, one side per process (bench/README.md, "Training tokens/s"), and the memory figure's
full-logits side."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, TrainerCallback, set_seed
from transformers.loss.loss_utils import ForCausalLMLoss

from bench.common import training_flops
from bench.prepare import glm_ft_config, glm_trainer, load, model_config, training_arguments, weights_checksum
from glm_ft.chatglm3 import modeling
from glm_ft.config.validate import validate
from glm_ft.data.collate import Collator
from glm_ft.data.packing import PackedCollator, pack_dataset, pack_max_length
from glm_ft.model import apply_method


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


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
            "lengths": [n for f in features for n in f.get("lengths", [len(f["input_ids"])])],
        })
        return batch


def full_logits_loss(hidden_states, output_layer, labels, num_items_in_batch=None):
    """The training loss of the reference's model code, and glm-ft's before chunking: the batch's full-vocabulary
    logits, which transformers' causal-LM loss upcasts to fp32 (the training baseline's, and the memory figure's
    'before' side)."""
    logits = output_layer(hidden_states)
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)


def loss_over_set(model, dataset, order: list[int], batch_size: int, collate, bf16: bool):
    """Token-weighted mean loss of `model` over every sample, batched in `order`, in the side's precision; and each
    sample's summed loss, keyed by a digest of its tokens (a packed row's samples are told apart by `lengths`)."""
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
                    per_sample[digest(ids[:length])] = float(token_loss[row, offset + 1:offset + length].sum())
                    ids, offset = ids[length:], offset + length
    model.train()
    return total / count, per_sample


def run(spec: dict[str, Any]) -> dict[str, Any]:
    side, batch_size, steps, warmup = spec["side"], spec["batch_size"], spec["steps"], spec["warmup_steps"]
    baseline = side == "baseline"
    if spec.get("full_logits"):
        modeling.chunked_causal_lm_loss = full_logits_loss  # looked up at call time by the model's forward
    cfg = glm_ft_config(spec, f"method={spec['method']}", "data.test_file=null",
                        f"model.build_if_missing={str(spec['size'] == 'tiny').lower()}",
                        f"training_args.per_device_train_batch_size={batch_size}", f"training_args.max_steps={steps}",
                        f"training_args.learning_rate={spec['learning_rate']}", "training_args.warmup_steps=0",
                        "training_args.logging_steps=1", *spec.get("overrides", []))
    validate(cfg)
    tokenizer, model, data = load(cfg, spec, baseline=baseline)
    if baseline:
        model.config.use_cache = False
        model = apply_method(model, cfg.method, cfg.seed)
    checksum = weights_checksum(model)

    train = data.train
    if len(train) != steps * batch_size:
        raise RuntimeError(f"{len(train)} training samples, expected steps × batch = {steps * batch_size}")
    if cfg.data.packing:
        train = pack_dataset(train, pack_max_length(cfg.data, cfg.max_input_length, cfg.max_output_length))
        steps = -(-len(train) // batch_size)  # still one epoch over the same samples
        warmup = max(1, round(warmup * steps / spec["steps"]))

    args = training_arguments(cfg, tokenizer, Path(spec["work_dir"]) / f"run-{spec['size']}-{side}", has_eval=False)
    args.max_steps = steps
    if baseline:  # the reference demo's data path
        args.train_sampling_strategy = "sequential"
        collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
        recorder = RecordingCollator(collate)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, data_collator=recorder,
                                 processing_class=tokenizer)
    else:
        collate = (PackedCollator if cfg.data.packing else Collator)(tokenizer.pad_token_id)
        recorder = RecordingCollator(collate)
        trainer = glm_trainer(cfg, tokenizer, args, model=model, train_dataset=train, data_collator=recorder)

    # The same-work check walks the set in this side's own order; RNG states are put back so training is unaffected.
    # Skipped by the memory figure: its eval-mode pass would make full logits on both sides and set the peak.
    initial_loss = per_sample_loss = None
    if spec.get("loss_over_set", True):
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            set_seed(cfg.seed)
            sampler = trainer._get_train_sampler()
            order = list(sampler) if sampler is not None else list(range(len(train)))
            initial_loss, per_sample_loss = loss_over_set(model, train, order, batch_size, collate, args.bf16)
        random.setstate(py_state)
        np.random.set_state(np_state)

    step_end: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()

    losses = [float(log["loss"]) for log in trainer.state.log_history if "loss" in log]
    batches = recorder.batches[:steps]
    if len(step_end) != steps or len(losses) != steps:
        raise RuntimeError(f"expected {steps} steps and losses, got {len(step_end)} and {len(losses)}")
    timed = batches[warmup:]
    return {
        "attn_implementation": model.config._attn_implementation,
        "bf16": args.bf16,
        "sampler": args.train_sampling_strategy,
        "weights_sha256_16": checksum,
        "initial_loss_over_set": initial_loss,
        "per_sample_loss": per_sample_loss,
        "train_losses": losses,
        "train_loss_token_weighted": sum(loss * b["targets"] for loss, b in zip(losses, batches))
        / sum(b["targets"] for b in batches),
        "padding_fraction": 1 - sum(b["tokens"] for b in batches) / sum(b["slots"] for b in batches),
        # per timed step, for combining rounds (bench.results.combine_rounds); the digest shows the rounds
        # trained the same batches in the same order
        "step_s": [b - a for a, b in zip(step_end[warmup - 1:], step_end[warmup:])],
        "step_tokens": [b["tokens"] for b in timed],
        "step_flops": [training_flops(model_config(spec["size"]), b["lengths"], targets=b["targets"],
                                      all_weights_train=cfg.method.name == "sft") for b in timed],
        "batches_digest": digest([b["lengths"] for b in batches]),
    }
