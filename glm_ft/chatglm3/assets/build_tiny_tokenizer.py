"""Build the tiny ChatGLM3-style SentencePiece model used by tests and tiny runs.

    python -m glm_ft.chatglm3.assets.build_tiny_tokenizer [--out PATH]

It is trained like the real one (BPE, identity normalisation, dummy prefix, whitespace kept, digits split, byte
fallback, unk 0 / <s> 1 / </s> 2) so the same id patterns hold: "\\n" encodes as [▁, <0x0A>]. The corpus is a fixed
built-in text plus the bundled sample data when it is there (data/sample/*.jsonl); training runs on one thread, so
the same inputs give the same bytes. The result is committed: rebuild it only when the sample data changes on
purpose, since the tiny model's vocabulary size follows it.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from pathlib import Path

VOCAB_SIZE = 3000
REPO_ROOT = Path(__file__).resolve().parents[3]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
DEFAULT_OUT = Path(__file__).resolve().parent / "tiny_tokenizer.model"

BUILTIN_CORPUS = """\
你好，我是人工智能助手 ChatGLM3，很高兴为你服务。
请问有什么可以帮助你的吗？我会尽力回答你的问题。
今天天气很好，阳光明媚，适合出去散步。
明天北京的天气怎么样？会不会下雨？
上海今天多云，最高气温二十八度，最低气温二十二度。
我们一起去公园吧，那里有很多花和树。
这本书讲述了一个关于勇气和友谊的故事。
学习一门新的语言需要时间和耐心。
他每天早上七点起床，八点去上班。
请把这个文件发给我，谢谢！
中国是一个历史悠久的国家，有五千多年的文明。
春天来了，小草发芽了，花儿也开了。
夏天很热，我们喜欢吃西瓜和冰淇淋。
秋天的树叶变黄了，一片一片地落下来。
冬天下雪了，孩子们在外面堆雪人。
你可以帮我写一段广告文案吗？
这款手机的屏幕很大，电池也很耐用。
这家餐厅的菜很好吃，价格也不贵。
我想买一件新衣服，你有什么推荐吗？
这条裙子的颜色很漂亮，穿上显得很有气质。
简约的设计，舒适的面料，让你轻松穿出时尚感。
时尚百搭，无论是上班还是约会都很合适。
请根据以下信息回答问题，并给出理由。
如果你有任何问题，请随时告诉我。
对不起，我不太明白你的意思，可以再说一遍吗？
好的，我明白了，马上为你处理。
一二三四五六七八九十，百千万亿。
年月日时分秒，星期一到星期日。
东南西北，上下左右，前后内外。
大小多少，高低长短，快慢新旧。
父亲母亲，哥哥姐姐，弟弟妹妹，朋友同学。
老师说：“读书是一件快乐的事情。”
《红楼梦》是中国古典小说的代表作之一。
数学、语文、英语、物理、化学、生物、历史、地理。
电脑、手机、网络、软件、数据、模型、训练、评估。
机器学习是人工智能的一个重要分支。
深度学习模型需要大量的数据进行训练。
自然语言处理让计算机能够理解人类的语言。
查询商品库存，查询商品价格，查询订单状态。
这件衣服还有货吗？价格是多少？
用户的问题是关于天气的，我需要调用天气查询工具。
根据查询结果，今天的温度是二十五度。
Hello, I am an AI assistant. How can I help you today?
The quick brown fox jumps over the lazy dog.
Please answer the following questions as best as you can.
You have access to the following tools.
Machine learning models are trained on large datasets.
The weather in Beijing is sunny with a high of 28 degrees.
Fine-tuning adapts a pretrained language model to a new task.
This dress is made of soft cotton and fits well.
Thank you very much! Have a nice day.
What is the capital of France? Paris is the capital of France.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 50%
Email me at hello@example.com or visit https://example.com/docs.
{"name": "get_weather", "description": "查询天气", "parameters": {"type": "object"}}
{"type": "string", "description": "城市名称", "required": ["city"]}
```python
tool_call(city="北京", date="2024-01-01")
```
def main(): print("hello world") return 0
if x > 0 and y < 10: result = x + y * 2
for i in range(10): total += i
[1, 2, 3] (a, b) <tag> key: value; a = b - c / d
😀 😂 👍 ❤️ 🎉 ✨ 🌸 ☀️
"""


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def corpus_lines(sample_dir: Path = SAMPLE_DIR) -> Iterator[str]:
    texts = [BUILTIN_CORPUS]
    for path in sorted(sample_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            texts.extend(_strings(row))
            for message in row.get("conversations", []):
                if message.get("tools") is not None:
                    texts.append(json.dumps(message["tools"], indent=4, ensure_ascii=False))
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def build(out: Path = DEFAULT_OUT, sample_dir: Path = SAMPLE_DIR, vocab_size: int = VOCAB_SIZE) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus_lines(sample_dir),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    path = build(args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
