"""Preprocessing throughput, one side per process (bench/README.md, "Preprocessing rows/s"). Same work: a hash of
every row's input_ids and labels, in order."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

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


def run(spec: dict[str, Any]) -> dict[str, Any]:
    # imported here: the first-step baseline (reference_finetune.py), whose start-up is timed, imports this module
    # for reference_sample alone
    import datasets

    from glm_ft.chatglm3.tokenization import load_tiny_tokenizer
    from glm_ft.data.dataset import load_datasets
    from glm_ft.data.rows import check_rows

    side, tokenizer = spec["side"], load_tiny_tokenizer()
    path = Path(spec["data_dir"]) / "train.json"
    work = Path(spec["work_dir"]) / f"prep-{side}"
    max_in, max_out = spec["max_input_length"], spec["max_output_length"]
    datasets.disable_progress_bars()

    start = time.perf_counter()
    if side == "baseline":
        raw = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(work / "hf"))
        out = raw.map(reference_sample, fn_kwargs={"tokenizer": tokenizer, "max_input_length": max_in,
                                                   "max_output_length": max_out}, batched=False,
                      remove_columns=raw.column_names)
        result = {"rows": len(raw), "num_proc": 1}
    else:
        # what a job does with a file it has not seen: the pre-flight check before the model loads, then this
        config = {"data_dir": str(path.parent), "train_file": path.name, "num_proc": spec["num_proc"]}
        check_rows(path, log_skips=False, records=work / "checked")
        checked = time.perf_counter()
        bundle = load_datasets(config, tokenizer, max_in, max_out, cache_dir=work / "cache")
        out = bundle.train
        result = {"rows": bundle.stats["data.train.rows_read"], "num_proc": spec["num_proc"], "stats": bundle.stats,
                  "check_s": checked - start}
    seconds = time.perf_counter() - start
    if side != "baseline":  # the next job's check of the same file, from the record (not part of the rate)
        again = time.perf_counter()
        check_rows(path, log_skips=False, records=work / "checked")
        result["recorded_check_s"] = time.perf_counter() - again
    digest = hashlib.sha256()  # row by row: one string of every row would weigh on the side's peak memory
    for ids, labels in zip(out["input_ids"], out["labels"]):
        digest.update(repr((ids, labels)).encode())
    result.update(seconds=seconds, rows_per_s=result["rows"] / seconds, samples=len(out),
                  samples_sha256_16=digest.hexdigest()[:16])
    return result
