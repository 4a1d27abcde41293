"""Preprocessing throughput, one side per process: glm-ft's `load_datasets` or row-at-a-time encoding.

- glm_ft: `glm_ft.data.dataset.load_datasets` on a fresh cache folder, one pass in one process: read and check every row,
  encode every message text in one SentencePiece call on `num_proc` threads (the advertise_gen config's 16, which
  glm-ft caps at the CPU count), lay out the samples, save the cache; then the same call again, which finds the
  cache (`glm_ft_warm`);
- baseline: what the reference demo did per row: `datasets.load_dataset("json")`, then `Dataset.map` without
  batching, one process, calling the tokenizer per message of each row as its `process_batch` did.

Same work: both sides must produce the same input_ids and labels for every row, in order (a hash of all of them is
compared). Rows/s counts input rows.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

SIDES = ("baseline", "glm_ft")
IGNORE_INDEX = -100


def reference_sample(row: dict[str, str], tokenizer, max_input_length: int, max_output_length: int) -> dict:
    """The reference demo's training sample for one AdvertiseGen row (its process_batch, one row at a time)."""
    input_ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    loss_masks = [False, False]
    for role, content in (("user", row["content"]), ("assistant", row["summary"])):
        ids = tokenizer.build_single_message(role, "", content)
        input_ids += ids
        loss_masks += [role not in ("system", "user")] * len(ids)
    input_ids.append(tokenizer.eos_token_id)
    loss_masks = [False, *loss_masks]
    labels = [tok if mask else IGNORE_INDEX for tok, mask in zip(input_ids, loss_masks)]
    limit = max_input_length + max_output_length + 1
    return {"input_ids": input_ids[:limit], "labels": labels[:limit]}


def samples_digest(dataset) -> str:
    digest = hashlib.sha256()
    for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        digest.update(repr((ids, labels)).encode())
    return digest.hexdigest()[:16]


def breakdown(path: Path, tokenizer, max_input_length: int, max_output_length: int,
              threads: int) -> dict[str, float]:
    """Where glm-ft's time goes (measured after the timed call, the same steps again): reading and checking the
    file, encoding the messages, laying out the samples. The rest of its time is Arrow and the cache write."""
    from glm_ft.data.dataset import _train_columns, encode_messages, read_rows

    start = time.perf_counter()
    report = read_rows(path)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    parts = encode_messages(report.conversations, tokenizer, threads)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    _train_columns(report.conversations, parts, tokenizer, max_input_length, max_output_length)
    return {"read_and_check": read_s, "encode": encode_s, "lay_out_samples": time.perf_counter() - start}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets

    from glm_ft.chatglm3.tokenization import load_tiny_tokenizer
    from glm_ft.data.dataset import load_datasets

    side = spec["side"]
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}")
    tokenizer = load_tiny_tokenizer()
    path = Path(spec["data_dir"]) / "train.json"
    work = Path(spec["work_dir"]) / f"prep-{side}"
    max_in, max_out = spec["max_input_length"], spec["max_output_length"]
    datasets.disable_progress_bars()

    if side == "baseline":
        start = time.perf_counter()
        raw = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(work / "hf"))
        out = raw.map(reference_sample, fn_kwargs={"tokenizer": tokenizer, "max_input_length": max_in,
                                                   "max_output_length": max_out},
                      batched=False, remove_columns=raw.column_names)
        seconds = time.perf_counter() - start
        result = {"rows": len(raw), "seconds": seconds, "rows_per_s": len(raw) / seconds, "num_proc": 1}
    else:
        config = {"data_dir": str(path.parent), "train_file": path.name, "num_proc": spec["num_proc"]}
        start = time.perf_counter()
        bundle = load_datasets(config, tokenizer, max_in, max_out, cache_dir=work / "cache")
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        warm = load_datasets(config, tokenizer, max_in, max_out, cache_dir=work / "cache")
        warm_seconds = time.perf_counter() - start
        if warm.stats.get("data.train.cached") != 1:
            raise RuntimeError("the second load_datasets call did not reuse its cache")
        out = bundle.train
        rows = bundle.stats["data.train.rows_read"]
        result = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "num_proc": spec["num_proc"],
                  "warm_seconds": warm_seconds, "warm_rows_per_s": rows / warm_seconds, "stats": bundle.stats,
                  "breakdown_s": breakdown(path, tokenizer, max_in, max_out,
                                                                              max(1, min(spec["num_proc"], os.cpu_count() or 1)))}
    result.update(samples=len(out), samples_sha256_16=samples_digest(out))
    return result
