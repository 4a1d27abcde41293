"""The method registry: one module per conf/method file, each with the whole interface, no method name compared
outside glm_ft/methods/, and one dtype policy for training and inference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT, compose
from glm_ft import methods

INTERFACE = ("NAME", "KIND", "DESCRIPTION", "SUMMARY", "FROZEN_BASE", "WHOLE_MODEL", "PEFT_CONFIG_KEYS", "Schema",
             "validate", "peft_config", "apply", "save", "load_for_resume", "create_optimizer", "holds_checkpoint",
             "recorded_base", "hf_export_refusal", "load_onto")


def test_every_conf_method_file_has_its_module_and_back():
    files = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert files == set(methods.METHODS)
    for name, module in methods.METHODS.items():
        assert module.NAME == name and module.Schema().name == name
        assert [a for a in INTERFACE if not hasattr(module, a)] == []
        cfg = compose(["experiment=quickstart", f"method={name}"])
        assert cfg.method.name == name  # the shipped conf file composes onto its schema


def test_no_method_name_is_compared_outside_glm_ft_methods():
    names = "|".join(map(re.escape, methods.METHODS))
    compare = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names}|full)["']|["']({names})["']\s*(==|!=)""")
    found = []
    for path in (ROOT / "glm_ft").rglob("*.py"):
        if "methods" in path.relative_to(ROOT / "glm_ft").parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if compare.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


@pytest.mark.parametrize("name, kwargs, expect", [
    ("auto", {"method": "lora", "bf16": True}, "bfloat16"),  # a frozen base sits in the compute dtype
    ("auto", {"method": "ptuning_v2", "fp16": True}, "float16"),
    ("auto", {"method": "lora"}, "float32"),
    ("auto", {"method": "sft", "bf16": True}, "float32"),  # trained base weights keep fp32 masters
    ("auto", {"method": "freeze", "bf16": True}, "float32"),
    ("auto", {"device": "cpu"}, "float32"),  # inference on the CPU
    (None, {}, "float32"),
    ("bfloat16", {"method": "sft"}, "bfloat16"),  # a name wins
    ("float16", {"device": "cpu"}, "float16"),
])
def test_one_dtype_policy(name, kwargs, expect):
    import torch

    assert methods.torch_dtype(name, **kwargs) is getattr(torch, expect)


@pytest.mark.parametrize("name, method, kwargs", [
    ("bfloat16", "sft", {}),  # pure bf16
    ("bfloat16", "freeze", {"bf16": True}),
    ("bfloat16", "sft", {"bf16": True, "deepspeed": True}),  # DeepSpeed's bf16 mode
    ("float32", "sft", {"fp16": True}),
    ("auto", "freeze", {"fp16": True, "deepspeed": True}),
    ("float16", "lora", {"fp16": True}),  # the frozen base only: the adapter stays fp32
    ("bfloat16", "ptuning_v2", {"fp16": True, "deepspeed": True}),
])
def test_dtypes_a_method_can_train_in_pass(name, method, kwargs):
    flags = {"bf16": False, "fp16": False, "deepspeed": False, **kwargs}
    methods.check_training_dtype(name, method, **flags)
    assert methods.trainable_in_fp32(method) is methods.get(method).FROZEN_BASE


def test_a_bad_dtype_name_is_one_line():
    from glm_ft.errors import CheckpointError

    with pytest.raises(CheckpointError, match="dtype 'float64': expected auto, float32, bfloat16, float16"):
        methods.torch_dtype("float64")


def test_checkpoint_kinds_are_recognised_by_their_files(tmp_path: Path):
    kinds = {"lora": ["adapter_config.json"], "ptuning_v2": ["prefix_encoder.safetensors"],
             "freeze": ["trained_weights.safetensors"], "full": ["config.json", "model.safetensors"]}
    for name, files in kinds.items():
        folder = tmp_path / name
        folder.mkdir()
        for file in files:
            (folder / file).write_text("{}")
        assert methods.kind_of(folder) == name
    assert methods.kind_of(tmp_path) is None


def test_the_registry_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, glm_ft.methods, glm_ft.config.validate; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
