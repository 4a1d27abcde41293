"""finetune.yaml and the DeepSpeed JSON equal the documented files; "auto" is resolved as transformers does."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, SEED_DOC, compose
from glm_ft.errors import ConfigError
from glm_ft.config.ds_config import check_deepspeed, resolve_deepspeed
from glm_ft.config.render import finetune_dict, render_run_files

DOCUMENTED = ROOT / "tests" / "fixtures" / "documented"


def documented_yaml(name: str) -> dict:
    # OmegaConf reads `5e-5` as a float, as Hydra does; plain YAML 1.1 would read it as a string.
    return OmegaConf.to_container(OmegaConf.create((DOCUMENTED / name).read_text()))


def documented_json(name: str) -> dict:
    return json.loads((DOCUMENTED / name).read_text())


@pytest.mark.parametrize("name", ["lora.yaml", "sft.yaml", "ptuning_v2.yaml", "ds_zero_2.json", "ds_zero_3.json"])
def test_fixtures_are_the_documented_blocks(name):
    if not SEED_DOC.is_file():
        pytest.skip(f"{SEED_DOC} absent")
    block = re.search(r"#### " + re.escape(name) + r"\s*\n```\n(.*?)```", SEED_DOC.read_text(), re.S)
    assert block and block.group(1) == (DOCUMENTED / name).read_text()


@pytest.mark.parametrize("method", ["lora", "ptuning_v2", "sft"])
def test_finetune_yaml_equals_documented(method, tmp_path):
    cfg = compose([f"method={method}", "data=advertise_gen"])
    ds_path = tmp_path / "ds_config.json" if method == "sft" else None
    rendered = finetune_dict(cfg, tmp_path, ds_path)
    expected = documented_yaml(f"{method}.yaml")
    expected["training_args"]["output_dir"] = str(tmp_path)
    if method == "sft":
        assert expected["training_args"]["deepspeed"] == "ds_zero_3.json"
        expected["training_args"]["deepspeed"] = str(ds_path)
    assert rendered == expected
    assert list(rendered) == list(expected)  # same key order too: the user recognises their file


def test_finetune_yaml_shows_changed_settings(tmp_path):
    cfg = compose(["method.r=4", "training_args.bf16=true", "training_args.gradient_accumulation_steps=2",
                   "method.target_modules=[query_key_value,dense]"])
    rendered = finetune_dict(cfg, tmp_path, None)
    assert rendered["peft_config"]["r"] == 4
    assert rendered["peft_config"]["target_modules"] == ["query_key_value", "dense"]
    assert rendered["training_args"]["bf16"] is True
    assert rendered["training_args"]["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("stage, doc", [(2, "ds_zero_2.json"), (3, "ds_zero_3.json")])
def test_ds_config_equals_documented_and_resolves_every_auto(stage, doc, tmp_path):
    cfg = compose([f"deepspeed=zero{stage}"])
    paths = render_run_files(cfg, tmp_path, hidden_size=64)
    assert json.loads(paths["ds_config"].read_text()) == documented_json(doc)
    resolved_text = paths["ds_config_resolved"].read_text()
    assert '"auto"' not in resolved_text
    resolved = json.loads(resolved_text)
    assert resolved["train_micro_batch_size_per_gpu"] == 4
    if stage == 2:
        assert resolved["train_batch_size"] == 4 and resolved["gradient_clipping"] == 1.0
        assert resolved["zero_optimization"]["reduce_bucket_size"] == 5e8  # explicit, kept
    else:
        assert resolved["optimizer"]["params"] == {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
        assert resolved["zero_optimization"]["reduce_bucket_size"] == 64 * 64
        assert resolved["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
        assert resolved["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    finetune = OmegaConf.load(paths["finetune"])
    assert finetune.training_args.deepspeed == str(paths["ds_config"])


def test_resolution_matches_transformers(tmp_path, monkeypatch):
    """Our resolved file is what transformers' HfTrainerDeepSpeedConfig computes (both of its stages)."""
    pytest.importorskip("deepspeed")
    from transformers import Seq2SeqTrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    cfg = compose(["deepspeed=zero3", "training_args.per_device_train_batch_size=2",
                   "training_args.gradient_accumulation_steps=3", "training_args.learning_rate=1e-4",
                   "training_args.max_steps=40", "training_args.warmup_steps=5",
                   "+deepspeed.scheduler={type: WarmupDecayLR, params: {warmup_min_lr: auto, warmup_max_lr: auto, "
                   "warmup_num_steps: auto, total_num_steps: auto}}"])
    ours = resolve_deepspeed(cfg, hidden_size=32, num_training_steps=40)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                    gradient_accumulation_steps=3, learning_rate=1e-4, max_steps=40, warmup_steps=5,
                                    report_to="none", use_cpu=True)
    hf = HfTrainerDeepSpeedConfig(OmegaConf.to_container(cfg.deepspeed))
    hf.trainer_config_process(args)

    class Model:
        class config:
            hidden_size = 32

    hf.trainer_config_finalize(args, Model, 40)
    assert ours == hf.config


@pytest.mark.parametrize("overrides, keys", [
    (["deepspeed=zero2", "deepspeed.train_micro_batch_size_per_gpu=8", "training_args.per_device_train_batch_size=4"],
     ["deepspeed.train_micro_batch_size_per_gpu", "training_args.per_device_train_batch_size"]),
    (["deepspeed=zero2", "deepspeed.gradient_accumulation_steps=4"],
     ["deepspeed.gradient_accumulation_steps", "training_args.gradient_accumulation_steps"]),
    (["deepspeed=zero3", "deepspeed.optimizer.params.lr=0.1"],
     ["deepspeed.optimizer.params.lr", "training_args.learning_rate"]),
    (["deepspeed=zero2", "deepspeed.bf16.enabled=true"], ["deepspeed.bf16.enabled", "training_args.bf16"]),
    (["deepspeed=zero2", "deepspeed.zero_optimization.stage=4"], ["deepspeed.zero_optimization.stage"]),
    (["deepspeed=zero2", "deepspeed.fp16.enabled=true", "deepspeed.bf16.enabled=true"],
     ["deepspeed.fp16.enabled", "deepspeed.bf16.enabled"]),
    # a section of its own: transformers runs it and ignores training_args' optim or schedule without a word
    (["deepspeed=zero2", "training_args.lr_scheduler_type=cosine", "+deepspeed.scheduler={type: WarmupDecayLR, "
      "params: {warmup_min_lr: auto, warmup_max_lr: auto, warmup_num_steps: auto, total_num_steps: auto}}"],
     ["deepspeed.scheduler", "training_args.lr_scheduler_type=cosine"]),
    (["deepspeed=zero3", "training_args.optim=adafactor"], ["training_args.optim=adafactor", "~deepspeed.optimizer"]),
    (["deepspeed=zero3", "deepspeed.optimizer.type=Lamb"], ["deepspeed.optimizer.type=Lamb", "training_args.optim"]),
    (["deepspeed=zero3", "+deepspeed.optimizer.params.adam_w_mode=false"],
     ["deepspeed.optimizer.params.adam_w_mode", "training_args.optim"]),
])
def test_contradictions_fail_naming_both_keys(overrides, keys):
    with pytest.raises(ConfigError) as err:
        check_deepspeed(compose(overrides))
    for key in keys:
        assert key in str(err.value)


def test_consistent_explicit_values_pass():
    check_deepspeed(compose(["deepspeed=zero2", "deepspeed.train_micro_batch_size_per_gpu=4",
                             "deepspeed.train_batch_size=8", "training_args.gradient_accumulation_steps=2",
                             "deepspeed.gradient_accumulation_steps=2", "training_args.bf16=true",
                             "deepspeed.bf16.enabled=true"]))
    # ZeRO-3's AdamW section is training_args' AdamW, its values filled from them; without it, any optim
    check_deepspeed(compose(["deepspeed=zero3", "training_args.optim=adamw_torch"]))
    check_deepspeed(compose(["deepspeed=zero3", "~deepspeed.optimizer", "training_args.optim=adafactor"]))
