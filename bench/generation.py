"""Evaluation generation, one side per process (bench/README.md, "Evaluation generation"), from the same
fine-tuned model (`train_eval_model`) and prompts; outputs are compared in file order after timing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import DataCollatorForSeq2Seq, GenerationConfig

from bench.prepare import glm_ft_config, glm_trainer, load, training_arguments, weights_checksum
from glm_ft.train.evaluation import decode_rows, stop_token_ids
from glm_ft.train.metrics import compute_metrics


def config(spec: dict[str, Any]):
    return glm_ft_config(spec, "method=sft", "model.build_if_missing=false", "data.test_file=test.json",
                         f"training_args.per_device_eval_batch_size={spec['eval_batch_size']}",
                         f"training_args.generation_config.max_new_tokens={spec['max_new_tokens']}",
                         f"training_args.max_steps={spec['train_steps']}",
                         f"training_args.per_device_train_batch_size={spec['train_batch_size']}")


def train_eval_model(spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the tiny model through glm-ft (the quickstart's settings) and save it for both sides to load."""
    cfg = config(spec)
    tokenizer, model, data = load(cfg, spec, baseline=False)
    args = training_arguments(cfg, tokenizer, Path(spec["work_dir"]) / "run-eval-model", has_eval=False)
    fine_tune = glm_trainer(cfg, tokenizer, args, model=model, train_dataset=data.train)
    start = time.perf_counter()
    result = fine_tune.train()
    seconds = time.perf_counter() - start
    fine_tune.save_model(spec["out_dir"])
    return {"train_steps": cfg.training_args.max_steps, "train_loss": result.training_loss, "train_s": seconds,
            "out_dir": spec["out_dir"]}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    side, cfg = spec["side"], config(spec)
    batch_size, max_new = spec["eval_batch_size"], spec["max_new_tokens"]
    tokenizer, model, data = load(cfg, spec, baseline=side == "baseline")
    checksum, stops, test = weights_checksum(model), stop_token_ids(tokenizer), data.test

    if side == "baseline":  # the reference's approach: `generate` over batches in file order
        collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", return_tensors="pt")
        # finetune_hf.py set exactly these stop ids on its generation config
        gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=stops,
                               pad_token_id=tokenizer.pad_token_id)
        model.eval()

        def generate_all():
            rows = []
            with torch.no_grad():
                for first in range(0, len(test), batch_size):
                    batch = collate([{"input_ids": ids} for ids in test[first:first + batch_size]["input_ids"]])
                    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         generation_config=gen)
                    rows += out[:, batch["input_ids"].shape[1]:].tolist()
            return rows
    else:  # glm-ft's evaluation path with its defaults: its trainer's `predict`
        args = training_arguments(cfg, tokenizer, Path(spec["work_dir"]) / "run-eval-glm_ft", has_eval=True)
        evaluator = glm_trainer(cfg, tokenizer, args, model=model)

        def generate_all():
            output = evaluator.predict(test, metric_key_prefix="test")
            # the Trainer pads rows across batches; its decode steps are not visible from here
            return [list(map(int, row)) for row in output.predictions]

    # Greedy decoding gives the same rows every time; the fastest pass is the least disturbed one.
    passes = []
    for _ in range(2):
        start = time.perf_counter()
        rows = generate_all()
        passes.append(time.perf_counter() - start)
    seconds = min(passes)

    if len(rows) != len(test):  # compared row by row with the baseline: a missing or extra row is a bug
        raise RuntimeError(f"{side}: {len(rows)} generated rows for {len(test)} prompts")
    generated = sum(useful_tokens(row, stops) for row in rows)
    predictions = decode_rows(tokenizer, rows, stops)
    metrics = compute_metrics(predictions, decode_rows(tokenizer, test["output_ids"], stops))
    return {
        "attn_implementation": model.config._attn_implementation,
        "eval_batch_size": batch_size,
        "stop_token_ids": stops,
        "weights_sha256_16": checksum,
        "prompts": len(test),
        "generate_s": seconds,
        "generate_s_each_pass": [round(x, 3) for x in passes],
        "generated_tokens": generated,
        "generated_tokens_per_s": generated / seconds,
        "rows_that_stopped": sum(any(t in stops for t in row) for row in rows),
        "metrics": metrics,
        "rouge_l": metrics.get("rouge-l"),
        "predictions": predictions,
    }


def useful_tokens(row: Sequence[int], stop_ids: Sequence[int], pad_label: int = -100) -> int:
    """Generated tokens a reader gets from one output row: up to and including its first stop token; a row that
    never stops counts until the padding the Trainer adds between batches (`pad_label`)."""
    stops = set(stop_ids)
    for i, tok in enumerate(row):
        if tok in stops:
            return i + 1
        if tok == pad_label:
            return i
    return len(row)
