"""The baseline of the first-step figure: what the reference demo's finetune_hf.py does for a LoRA run, on this
project's installed stack (bench/README.md, "Time to the first training step"). Logs every step, so the first
"'loss'" line marks the end of the first optimizer step.

    python bench/reference_finetune.py DATA_DIR MODEL_DIR OUT_DIR --max-steps N
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jieba  # noqa: F401  (finetune_hf.py's metrics)
import torch
from datasets import load_dataset
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # noqa: F401  (finetune_hf.py's metrics)
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                          Seq2SeqTrainingArguments)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glm_ft.chatglm3 as chatglm3  # noqa: E402
from bench.preprocessing import reference_sample  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--max-input-length", type=int, default=64)
    parser.add_argument("--max-output-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    chatglm3.register()
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.float32,
                                                 attn_implementation="eager", use_cache=False)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1,
                                             target_modules=["query_key_value"]))

    def process_batch(batch):
        samples = [reference_sample({"content": c, "summary": s}, tokenizer, args.max_input_length,
                                    args.max_output_length) for c, s in zip(batch["content"], batch["summary"])]
        return {"input_ids": [s["input_ids"] for s in samples], "labels": [s["labels"] for s in samples]}

    raw = load_dataset("json", data_files={"train": str(args.data_dir / "train.json")}, split="train")
    train = raw.map(process_batch, batched=True, remove_columns=raw.column_names)

    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    training_args = Seq2SeqTrainingArguments(
        output_dir=str(args.out_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=5e-5, logging_steps=1, save_strategy="no", eval_strategy="no", use_cpu=True, report_to=[],
        seed=42, dataloader_pin_memory=False)
    trainer = Seq2SeqTrainer(
        model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", return_tensors="pt"))
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
