"""A tiny ChatGLM3 worth adapting, for CPU sweeps whose swept values make a difference (`model=tiny_demo`).

The tiny model's weights are random: LoRA or a prefix on it has nothing to adapt, so a CPU sweep over `method.r`
ends in a tie. This base is the tiny model first fully fine-tuned on the first half of the sample data's training
file (seeded, 150 steps, about a minute of CPU time): it already writes ad copy, badly, so how an adapter
is sized changes what it learns. It is built once at DEMO_MODEL_DIR, in place by one rename like the tiny model,
and reused from then on; `demo_base.json` in it records how it was made.

    python -m glm_ft.train.demo_base          # build it now (train.py model=tiny_demo does on first use)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glm_ft.atomic import folder_atomic
from glm_ft.config.schema import DEMO_MODEL_DIR, PROJECT_ROOT, TINY_MODEL_DIR

SAMPLE_TRAIN = PROJECT_ROOT / "data" / "sample" / "train.jsonl"
RECORD = "demo_base.json"
# How the base is trained. Changing these changes the base: the record holds them, so a stale base is rebuilt.
RECIPE = {"seed": 0, "rows": 200, "steps": 150, "batch_size": 8, "learning_rate": 2e-3, "max_length": 128}


def is_complete(path: Path) -> bool:
    from glm_ft.chatglm3.tiny import is_complete as has_checkpoint

    record = Path(path) / RECORD
    if not has_checkpoint(path) or not record.is_file():
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("recipe") == RECIPE
    except (OSError, ValueError):
        return False


def ensure_demo_model(path: str | os.PathLike = DEMO_MODEL_DIR) -> Path:
    """Return `path`, first building the demo base there unless it already holds one made by this recipe."""
    from glm_ft.chatglm3.tiny import ensure_tiny_model

    path = Path(path)
    if is_complete(path):
        return path
    tiny = ensure_tiny_model(TINY_MODEL_DIR)
    # A stale base (another recipe) is replaced.
    with folder_atomic(path, done_by_another=is_complete) as staging:
        _build(tiny, staging)
    return path


def _build(tiny: Path, out: Path) -> None:
    import torch

    from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
    from glm_ft.chatglm3.tokenization import ChatGLMTokenizer
    from glm_ft.data.dataset import build_train_sample, read_conversations
    from glm_ft.data.collate import Collator

    # The native classes directly (not glm_ft.model, which builds this base on demand): the tiny model is ours.
    tokenizer = ChatGLMTokenizer.from_pretrained(str(tiny))
    rows = read_conversations(SAMPLE_TRAIN)[:RECIPE["rows"]]
    half = RECIPE["max_length"] // 2
    samples = [build_train_sample(row.messages, tokenizer, half, half) for row in rows]
    collate = Collator(tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        model = ChatGLMForConditionalGeneration.from_pretrained(str(tiny), dtype=torch.float32,
                                                                attn_implementation="sdpa")
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["learning_rate"])
        order = torch.randperm(len(samples)).tolist()
        size = RECIPE["batch_size"]
        for step in range(RECIPE["steps"]):
            start = step * size % len(order)
            batch = collate([samples[i] for i in (order * 2)[start:start + size]])
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    model.config.use_cache = True
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The same files as the tiny model (its config.json layout, its tokenizer_config.json), new weights.
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copyfile(tiny / name, out / name)
    (out / "generation_config.json").unlink(missing_ok=True)
    record = {"recipe": RECIPE, "from": str(tiny), "data": str(SAMPLE_TRAIN), "final_loss": loss.item()}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    print(ensure_demo_model())
