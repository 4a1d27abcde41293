"""Generate the bundled sample data: synthetic AdvertiseGen-style ad copy in ChatGLM3 conversations format.

    python scripts/make_sample_data.py [--out data/sample] [--seed 0]

Writes train.jsonl, dev.jsonl and test.jsonl. Pure Python and deterministic: the same seed gives the same bytes.

The reply is (almost) a function of the attributes: the measure word and the closing come from the category, each
attribute value is copied into a phrase whose wording is picked from the value itself. A tiny model that learns this
mapping scores clearly higher ROUGE than one that only learned the style, which is what the smoke runs need.
A few rows exercise the other message shapes a loader must handle: a system prompt, several turns, and tool calls
(assistant `metadata` = tool name, content = fenced `tool_call(...)`, then an `observation` with the JSON result).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPLITS = {"train": 390, "dev": 37, "test": 37}  # ad rows per split; the special rows come on top
SPECIAL_ROWS = {"train": 10, "dev": 3, "test": 3}

# category -> (measure word, group, closing used when the row has no 风格)
CATEGORIES = {
    "连衣裙": ("条", "裙", "穿上就很有女人味"),
    "半身裙": ("条", "裙", "搭配上衣很出彩"),
    "阔腿裤": ("条", "裤", "走路带风很显腿长"),
    "牛仔裤": ("条", "裤", "日常百搭不出错"),
    "休闲裤": ("条", "裤", "通勤周末都能穿"),
    "衬衫": ("件", "上衣", "单穿内搭都好看"),
    "T恤": ("件", "上衣", "夏天必备单品"),
    "卫衣": ("件", "上衣", "舒适又有型"),
    "外套": ("件", "上衣", "保暖又有范儿"),
    "毛衣": ("件", "上衣", "温柔又显气质"),
}

COMMON_ATTRIBUTES = {
    "版型": ["宽松", "修身", "直筒", "A字", "收腰"],
    "材质": ["棉", "雪纺", "针织", "亚麻", "牛仔布"],
    "颜色": ["黑色", "白色", "红色", "蓝色", "粉色", "灰色", "卡其色", "绿色"],
    "风格": ["简约", "复古", "休闲", "通勤", "甜美", "街头", "文艺"],
    "图案": ["条纹", "格子", "碎花", "纯色", "印花", "波点"],
}
GROUP_ATTRIBUTES = {
    "裙": {"裙长": ["短裙", "中长裙", "长裙"]},
    "裤": {"裤长": ["九分裤", "七分裤", "长裤"]},
    "上衣": {"袖长": ["短袖", "长袖", "七分袖"], "领型": ["圆领", "V领", "翻领", "立领"]},
}
# the order attributes appear in the prompt and the reply (AdvertiseGen puts 类型 first)
ATTRIBUTE_ORDER = ["类型", "版型", "材质", "颜色", "风格", "图案", "裙长", "裤长", "袖长", "领型"]

PHRASES = {
    "版型": ["{v}的版型穿着舒适", "{v}版型修饰身形", "采用{v}剪裁"],
    "材质": ["{v}面料柔软亲肤", "选用{v}材质透气舒适"],
    "图案": ["{v}图案增添亮点", "点缀{v}元素更显活力"],
    "裙长": ["{v}设计显高显瘦", "{v}的长度刚刚好"],
    "裤长": ["{v}设计拉长腿部线条", "{v}的长度利落干净"],
    "袖长": ["{v}设计方便活动", "{v}款式适合多种场合"],
    "领型": ["{v}设计修饰脸型", "{v}领口显得脖子修长"],
}
STYLE_CLOSINGS = ["尽显{v}风范", "打造{v}气质", "轻松穿出{v}感"]

SYSTEM_PROMPT = "你是服装电商的文案助手，请根据商品属性写一句广告文案。"
TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
TOOLS = [
    {
        "name": "get_stock",
        "description": "查询商品库存",
        "parameters": {
            "type": "object",
            "properties": {"item": {"type": "string", "description": "商品名"}, "size": {"type": "string"}},
            "required": ["item"],
        },
    },
    {
        "name": "get_price",
        "description": "查询商品价格",
        "parameters": {
            "type": "object",
            "properties": {"item": {"type": "string", "description": "商品名"}},
            "required": ["item"],
        },
    },
]
SIZES = ["S", "M", "L", "XL"]


def _pick(options: list[str], value: str) -> str:
    # hash() is salted per process; a sum of code points is stable, so the wording is a function of the value
    return options[sum(map(ord, value)) % len(options)]


def random_attributes(rng: random.Random) -> dict[str, str]:
    category = rng.choice(sorted(CATEGORIES))
    group = CATEGORIES[category][1]
    pool = {**COMMON_ATTRIBUTES, **GROUP_ATTRIBUTES[group]}
    keys = rng.sample(sorted(pool), rng.randint(3, 4))
    attributes = {"类型": category, **{key: rng.choice(pool[key]) for key in keys}}
    return {key: attributes[key] for key in ATTRIBUTE_ORDER if key in attributes}


def prompt(attributes: dict[str, str]) -> str:
    return "*".join(f"{key}#{value}" for key, value in attributes.items())


def ad_copy(attributes: dict[str, str]) -> str:
    category = attributes["类型"]
    measure, _, closing = CATEGORIES[category]
    parts = [f"这{measure}{attributes.get('颜色', '')}{category}"]
    parts += [_pick(PHRASES[key], value).format(v=value) for key, value in attributes.items() if key in PHRASES]
    style = attributes.get("风格")
    # the category's closing fills out replies that would otherwise be too short to be worth scoring
    if len(parts) < 3 or not style:
        parts.append(closing)
    if style:
        parts.append(_pick(STYLE_CLOSINGS, style).format(v=style))
    text = "，".join(parts) + "。"
    assert 20 <= len(text) <= 60, text
    return text


def short_copy(attributes: dict[str, str]) -> str:
    category = attributes["类型"]
    measure, _, closing = CATEGORIES[category]
    return f"这{measure}{attributes.get('颜色', '')}{category}{closing}。"


def item_name(attributes: dict[str, str]) -> str:
    return attributes.get("颜色", "") + attributes["类型"]


def ad_row(attributes: dict[str, str]) -> dict:
    return {"conversations": [
        {"role": "user", "content": prompt(attributes)},
        {"role": "assistant", "content": ad_copy(attributes)},
    ]}


def system_row(attributes: dict[str, str]) -> dict:
    row = ad_row(attributes)
    row["conversations"].insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return row


def multi_turn_row(attributes: dict[str, str]) -> dict:
    row = ad_row(attributes)
    row["conversations"] += [
        {"role": "user", "content": "再简短一点"},
        {"role": "assistant", "content": short_copy(attributes)},
    ]
    return row


def tool_row(attributes: dict[str, str], rng: random.Random) -> dict:
    item = item_name(attributes)
    if rng.random() < 0.5:
        size = rng.choice(SIZES)
        stock = rng.randint(0, 30)
        question, tool, arguments = f"{item}{size}码还有货吗？", "get_stock", f'item="{item}", size="{size}"'
        result = {"item": item, "size": size, "stock": stock}
        answer = f"{item}{size}码还有{stock}件库存。" if stock else f"{item}{size}码暂时缺货。"
    else:
        price = rng.randint(59, 399)
        question, tool, arguments = f"{item}多少钱？", "get_price", f'item="{item}"'
        result = {"item": item, "price": price}
        answer = f"{item}的价格是{price}元。"
    return {"conversations": [
        {"role": "system", "content": TOOLS_PROMPT, "tools": TOOLS},
        {"role": "user", "content": question},
        {"role": "assistant", "metadata": tool, "content": f"```python\ntool_call({arguments})\n```"},
        {"role": "observation", "content": json.dumps(result, ensure_ascii=False)},
        {"role": "assistant", "content": answer},
    ]}


def special_rows(count: int, attributes: list[dict[str, str]], rng: random.Random) -> list[dict]:
    # cycle the three shapes so every split gets each of them
    makers = [system_row, multi_turn_row, lambda a: tool_row(a, rng)]
    return [makers[i % len(makers)](attributes[i]) for i in range(count)]


def generate(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    wanted = sum(SPLITS.values()) + sum(SPECIAL_ROWS.values())
    seen: set[str] = set()
    unique: list[dict[str, str]] = []
    # distinct prompts across all splits, so no row of dev/test is a copy of a train row
    while len(unique) < wanted:
        attributes = random_attributes(rng)
        if prompt(attributes) not in seen:
            seen.add(prompt(attributes))
            unique.append(attributes)
    splits: dict[str, list[dict]] = {}
    start = 0
    for name, count in SPLITS.items():
        ads = unique[start:start + count]
        extra = unique[start + count:start + count + SPECIAL_ROWS[name]]
        start += count + SPECIAL_ROWS[name]
        rows = [ad_row(a) for a in ads] + special_rows(len(extra), extra, rng)
        rng.shuffle(rows)
        splits[name] = rows
    return splits


def write(splits: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write(generate(args.seed), args.out)


if __name__ == "__main__":
    main()
