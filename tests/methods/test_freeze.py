"""method=freeze end to end at tiny size (2 layers): only the chosen layer and modules train, the checkpoint holds
only those tensors, resume continues, chat/predict answer as the base model with the tensors put in by hand, and
the export is the trained model (THUDM layout and --format hf)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_train
from inference_fixtures import TRAIN_ARGS, greedy_reply, load_by_hand

pytestmark = pytest.mark.slow

FREEZE = ["method=freeze", "method.num_trainable_layers=1", "method.trainable_modules=[transformer.output_layer.*]",
          "training_args.save_steps=1"]
QUESTION = "类型#裙*颜色#红色"
_cache: dict = {}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    if "run" not in _cache:
        run_dir = tmp_path_factory.mktemp("freeze") / "run"
        result = run_train([*TRAIN_ARGS, *FREEZE, f"hydra.run.dir={run_dir}"])
        assert result.returncode == 0, result.stderr[-3000:]
        _cache["run"] = run_dir
    return _cache["run"]


@pytest.fixture(scope="module")
def base(run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(json.loads((run / "glm_ft_run.json").read_text())["base_model"]).eval()


def chosen_names(model) -> set[str]:
    """Layer 1 of 2 (the last) and the output layer, by the model's own parameter names."""
    return {n for n, _ in model.named_parameters()
            if n.startswith("transformer.encoder.layers.1.") or n == "transformer.output_layer.weight"}


def logits(model, tokenizer):
    import torch

    with torch.no_grad():
        return model(input_ids=tokenizer.build_chat_input(QUESTION)["input_ids"]).logits.float()


def test_checkpoint_holds_only_the_chosen_tensors(run, base):
    from safetensors import safe_open

    for folder in (run / "checkpoint-1", run / "checkpoint-2", run / "final"):
        with safe_open(folder / "trained_weights.safetensors", framework="pt") as f:
            assert set(f.keys()) == chosen_names(base)
        assert not (folder / "config.json").exists()  # not a whole model: it opens on the base


def test_only_the_chosen_weights_changed_and_export_is_the_trained_model(run, base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm_ft.infer.checkpoint import load_checkpoint
    from glm_ft.infer.export import export

    exported = AutoModelForCausalLM.from_pretrained(export(run, tmp_path / "out", dtype="float32")).eval()
    before = base.state_dict()
    changed = {n for n, t in exported.state_dict().items() if not t.equal(before[n])}
    assert changed and changed <= chosen_names(base)
    assert {"transformer.encoder.layers.1.self_attention.query_key_value.weight",
            "transformer.output_layer.weight"} <= changed
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    trained = load_checkpoint(run, device="cpu").model
    _, by_hand = load_by_hand(run, Path(json.loads((run / "glm_ft_run.json").read_text())["base_model"]))
    assert logits(exported, tokenizer).equal(logits(trained, tokenizer))
    assert logits(by_hand, tokenizer).equal(logits(trained, tokenizer))


def test_hf_export_equals_the_trained_model(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm_ft.infer.checkpoint import load_checkpoint
    from glm_ft.infer.export import export

    out = export(run, tmp_path / "hf", dtype="float32", fmt="hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm"
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    glm = AutoModelForCausalLM.from_pretrained(out).eval()
    assert logits(glm, tokenizer).allclose(logits(load_checkpoint(run, device="cpu").model, tokenizer), atol=1e-5)


def test_resume_from_the_first_checkpoint_reaches_the_same_final_tensors(run, tmp_path):
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("final", "checkpoint-2", "glm_ft_progress.json"))
    result = run_train([*TRAIN_ARGS, *FREEZE, "resume=auto", f"hydra.run.dir={resumed}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {resumed / 'checkpoint-1'}" in result.stdout + result.stderr
    ours, theirs = (load_file(r / "final" / "trained_weights.safetensors") for r in (resumed, run))
    assert ours.keys() == theirs.keys() and all(ours[k].allclose(theirs[k], atol=1e-6) for k in ours)
    first = load_file(run / "checkpoint-1" / "trained_weights.safetensors")
    assert not all(first[k].equal(ours[k]) for k in ours)  # the resumed step trained on


def test_chat_and_predict_answer_like_greedy_generation_by_hand(run, tmp_path):
    from glm_ft.infer.chat import main as chat
    from glm_ft.infer.predict import main as predict

    tokenizer, model = load_by_hand(run, Path(json.loads((run / "glm_ft_run.json").read_text())["base_model"]))
    expected = greedy_reply(model, tokenizer, QUESTION, max_new_tokens=8)
    assert expected
    out = io.StringIO()
    assert chat([str(run), "--prompt", QUESTION, "--max-new-tokens", "8"], stdin=io.StringIO(), stdout=out) == 0
    assert out.getvalue().strip() == expected
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": QUESTION},
                                                  {"role": "assistant", "content": "好"}]}, ensure_ascii=False) + "\n")
    assert predict([str(run), str(data), "--out", str(tmp_path / "p.jsonl"), "--max-new-tokens", "8"]) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text())["prediction"] == expected


@pytest.mark.parametrize("args, expect", [
    (["method.num_trainable_layers=3"], "error: method.num_trainable_layers: 3 exceeds the model's 2 layers"),
    (["method.trainable_modules=[nothing.*]"], "error: method.trainable_modules: 'nothing.*' matches no parameter"),
])
def test_a_selection_the_model_lacks_is_one_line(args, expect, tmp_path):
    result = run_train([*TRAIN_ARGS, "method=freeze", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(expect) and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_an_explicit_bf16_dtype_trains_in_pure_bf16(tmp_path):
    """model.torch_dtype=bfloat16: the trained layers stay bf16 like the frozen ones (upcast alone to fp32 they
    met bf16 activations: the first forward failed on the dtype mismatch)."""
    import torch
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    result = run_train([*TRAIN_ARGS, *FREEZE, "model.torch_dtype=bfloat16", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.torch_dtype=bfloat16: method=freeze trains in pure bf16" in result.stdout + result.stderr
    trained = load_file(run_dir / "final" / "trained_weights.safetensors")
    assert {t.dtype for t in trained.values()} == {torch.bfloat16}
    state = torch.load(run_dir / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert {v.dtype for s in state.values() for k, v in s.items() if k != "step"} == {torch.bfloat16}
