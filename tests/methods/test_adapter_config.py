"""What glm-ft writes can be read by older tools: a trained LoRA run's adapter_config.json holds only fields PEFT 0.10
(the reference demo's pin) knows, and today's PEFT rebuilds the same adapter from it; the THUDM-layout export's
tokenizer_config.json carries the published added-token flags and no local path is in exported configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glm_ft.infer.export import export
from inference_fixtures import base_dir, runs  # noqa: F401

pytestmark = pytest.mark.slow

# The dataclass fields of PEFT 0.10.0's LoraConfig and its bases, read from peft-0.10.0-py3-none-any.whl
# (peft/config.py: PeftConfigMixin, PeftConfig; peft/tuners/lora/config.py: LoraConfig). LoraConfig(**json) there
# raises TypeError on any other key.
PEFT_0_10_LORA_FIELDS = {
    "peft_type", "auto_mapping",
    "base_model_name_or_path", "revision", "task_type", "inference_mode",
    "r", "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_config",
    "megatron_core", "loftq_config", "use_dora", "layer_replication",
}


def adapter_folders(run: Path) -> list[Path]:
    return [run / "final", *sorted(run.glob("checkpoint-*"))]


def test_every_saved_adapter_config_is_readable_by_peft_0_10(runs):
    folders = adapter_folders(runs["lora"])
    assert len(folders) == 2
    for folder in folders:
        written = json.loads((folder / "adapter_config.json").read_text())
        assert set(written) <= PEFT_0_10_LORA_FIELDS, set(written) - PEFT_0_10_LORA_FIELDS
        # what the run was configured with is all there (inference_tests' TRAIN_ARGS: method=lora defaults)
        configured = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules")
        assert {k: written[k] for k in configured} == {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8,
                                                      "lora_alpha": 32, "lora_dropout": 0.1,
                                                      "target_modules": ["query_key_value"]}


def test_todays_peft_rebuilds_the_same_adapter(runs, base_dir):
    from peft import LoraConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = runs["lora"] / "final"
    loaded = LoraConfig.from_pretrained(final)
    reference = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1,
                           target_modules=["query_key_value"], inference_mode=True,
                           base_model_name_or_path=loaded.base_model_name_or_path)
    assert loaded.to_dict() == reference.to_dict()  # every field PEFT has, restored to what training used

    # Logits of today's PEFT on the compact file against the LoRA update applied by hand from the raw tensors:
    # W + lora_alpha / r * B @ A on every query_key_value.
    ids = torch.tensor([[3001, 3003, 3006, 2487, 13, 2487, 2764, 3007]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final).eval()(
            input_ids=ids).logits
        by_hand = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        tensors = load_file(final / "adapter_model.safetensors")
        updated = 0
        for name, module in by_hand.named_modules():
            a = tensors.get(f"base_model.model.{name}.lora_A.weight")
            if a is not None:
                module.weight += 32 / 8 * tensors[f"base_model.model.{name}.lora_B.weight"] @ a
                updated += 1
        assert updated == by_hand.config.num_layers
        hand_logits = by_hand(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4)  # the adapter matters
    torch.testing.assert_close(peft_logits, hand_logits, atol=1e-5, rtol=1e-5)


def test_exported_tokenizer_config_has_the_published_added_tokens_and_no_local_paths(runs, tmp_path,
                                                                                     real_chatglm3_dir):
    from glm_ft.chatglm3.tokenization import SPECIAL_TOKENS

    out = export(runs["lora"], tmp_path / "exported")
    published = json.loads((real_chatglm3_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    written = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    n_published = min(map(int, published)) - SPECIAL_TOKENS.index("[gMASK]")  # the SentencePiece vocabulary size
    n_tiny = min(map(int, written)) - SPECIAL_TOKENS.index("[gMASK]")
    assert {int(i) - n_published: entry for i, entry in published.items()} == \
        {int(i) - n_tiny: entry for i, entry in written.items()}
    for name in ("config.json", "tokenizer_config.json"):
        text = (out / name).read_text()
        for local in (str(tmp_path), str(runs["lora"]), "/tmp", "/work", str(Path.home())):
            assert local not in text, (name, local)
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == "exported"
