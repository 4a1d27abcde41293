"""Batch prediction over a data file with what a run trained, scored as in evaluation.

    python -m glm_ft predict RUN_OR_CHECKPOINT data/test.jsonl --out predictions.jsonl \\
        --batch-size 16 --batch-tokens 32768

The file may be in any format glm_ft.data reads (`.jsonl` / `.json`, conversations or AdvertiseGen rows); every
assistant turn is one sample (its context as the prompt, its text as the reference), built by the same code as the
evaluation during training. Prompts are batched as evaluation batches them (glm_ft.train.evaluation.plan_generation:
longest first, as many rows as fit --batch-tokens, at least --batch-size rows of the longest prompt), left-padded;
rows are written in file order. Generation takes the run's own settings (`training_args.generation_config`, as its
evaluation and test prediction did), so each row equals the run's prediction for that prompt. Writes OUT (prompt,
reference, prediction per sample) and, beside it, `test_metrics.json`; the metrics (test_rouge-1, test_rouge-2,
test_rouge-l, test_bleu-4, test_samples — the names of a run's final test prediction) are also printed on stdout as
JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from glm_ft.config.schema import EVAL_BATCH_TOKENS
from glm_ft.heap import job_heap
from glm_ft.methods import DTYPE_NAMES
from glm_ft.atomic import check_writable
from glm_ft.errors import ConfigError, GlmFtError, to_stderr

log = logging.getLogger(__name__)

# The schema's defaults (the reference demo's documented lengths), for checkpoints that are not part of a run.
DEFAULT_MAX_INPUT_LENGTH = 256
DEFAULT_MAX_OUTPUT_LENGTH = 512


def build_samples(conversations, tokenizer, max_input_length: int, max_output_length: int) -> list[dict[str, Any]]:
    """One sample per assistant turn, in file order: input_ids (the prompt) and output_ids (the reference)."""
    from glm_ft.data.dataset import build_eval_samples

    samples = []
    for conversation in conversations:
        for sample in build_eval_samples(conversation.messages, tokenizer, max_input_length, max_output_length):
            samples.append({"input_ids": sample["input_ids"], "output_ids": sample["output_ids"]})
    return samples


def generate_all(model, tokenizer, samples: list[dict[str, Any]], generation_config, batch_size: int,
                 batch_tokens: int | None = EVAL_BATCH_TOKENS) -> list[list[int]]:
    """Generated ids (prompt removed) for every sample, in the samples' order, batched as evaluation is."""
    import torch

    from glm_ft.data.collate import Collator
    from glm_ft.train.evaluation import plan_generation
    from glm_ft.train.generation import generate

    collate = Collator(tokenizer.pad_token_id)
    outputs: list[list[int]] = [[] for _ in samples]
    done = 0
    for chunk in plan_generation(samples, batch_size, generation_config, batch_tokens):
        batch = collate([samples[i] for i in chunk])
        input_ids = batch["input_ids"].to(model.device)
        with torch.no_grad():
            generated = generate(model, input_ids, batch["attention_mask"].to(model.device), generation_config)
        for i, row in zip(chunk, generated.tolist()):
            outputs[i] = row
        done += len(chunk)
        log.info("generated %d of %d", done, len(samples))
    return outputs


def predict(checkpoint, data_file: str | Path, out: str | Path, *, base_model: str | Path | None = None,
            batch_size: int = 16, batch_tokens: int | None = EVAL_BATCH_TOKENS, max_input_length: int | None = None,
            max_output_length: int | None = None, max_new_tokens: int | None = None,
            dtype: str | None = None, skip_bad_rows: bool | None = None) -> dict[str, float]:
    """Write predictions to `out` and the metrics beside it; returns the metrics. `checkpoint` is a path or what
    glm_ft.infer.checkpoint.find_checkpoint returned."""
    from glm_ft.infer.checkpoint import Checkpoint, find_checkpoint
    from glm_ft.data.dataset import read_conversations

    # A wrong path or a bad data file fails before the model loads.
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else find_checkpoint(checkpoint, base_model)
    # The rows the run's own test prediction used: a run trained with data.skip_bad_rows=true skipped the same rows.
    if skip_bad_rows is None:
        skip_bad_rows = bool((ckpt.run_info or {}).get("skip_bad_rows", False))
    conversations = read_conversations(data_file, skip_bad_rows=skip_bad_rows)
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; name the predictions file (e.g. {out / 'predictions.jsonl'})")
    check_writable(out, "--out")  # before generation, not after it

    from glm_ft.infer.checkpoint import load_checkpoint
    from glm_ft.train.evaluation import decode_rows, stop_token_ids, write_predictions
    from glm_ft.train.metrics import compute_metrics, prefix_metrics

    loaded = load_checkpoint(ckpt, dtype=dtype)
    tokenizer, run_info = loaded.tokenizer, loaded.checkpoint.run_info or {}
    # The lengths the run was trained with, so the prompts look like those it was evaluated on.
    max_input_length = max_input_length or run_info.get("max_input_length") or DEFAULT_MAX_INPUT_LENGTH
    max_output_length = max_output_length or run_info.get("max_output_length") or DEFAULT_MAX_OUTPUT_LENGTH
    samples = build_samples(conversations, tokenizer, max_input_length, max_output_length)
    gen = _generation(tokenizer, run_info, max_new_tokens or None, max_output_length)

    started = time.perf_counter()
    generated = generate_all(loaded.model, tokenizer, samples, gen, batch_size, batch_tokens)
    stop_ids = stop_token_ids(tokenizer)
    predictions = decode_rows(tokenizer, generated, stop_ids)
    references = decode_rows(tokenizer, [s["output_ids"] for s in samples], stop_ids)
    metrics = prefix_metrics(compute_metrics(predictions, references), "test")
    metrics.update(test_samples=len(samples), test_runtime=round(time.perf_counter() - started, 3))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(out, tokenizer, samples, generated, stop_ids, metrics)
    return metrics


def _generation(tokenizer, run_info: dict[str, Any], max_new_tokens: int | None, max_output_length: int):
    """The run's own evaluation settings (training_args.generation_config, recorded in glm_ft_run.json), so a row
    equals the run's prediction for that prompt; `max_new_tokens` replaces only the length. A checkpoint outside a
    run, or a run recorded before the settings were: greedy, up to `max_output_length` new tokens."""
    from glm_ft.infer.checkpoint import generation_config
    from glm_ft.train.evaluation import generation_config as build

    recorded = run_info.get("generation_config")
    if not recorded:
        return generation_config(tokenizer, max_new_tokens or max_output_length)
    return build(tokenizer, **{**recorded, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glm_ft predict", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint",
                        help="run folder, checkpoint folder (LoRA, P-Tuning v2, freeze, SFT) or model folder")
    parser.add_argument("data_file", help=".jsonl or .json file of conversations or AdvertiseGen rows")
    parser.add_argument("--out", default="predictions.jsonl", help="predictions file; test_metrics.json goes beside it")
    parser.add_argument("--base-model", help="base model folder (default: the one recorded at training time)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows of the longest prompt a batch always takes")
    parser.add_argument("--batch-tokens", type=int, default=EVAL_BATCH_TOKENS,
                        help="tokens a batch may hold, rows x (longest prompt + new tokens); more rows of shorter "
                             "prompts (default: %(default)s, training's eval_batch_tokens)")
    parser.add_argument("--max-input-length", type=int, help="default: the run's, else 256")
    parser.add_argument("--max-output-length", type=int, help="reference length; default: the run's, else 512")
    parser.add_argument("--max-new-tokens", type=int,
                        help="default: the run's training_args.generation_config.max_new_tokens, else "
                             "--max-output-length")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
    parser.add_argument("--skip-bad-rows", action=argparse.BooleanOptionalAction, default=None,
                        help="skip well-formed but unusable rows (default: the run's data.skip_bad_rows, else no)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "batch_tokens", "max_new_tokens", "max_output_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_input_length is not None and args.max_input_length < 3:
        parser.error("--max-input-length must be at least 3 ([gMASK] sop <|assistant|>)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from glm_ft.infer.checkpoint import find_checkpoint, quiet_transformers

        ckpt = find_checkpoint(args.checkpoint, args.base_model)
        quiet_transformers()
        with job_heap():  # what load_checkpoint loads is frozen out of full collections (glm_ft/heap.py)
            metrics = predict(ckpt, args.data_file, args.out,
                              batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                              max_input_length=args.max_input_length,
                              max_output_length=args.max_output_length, max_new_tokens=args.max_new_tokens,
                              dtype=args.dtype, skip_bad_rows=args.skip_bad_rows)
    except GlmFtError as err:
        to_stderr(f"error: {err}")
        return 1
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
