"""AdvertiseGen-shaped rows ({"content": "类型#裙*版型#宽松*...", "summary": "..."}), any number, deterministic:
the sample data's vocabulary (scripts/make_sample_data.py, so the tiny tokenizer knows it) with AdvertiseGen's
spread of lengths. A reply is a function of its prompt, so a model fine-tuned on them learns where replies end."""

from __future__ import annotations

import importlib.util
import json
import random
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Generic ad clauses: AdvertiseGen replies pad the attribute phrases with sentences like these.
FILLERS = [
    "简约的设计，舒适的面料，让你轻松穿出时尚感", "时尚百搭，无论是上班还是约会都很合适",
    "这条裙子的颜色很漂亮，穿上显得很有气质", "细节处理精致，做工考究", "上身效果很好，显得整个人很有精神",
    "搭配一双小白鞋就很好看", "春天来了，穿上它去公园散步吧", "夏天很热，透气的面料让你清爽一整天",
    "秋天的时候搭配一件外套也很有型", "冬天可以作为内搭，保暖又时髦", "日常通勤周末出游都能轻松驾驭",
    "无论什么身材都能穿出好看的效果",
]


@cache
def _sample_generator():
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _attributes(rng: random.Random, gen) -> list[tuple[str, str]]:
    category = rng.choice(sorted(gen.CATEGORIES))
    pool = {**gen.COMMON_ATTRIBUTES, **gen.GROUP_ATTRIBUTES[gen.CATEGORIES[category][1]]}
    keys = [rng.choice(sorted(pool)) for _ in range(rng.randint(2, 9))]
    order = {key: i for i, key in enumerate(gen.ATTRIBUTE_ORDER)}
    keys.sort(key=order.__getitem__)
    return [("类型", category)] + [(key, rng.choice(pool[key])) for key in keys]


def _summary(gen, attributes: list[tuple[str, str]]) -> str:
    category = attributes[0][1]
    measure, _, closing = gen.CATEGORIES[category]
    values = dict(attributes)
    parts = [f"这{measure}{values.get('颜色', '')}{category}"]
    for key, value in attributes[1:]:
        if key in gen.PHRASES:
            parts.append(gen._pick(gen.PHRASES[key], value).format(v=value))
    i = sorted(gen.CATEGORIES).index(category)  # 0 to 4 extra clauses, always the same ones for a category
    parts += [FILLERS[(3 * i + j) % len(FILLERS)] for j in range(i % 5)]
    parts.append(closing)
    if "风格" in values:
        parts.append(gen._pick(gen.STYLE_CLOSINGS, values["风格"]).format(v=values["风格"]))
    return "，".join(parts) + "。"


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n AdvertiseGen rows; the same (n, seed) always gives the same rows."""
    gen, rng, out = _sample_generator(), random.Random(seed), []
    for _ in range(n):
        attributes = _attributes(rng, gen)
        out.append({"content": "*".join(f"{key}#{value}" for key, value in attributes),
                    "summary": _summary(gen, attributes)})
    return out


def write(path: Path, n: int, seed: int = 0) -> Path:
    """AdvertiseGen's own file layout: one JSON object per line in a .json file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows(n, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
