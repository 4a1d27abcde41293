"""PEFT on the native model: LoRA on query_key_value (the reference's trainable size at 6B shape, merge, adapter
save/load), and PEFT's own prefix tuning reaching generate() despite the 5.24 cache keyword rename."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glm_ft.chatglm3.configuration import ChatGLMConfig
from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
from glm_ft.chatglm3.tiny import TINY_CONFIG

REAL_CONFIG = Path(__file__).resolve().parents[2].parent / "shared" / "chatglm3" / "config.json"


def lora_config(r: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"], task_type="CAUSAL_LM")


def base_model() -> ChatGLMForConditionalGeneration:
    torch.manual_seed(0)
    return ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict(TINY_CONFIG)).eval()


@pytest.fixture(scope="module")
def adapted():
    """A LoRA model whose B matrices are non-zero, so that the adapter changes the outputs."""
    from peft import get_peft_model

    model = get_peft_model(base_model(), lora_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def test_lora_size_at_chatglm3_6b_shape_is_that_of_the_reference():
    from peft import get_peft_model

    if not REAL_CONFIG.is_file():
        pytest.skip(f"real ChatGLM3 fixture absent: {REAL_CONFIG}")
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict(json.loads(REAL_CONFIG.read_text())))
    peft_model = get_peft_model(model, lora_config())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 1_949_696
    assert len(trainable) == 2 * 28 and all("query_key_value.lora_" in n for n in trainable)


def test_merge_and_unload_gives_the_adapter_model_outputs(adapted):
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    base = base_model()
    with torch.no_grad():
        with_adapter = adapted(input_ids=ids).logits
        adapted_out = adapted.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        assert not torch.allclose(with_adapter, base(ids).logits, atol=1e-3)

    from peft import get_peft_model

    copy = get_peft_model(base_model(), lora_config())
    copy.load_state_dict(adapted.state_dict())
    merged = copy.merge_and_unload().eval()
    assert type(merged) is ChatGLMForConditionalGeneration
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter, atol=1e-5)
        assert torch.equal(merged.generate(ids, max_new_tokens=5, do_sample=False), adapted_out)


def test_adapter_saves_as_safetensors_and_reloads_onto_a_fresh_base(adapted, tmp_path):
    from peft import PeftModel

    adapted.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["query_key_value"]
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted(input_ids=ids).logits)


def test_lora_trains_only_the_adapter():
    from peft import get_peft_model

    model = get_peft_model(base_model(), lora_config()).train()
    ids = torch.randint(3, 3000, (2, 8), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None, name
        else:
            assert param.grad is None and not param.requires_grad, name
    # B starts at zero, so only B moves on the first step
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_peft_prefix_tuning_is_used_by_generate():
    """PEFT still passes its prefix as `past_key_values` while generate() passes an empty `cache` (STACK_NOTES)."""
    from peft import PrefixTuningConfig, get_peft_model

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = base_model()
    with torch.no_grad():
        base_out = base.generate(ids, max_new_tokens=6, do_sample=False)
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
        generated = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        expected = ids
        for _ in range(6):
            next_id = model(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat((expected, next_id), dim=1)
    assert torch.equal(generated, expected)
    assert not torch.equal(generated, base_out)
