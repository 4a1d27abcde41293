"""The bundled sample data: reproducible from its script, well-formed, and with no row shared between splits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample"
SPLITS = ("train", "dev", "test")
ROLES = {"system", "user", "assistant", "observation"}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: read_rows(SAMPLE / f"{split}.jsonl") for split in SPLITS}


def test_script_reproduces_committed_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_data.py"), "--out", str(tmp_path)],
                   check=True)
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (SAMPLE / f"{split}.jsonl").read_bytes(), split


def test_another_seed_gives_other_rows(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_data.py"), "--out", str(tmp_path),
                    "--seed", "1"], check=True)
    assert (tmp_path / "train.jsonl").read_bytes() != (SAMPLE / "train.jsonl").read_bytes()


def test_sizes(rows):
    assert {split: len(r) for split, r in rows.items()} == {"train": 400, "dev": 40, "test": 40}


def test_every_row_is_a_conversation_with_an_assistant_turn(rows):
    for split, split_rows in rows.items():
        for i, row in enumerate(split_rows):
            where = f"{split}:{i + 1}"
            assert list(row) == ["conversations"], where
            messages = row["conversations"]
            assert all(m["role"] in ROLES and isinstance(m["content"], str) for m in messages), where
            assert any(m["role"] == "assistant" and m["content"] for m in messages), where
            # tools and system prompts only make sense at the start
            assert all(m["role"] != "system" for m in messages[1:]), where
            assert all("tools" not in m for m in messages[1:]), where


def test_ad_rows_are_short_and_copy_the_attribute_values(rows):
    for split, split_rows in rows.items():
        ads = [r["conversations"] for r in split_rows
               if [m["role"] for m in r["conversations"]] == ["user", "assistant"]]
        assert len(ads) >= 0.9 * len(split_rows), split
        for user, assistant in ads:
            pairs = [item.split("#") for item in user["content"].split("*")]
            assert pairs[0][0] == "类型" and all(len(p) == 2 for p in pairs), user["content"]
            assert 20 <= len(assistant["content"]) <= 60, assistant["content"]
            assert len(user["content"]) + len(assistant["content"]) < 120
            # the reply is learnable because it repeats every value of the prompt
            assert all(value in assistant["content"] for _, value in pairs), (user["content"], assistant["content"])


def test_every_split_has_system_multi_turn_and_tool_rows(rows):
    for split, split_rows in rows.items():
        conversations = [r["conversations"] for r in split_rows]
        assert any(c[0]["role"] == "system" and "tools" not in c[0] for c in conversations), split
        assert any(sum(m["role"] == "user" for m in c) >= 2 for c in conversations), split
        tool_rows = [c for c in conversations if "tools" in c[0]]
        assert tool_rows, split
        for c in tool_rows:
            names = {tool["name"] for tool in c[0]["tools"]}
            roles = [m["role"] for m in c]
            call = roles.index("observation") - 1
            assert c[call]["role"] == "assistant" and c[call]["metadata"] in names
            assert c[call]["content"].startswith("```python\ntool_call(") and c[call]["content"].endswith(")\n```")
            json.loads(c[call + 1]["content"])
            assert roles[-1] == "assistant"


def test_no_row_or_prompt_is_shared_between_splits(rows):
    def prompts(split):
        return {m["content"] for r in rows[split] for m in r["conversations"] if m["role"] == "user"
                and "#" in m["content"]}

    dumped = {split: {json.dumps(r, ensure_ascii=False) for r in rows[split]} for split in SPLITS}
    assert len(dumped["train"]) == len(rows["train"])  # no duplicate inside train either
    for held_out in ("dev", "test"):
        assert not dumped[held_out] & dumped["train"], held_out
        assert not prompts(held_out) & prompts("train"), held_out
    assert not dumped["dev"] & dumped["test"]
