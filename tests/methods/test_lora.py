"""method=lora's PEFT variants end to end at tiny size, each held against PEFT itself: DoRA and rsLoRA (the flags in
adapter_config.json; glm-ft's loader and PeftModel.from_pretrained give the same model), PiSSA and OLoRA (saved
converted to a plain LoRA that PEFT opens on the unchanged base; the export equals it; resume continues from the
trained ranks), LoRA+ (the optimizer's learning rates), and the options among the run's MLflow params."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import compose, run_train
from inference_fixtures import TRAIN_ARGS, greedy_reply, load_by_hand

pytestmark = pytest.mark.slow

RUNS = {
    # LoRA+ and the MLflow check ride on the DoRA run: one training run covers all three.
    "dora": ["method.use_dora=true", "method.use_rslora=true", "method.loraplus_lr_ratio=16",
             "tracking.enabled=true"],
    "pissa": ["method.init_lora_weights=pissa"],
    "olora": ["method.init_lora_weights=olora"],
}
QUESTION = "类型#裙*颜色#红色"
_cache: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """variant -> run folder, trained 2 steps with a checkpoint at each step."""
    if "runs" not in _cache:
        root = tmp_path_factory.mktemp("lora_variants")

        def train(name: str) -> Path:
            run_dir = root / name
            result = run_train([*TRAIN_ARGS, "method=lora", "training_args.save_steps=1", *RUNS[name],
                                f"hydra.run.dir={run_dir}"], env={"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"})
            assert result.returncode == 0, result.stderr[-3000:]
            return run_dir

        with ThreadPoolExecutor(len(RUNS)) as pool:
            _cache["runs"] = dict(zip(RUNS, pool.map(train, RUNS)))
        _cache["store"] = f"sqlite:///{root}/mlflow.db"
    return _cache["runs"]


def base_dir(run: Path) -> Path:
    return Path(json.loads((run / "glm_ft_run.json").read_text())["base_model"])


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def ids(runs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir(runs["dora"]))
    return tokenizer.build_chat_input(QUESTION)["input_ids"]


def test_dora_and_rslora_flags_are_saved_and_peft_opens_the_same_model(runs, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from glm_ft.infer.checkpoint import load_checkpoint

    final = runs["dora"] / "final"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    ours = load_checkpoint(runs["dora"], device="cpu").model
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir(runs["dora"])), final).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir(runs["dora"])).eval()
    assert logits(ours, ids).equal(logits(peft, ids))
    assert not logits(base, ids).allclose(logits(peft, ids), atol=1e-4)  # the adapter changes the model


@pytest.mark.parametrize("variant", ["pissa", "olora"])
def test_pissa_olora_export_equals_the_base_plus_the_converted_adapter_in_peft(variant, runs, ids, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from glm_ft.infer.export import export

    final = runs[variant] / "final"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["r"] == 16 and saved.get("init_lora_weights", True) is True  # rank 2r, a plain LoRA now
    base = AutoModelForCausalLM.from_pretrained(base_dir(runs[variant])).eval()
    expected = logits(PeftModel.from_pretrained(base, final).eval(), ids)
    exported = AutoModelForCausalLM.from_pretrained(export(runs[variant], tmp_path / "out", dtype="float32")).eval()
    assert logits(exported, ids).allclose(expected, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(base_dir(runs[variant])).eval()
    assert not logits(plain, ids).allclose(expected, atol=1e-4)


def test_pissa_converted_adapter_equals_the_trained_pissa_model(runs, ids):
    """PEFT's own PiSSA init of the base with the trained ranks (the first r of the converted adapter, what resume
    loads) computes what the converted adapter on the unchanged base computes."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = runs["pissa"] / "final"
    converted = load_file(final / "adapter_model.safetensors")
    r = 8
    trained = {k: v[:r] if ".lora_A." in k else v[:, :r] for k, v in converted.items()}
    pissa = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir(runs["pissa"])),
                           LoraConfig(r=r, lora_alpha=32, target_modules=["query_key_value"], lora_dropout=0.0,
                                      init_lora_weights="pissa"))
    set_peft_model_state_dict(pissa, trained)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir(runs["pissa"])), final)
    assert logits(pissa.eval(), ids).allclose(logits(plain.eval(), ids), atol=1e-5)


def test_pissa_resume_from_the_first_checkpoint_reaches_the_same_final_adapter(runs, tmp_path):
    from safetensors.torch import load_file

    straight = runs["pissa"]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("final", "checkpoint-2", "glm_ft_progress.json"))
    result = run_train([*TRAIN_ARGS, "method=lora", "method.init_lora_weights=pissa", "training_args.save_steps=1",
                        "resume=auto", f"hydra.run.dir={resumed}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {resumed / 'checkpoint-1'}" in result.stdout + result.stderr
    ours, theirs = (load_file(run / "final" / "adapter_model.safetensors") for run in (resumed, straight))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].allclose(theirs[k], atol=1e-6) for k in ours)


def test_chat_and_predict_answer_like_peft_greedy_generation(runs, tmp_path):
    from glm_ft.infer.chat import main as chat
    from glm_ft.infer.predict import main as predict

    tokenizer, model = load_by_hand(runs["pissa"], base_dir(runs["pissa"]))
    expected = greedy_reply(model, tokenizer, QUESTION, max_new_tokens=8)
    out = io.StringIO()
    args = [str(runs["pissa"]), "--prompt", QUESTION, "--max-new-tokens", "8"]
    assert chat(args, stdin=io.StringIO(), stdout=out) == 0
    assert out.getvalue().strip() == expected
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": QUESTION},
                                                  {"role": "assistant", "content": "好"}]}, ensure_ascii=False) + "\n")
    assert predict([str(runs["pissa"]), str(data), "--out", str(tmp_path / "p.jsonl"), "--max-new-tokens", "8"]) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text())["prediction"] == expected


def test_loraplus_optimizer_gives_lora_b_the_ratio_of_the_learning_rate(runs):
    from glm_ft.config.paths import input_paths
    from glm_ft.model import base_model_dir, load_model_for_training
    from glm_ft.train.trainer import GlmTrainer
    from glm_ft.train.trainer_args import build_training_arguments

    cfg = compose(["experiment=quickstart", "method=lora", "method.loraplus_lr_ratio=16", "data.val_file=null",
                   "training_args.learning_rate=1e-3", f"model.path={base_dir(runs['dora'])}"])
    model = load_model_for_training(cfg, base_model_dir(input_paths(cfg)))
    args = build_training_arguments(cfg, runs["dora"] / "unused", None, has_eval=False, generation_config=None)
    optimizer = GlmTrainer(model=model, args=args, method=cfg.method, gen_config=None).create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == set(names)  # every trainable parameter, nothing else
    for pid, name in names.items():
        assert lr_of[pid] == pytest.approx(1e-3 * (16 if ".lora_B." in name else 1)), name


def test_mlflow_params_hold_the_lora_options(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(_cache["store"])
    [run] = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    params = run.data.params
    assert (params["method.use_dora"], params["method.use_rslora"]) == ("true", "true")
    assert params["method.init_lora_weights"] == "true" and float(params["method.loraplus_lr_ratio"]) == 16
    assert run.data.tags["glm_ft.method"] == "lora"


def test_the_modules_lora_may_target_are_the_models_own():
    """lora.MODULES (checked before the model loads) against the real ChatGLM3's Linear and Embedding layers; a
    dotted target that matches nothing is refused in one line once the model is there."""
    import torch
    from omegaconf import OmegaConf

    from glm_ft.chatglm3.configuration import ChatGLMConfig
    from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
    from glm_ft.chatglm3.tiny import TINY_CONFIG
    from glm_ft.errors import ConfigError
    from glm_ft.methods import lora

    model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict(TINY_CONFIG))
    wrappable = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))}
    assert wrappable == set(lora.MODULES)
    method = OmegaConf.structured(lora.Schema(target_modules=["self_attention.nope"]))
    with pytest.raises(ConfigError, match=r"^method.target_modules: \['self_attention.nope'\] match no module"):
        lora.apply(model, method, 42)
    method = OmegaConf.structured(lora.Schema(target_modules=["self_attention.dense", "output_layer"]))
    wrapped = lora.apply(model, method, 42)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters() if "lora_A" in n} == \
        {"dense", "output_layer"}


# An adapter whose target_modules name some layers only opens as stock PEFT opens it (glm-ft's shape check refused
# it); LoRA+ keeps training_args.weight_decay (PEFT's per-group loraplus_weight_decay, 0.0 by default, overrode it).
# A tiny model built in the process, no training run.
def _tiny(num_layers: int = 2):
    import torch

    from glm_ft.chatglm3.configuration import ChatGLMConfig
    from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
    from glm_ft.chatglm3.tiny import TINY_CONFIG

    torch.manual_seed(0)
    return ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict({**TINY_CONFIG, "num_layers": num_layers}))


def _adapter(tmp_path, target_modules, num_layers: int = 2):
    import torch
    from omegaconf import OmegaConf

    from glm_ft.methods import lora

    model = lora.apply(_tiny(num_layers), OmegaConf.structured(lora.Schema(target_modules=target_modules)), 0)
    with torch.no_grad():  # B = 0 at init: give the adapter a delta to see
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.1)
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    return model, folder


def test_adapter_on_some_layers_only_opens_as_peft_opens_it(tmp_path):
    import torch
    from peft import PeftModel

    from glm_ft.methods import lora

    target = "encoder.layers.1.self_attention.query_key_value"
    trained, folder = _adapter(tmp_path, [target])
    ckpt = SimpleNamespace(path=folder, base_model=tmp_path / "base")
    ours = lora.load_onto(_tiny(), ckpt, merge=True)  # was: CheckpointError "covers 1 layers, ... has 2"
    reference = PeftModel.from_pretrained(_tiny(), str(folder)).merge_and_unload()  # stock PEFT
    ids = torch.randint(3, 3000, (2, 7))
    with torch.no_grad():
        expected = reference.eval()(input_ids=ids).logits
        assert torch.allclose(ours.eval()(input_ids=ids).logits, expected, atol=1e-6)
        assert torch.allclose(trained.eval()(input_ids=ids).logits, expected, atol=1e-5)
    # W + (alpha / r) B A on layer 1 only, by hand
    base = _tiny().state_dict()
    merged = ours.state_dict()
    name = "transformer." + target
    a, b = (trained.state_dict()[f"base_model.model.{name}.lora_{x}.default.weight"] for x in "AB")
    assert torch.allclose(merged[name + ".weight"], base[name + ".weight"] + (32 / 8) * b @ a, atol=1e-6)
    assert all(torch.equal(merged[k], base[k]) for k in base if k != name + ".weight")


def test_adapter_trained_on_fewer_layers_is_still_refused(tmp_path):
    from glm_ft.errors import CheckpointError
    from glm_ft.methods import lora

    _, folder = _adapter(tmp_path, ["query_key_value"], num_layers=2)
    with pytest.raises(CheckpointError, match=r"another model shape.*covers 2 layers"):
        lora.check_adapter_fits(_tiny(3), folder, tmp_path / "base")


def test_loraplus_keeps_the_trainers_weight_decay():
    from omegaconf import OmegaConf
    from transformers import Seq2SeqTrainingArguments

    from glm_ft.methods import lora

    method = OmegaConf.structured(lora.Schema(loraplus_lr_ratio=16))
    model = lora.apply(_tiny(), method, 0)
    args = Seq2SeqTrainingArguments(output_dir="unused", learning_rate=1e-3, weight_decay=0.1, use_cpu=True,
                                    report_to="none")
    optimizer = lora.create_optimizer(model, args, method)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay_of) == set(names)
    # the Trainer's own optimizer (plain LoRA) decays every LoRA matrix by training_args.weight_decay
    assert {names[pid]: decay for pid, decay in decay_of.items()} == {name: 0.1 for name in names.values()}
