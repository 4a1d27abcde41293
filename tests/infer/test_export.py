"""`python -m glm_ft export`: LoRA merged, P-Tuning v2 prefix and SFT model written in the published ChatGLM3 layout
(config keys, tensor names, sharded safetensors with an index, tokenizer files), loaded back with the same logits,
written atomically."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from glm_ft.infer.checkpoint import load_checkpoint
from glm_ft.errors import CheckpointError
from glm_ft.infer.export import export, main
from inference_fixtures import base_dir, other_shape_dir, runs  # noqa: F401

pytestmark = pytest.mark.slow

SHARD = "100KB"  # the tiny model's ~1.9 MB in several shards
PREFIX = "transformer.prefix_encoder.embedding.weight"


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    said = {}
    for method in ("lora", "ptuning_v2"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main([str(runs[method]), str(root / method), "--max-shard-size", SHARD]) == 0
        said[method] = printed.getvalue()
    # what the closing line says the export did with what was trained
    assert "(merged into the base weights) → " + str(root / "lora") in said["lora"]
    assert "(prefix saved beside the base weights) → " + str(root / "ptuning_v2") in said["ptuning_v2"]
    assert "merged" not in said["ptuning_v2"]
    return {
        "lora": root / "lora",
        "ptuning_v2": root / "ptuning_v2",
        "sft": export(runs["sft"], root / "sft", max_shard_size=SHARD, dtype="bfloat16"),
    }


def published_names(real_dir: Path, num_layers: int) -> set[str]:
    weight_map = json.loads((real_dir / "model.safetensors.index.json").read_text())["weight_map"]
    return {name for name in weight_map
            if (m := re.search(r"\.layers\.(\d+)\.", name)) is None or int(m.group(1)) < num_layers}


def prompts(tokenizer) -> dict[str, torch.Tensor]:
    """Two chat prompts of different lengths, left-padded, as in batched evaluation."""
    from glm_ft.data.collate import Collator

    queries = ("类型#裙", "类型#上衣*颜色#白色*风格#简约")
    ids = [tokenizer.build_chat_input(q)["input_ids"][0].tolist() for q in queries]
    batch = Collator(tokenizer.pad_token_id)([{"input_ids": i, "output_ids": [2]} for i in ids])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def reload(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("method", ["lora", "ptuning_v2", "sft"])
def test_published_layout(method, exports, real_chatglm3_dir):
    out = exports[method]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    expected = published_names(real_chatglm3_dir, num_layers=2) | ({PREFIX} if method == "ptuning_v2" else set())
    assert set(weight_map) == expected

    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    from safetensors import safe_open

    total = 0
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            assert set(f.keys()) == {n for n, s in weight_map.items() if s == shard}
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert index["metadata"]["total_size"] == total
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors.index.json", "tokenizer.model",
                                                "tokenizer_config.json", *shards}

    real_config = json.loads((real_chatglm3_dir / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    extra = {"pre_seq_len", "prefix_projection"} if method == "ptuning_v2" else set()
    assert set(config) == set(real_config) | extra
    assert list(config)[:len(real_config)] == list(real_config)  # same order too
    for key in ("auto_map", "architectures", "model_type"):
        assert config[key] == real_config[key]
    assert config["num_layers"] == 2 and config["use_cache"] is True

    real_tokenizer = json.loads((real_chatglm3_dir / "tokenizer_config.json").read_text())
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"] == real_tokenizer["auto_map"]
    assert tokenizer_config["tokenizer_class"] == real_tokenizer["tokenizer_class"]
    # nothing left behind beside it by the write-then-rename
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(exports)


def test_merged_lora_export_gives_the_adapter_models_logits(exports, runs, base_dir):
    adapter = load_checkpoint(runs["lora"], device="cpu")
    inputs = prompts(adapter.tokenizer)
    expected = logits(adapter.model, inputs)
    # the adapter really changes the model, so equal logits below show that it was merged in
    assert not torch.allclose(logits(reload(base_dir), inputs), expected, atol=1e-4)
    torch.testing.assert_close(logits(reload(exports["lora"]), inputs), expected, atol=1e-5, rtol=1e-5)


def test_ptuning_export_gives_the_prefix_models_logits(exports, runs):
    tuned = load_checkpoint(runs["ptuning_v2"], device="cpu")
    exported = reload(exports["ptuning_v2"])
    assert exported.config.pre_seq_len == 4
    inputs = prompts(tuned.tokenizer)
    torch.testing.assert_close(logits(exported, inputs), logits(tuned.model, inputs), atol=1e-5, rtol=1e-5)


def test_sft_export_in_bfloat16(exports, runs):
    from safetensors.torch import load_file

    out = exports["sft"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    original = load_file(runs["sft"] / "final" / "model.safetensors")
    exported = {}
    for shard in out.glob("model-*.safetensors"):
        exported.update(load_file(shard))
    assert set(exported) == set(original)
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, original[name].to(torch.bfloat16)), name


def test_exported_model_chats_like_the_run(exports, runs):
    from glm_ft.infer.chat import main as chat

    def answer(folder) -> str:
        out = io.StringIO()
        assert chat([str(folder), "--prompt", "类型#裙*颜色#红色", "--max-new-tokens", "10"], stdout=out) == 0
        return out.getvalue()

    merged = answer(exports["lora"])
    assert merged.strip() and merged == answer(runs["lora"])


def test_existing_folder_and_failed_export_leave_nothing_behind(runs, other_shape_dir, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        export(runs["lora"], occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    with pytest.raises(CheckpointError, match="another model shape"):
        export(runs["lora"], tmp_path / "wrong", base_model=other_shape_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_an_output_folder_that_cannot_be_made_is_one_line_before_loading(runs, monkeypatch, capsys):
    import glm_ft.infer.export as export_module

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the output folder was checked")

    monkeypatch.setattr(export_module, "load_checkpoint", never)
    assert main([str(runs["lora"]), "/proc/glm-ft-x/out"]) == 1
    assert capsys.readouterr().err.strip() == "error: OUT: cannot write into /proc/glm-ft-x (No such file or directory)"
