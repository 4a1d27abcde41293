"""The config tree composes into the documented schema: groups, defaults, overrides (Hydra compose API)."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from conftest import compose
from glm_ft.errors import ConfigError
from glm_ft.config.schema import LoraMethod, PTuningV2Method, SftMethod
from glm_ft.config.validate import validate


def test_defaults_mirror_the_documented_demo():
    cfg = compose()
    assert OmegaConf.get_type(cfg.method) is LoraMethod
    assert (cfg.method.r, cfg.method.lora_alpha, cfg.method.lora_dropout) == (8, 32, 0.1)
    assert list(cfg.method.target_modules) == ["query_key_value"]
    assert cfg.deepspeed is None
    assert cfg.data.name == "advertise_gen" and cfg.data.data_dir == "data/AdvertiseGen"
    assert (cfg.data.train_file, cfg.data.val_file, cfg.data.test_file, cfg.data.num_proc) == (
        "train.json", "dev.json", "dev.json", 16)
    assert cfg.model.name == "chatglm3_6b" and not cfg.model.build_if_missing
    assert (cfg.max_input_length, cfg.max_output_length) == (256, 512)
    assert cfg.training_args.max_steps == 3000 and cfg.training_args.learning_rate == 5e-5


def test_ptuning_v2_defaults():
    cfg = compose(["method=ptuning_v2"])
    assert OmegaConf.get_type(cfg.method) is PTuningV2Method
    assert cfg.method.num_virtual_tokens == 128
    assert "r" not in cfg.method


def test_sft_has_no_peft_keys_and_chooses_zero3():
    cfg = compose(["method=sft"])
    assert OmegaConf.get_type(cfg.method) is SftMethod
    assert set(cfg.method.keys()) == {"name"}
    assert cfg.deepspeed.zero_optimization.stage == 3
    # ... and the user can still pick another stage or none at all.
    assert compose(["method=sft", "deepspeed=zero2"]).deepspeed.zero_optimization.stage == 2
    assert compose(["method=sft", "~deepspeed"]).deepspeed is None


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_group(stage):
    cfg = compose([f"deepspeed=zero{stage}"])
    assert cfg.deepspeed.zero_optimization.stage == stage
    cfg = compose(["deepspeed=zero3", "deepspeed.zero_optimization.stage3_max_live_parameters=5e8"])
    assert cfg.deepspeed.zero_optimization.stage3_max_live_parameters == 5e8


def test_quickstart_switches_to_tiny_model_and_sample_data():
    cfg = compose(["experiment=quickstart"])
    assert cfg.model.name == "tiny" and cfg.model.build_if_missing
    assert cfg.data.name == "sample"
    assert cfg.data.data_dir.endswith("data/sample")
    # A random tiny base has nothing for LoRA to adapt: the quickstart trains all weights, without DeepSpeed.
    assert cfg.method.name == "sft" and cfg.deepspeed is None
    assert (cfg.max_input_length, cfg.max_output_length) == (64, 64)
    lora = compose(["experiment=quickstart", "method=lora", "method.r=4"])
    assert lora.method.r == 4 and lora.model.name == "tiny"


def test_documented_top_level_keys_are_overridable():
    cfg = compose(["training_args.max_steps=1234", "max_input_length=128", "method.r=4", "method.lora_alpha=16",
                   "data.data_dir=/somewhere", "model.path=/models/glm"])
    assert cfg.training_args.max_steps == 1234 and cfg.max_input_length == 128
    assert (cfg.method.r, cfg.method.lora_alpha) == (4, 16)
    assert cfg.data.data_dir == "/somewhere" and cfg.model.path == "/models/glm"
    assert compose(["method=ptuning_v2", "method.num_virtual_tokens=32"]).method.num_virtual_tokens == 32


@pytest.mark.parametrize("overrides", [["method.r=abc"], ["method.rr=4"], ["training_args.max_stepz=1"],
                                       ["method=sft", "method.r=4"], ["deepspeed=zero2", "deepspeed.foo=1"]])
def test_types_and_unknown_keys_rejected_at_compose(overrides):
    with pytest.raises(ConfigCompositionException):
        compose(overrides)


def test_unknown_group_choice_rejected():
    with pytest.raises(MissingConfigException, match="lora"):
        compose(["method=qlora"])


@pytest.mark.parametrize("overrides, key", [
    (["+method.rr=4"], "method.rr"),
    (["method=sft", "+method.r=4"], "method.r"),
    (["+training_args.foo=1"], "training_args.foo"),
    (["method.r=0"], "method.r"),
    (["method.lora_alpha=-1"], "method.lora_alpha"),
    (["method.lora_dropout=1.0"], "method.lora_dropout"),
    (["method.lora_dropout=-0.1"], "method.lora_dropout"),
    (["method=ptuning_v2", "method.num_virtual_tokens=0"], "method.num_virtual_tokens"),
    (["max_input_length=0"], "max_input_length"),
    (["max_output_length=-5"], "max_output_length"),
    (["training_args.evaluation_strategy=sometimes"], "training_args.evaluation_strategy"),
    (["training_args.per_device_train_batch_size=0"], "training_args.per_device_train_batch_size"),
    (["training_args.fp16=true", "training_args.bf16=true"], "training_args.fp16"),
    (["method.peft_type=PREFIX_TUNING"], "method.peft_type"),
    (["model.torch_dtype=float64"], "model.torch_dtype"),
    (["model.attn_implementation=flash"], "model.attn_implementation"),
])
def test_semantic_errors_name_the_key(overrides, key):
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, check_paths=False)
    assert key in str(err.value)


def test_sft_with_peft_key_says_why():
    with pytest.raises(ConfigError, match="takes no PEFT keys"):
        validate(compose(["method=sft", "+method.lora_alpha=4"]), check_paths=False)


def test_fp16_without_cuda_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="training_args.fp16"):
        validate(compose(["training_args.fp16=true"]), check_paths=False)


def test_missing_model_and_data_paths_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="model.path: .*nope.*experiment=quickstart"):
        validate(compose([f"model.path={tmp_path}/nope"]))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"data\.data_dir.*experiment=quickstart"):
        validate(compose([f"model.path={tmp_path}/m", f"data.data_dir={tmp_path}/data"]))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("")
    with pytest.raises(ConfigError, match=r"dev\.json.*data\.val_file"):
        validate(compose([f"model.path={tmp_path}/m", f"data.data_dir={tmp_path}/data"]))


def test_shipped_training_args_all_reach_transformers():
    """Every schema key maps onto a Seq2SeqTrainingArguments field (after glm-ft's documented translations), or is
    an argument of transformers' EarlyStoppingCallback."""
    import dataclasses
    import inspect

    from transformers import EarlyStoppingCallback, Seq2SeqTrainingArguments

    from glm_ft.config.schema import TrainingArgs
    from glm_ft.train.trainer_args import NOT_TRAINER_KEYS, TRANSLATED_KEYS

    hf = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    assert set(NOT_TRAINER_KEYS) <= set(inspect.signature(EarlyStoppingCallback).parameters)
    for f in dataclasses.fields(TrainingArgs):
        assert TRANSLATED_KEYS.get(f.name, f.name) in hf or f.name in NOT_TRAINER_KEYS, f.name
