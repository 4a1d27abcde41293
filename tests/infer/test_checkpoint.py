"""Opening what training left (glm_ft.infer.checkpoint): which folder a run resolves to, the base model and its
override, a reference demo P-Tuning v2 checkpoint (chat and continued training), and the errors: a folder that holds no
model, a base model that can't be found, an adapter or prefix trained for another model shape."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import ROOT, run_process
from glm_ft.infer.checkpoint import FULL, LORA, PTUNING, find_checkpoint, load_checkpoint
from glm_ft.errors import CheckpointError
from inference_fixtures import (REFERENCE_PREFIX_TOKENS, TRAIN_ARGS, base_dir, greedy_reply,  # noqa: F401
                                other_shape_dir, reference_ptuning_dir, runs, train)

QUESTION = "类型#上衣*颜色#白色"


def chat_main(args: list) -> tuple[int, str]:
    import io

    from glm_ft.infer.chat import main

    out = io.StringIO()
    return main([*map(str, args), "--max-new-tokens", "8"], stdout=out), out.getvalue()


def test_prefix_file_names_are_those_the_prefix_module_writes():
    from glm_ft import runs as run_folder
    from glm_ft.infer import checkpoint
    from glm_ft.chatglm3 import prefix

    # one definition (glm_ft.runs), read by inference and written by the prefix module
    assert (checkpoint.PREFIX_WEIGHTS, run_folder.PREFIX_CONFIG) == (prefix.PREFIX_WEIGHTS, prefix.PREFIX_CONFIG)


def test_folder_without_a_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="holds no model") as err:
        find_checkpoint(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        find_checkpoint(tmp_path / "missing")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = run_process([sys.executable, "-m", "glm_ft.infer.chat", str(tmp_path), "--prompt", "hi"], cwd=ROOT)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path}: holds no model"), result.stderr


@pytest.mark.slow
def test_run_folder_resolves_to_final_then_newest_complete_checkpoint(runs, base_dir, tmp_path):
    lora = find_checkpoint(runs["lora"])
    assert (lora.path, lora.kind, lora.base_model) == (runs["lora"] / "final", LORA, base_dir)
    assert lora.run_info["method"]["name"] == "lora" and lora.tokenizer_dir == lora.path
    assert find_checkpoint(runs["ptuning_v2"]).kind == PTUNING
    sft = find_checkpoint(runs["sft"])
    assert (sft.kind, sft.base_model) == (FULL, None)

    # without final/: the newest checkpoint that is complete; a half-written one is never picked
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(runs["lora"] / "glm_ft_run.json", run)
    shutil.copytree(runs["lora"] / "checkpoint-2", run / "checkpoint-2")
    shutil.copytree(runs["lora"] / "checkpoint-2", run / "checkpoint-10")
    shutil.copytree(runs["lora"] / "checkpoint-2", run / "checkpoint-4")
    (run / "checkpoint-10" / "glm_ft_complete").unlink()
    assert find_checkpoint(run).path == run / "checkpoint-4"
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        find_checkpoint(run / "checkpoint-10")
    for ckpt in run.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    with pytest.raises(CheckpointError, match="without a complete checkpoint"):
        find_checkpoint(run)


@pytest.mark.slow
def test_missing_base_model_names_the_recorded_path_and_base_model_overrides_it(runs, base_dir, tmp_path):
    run = tmp_path / "moved_run"
    shutil.copytree(runs["lora"], run, ignore=shutil.ignore_patterns("checkpoint-*"))
    info = json.loads((run / "glm_ft_run.json").read_text())
    info["base_model"] = "/nowhere/chatglm3-6b"
    (run / "glm_ft_run.json").write_text(json.dumps(info))

    code, _ = chat_main([run, "--prompt", QUESTION])
    assert code == 1
    with pytest.raises(CheckpointError) as err:
        find_checkpoint(run)
    message = str(err.value)
    assert "/nowhere/chatglm3-6b" in message and "glm_ft_run.json" in message and "--base-model" in message

    assert find_checkpoint(run, base_model=base_dir).base_model == base_dir
    assert chat_main([run, "--base-model", base_dir, "--prompt", QUESTION]) == chat_main([runs["lora"], "--prompt",
                                                                                          QUESTION])


@pytest.mark.slow
def test_lora_adapter_on_a_model_of_another_shape_names_both_shapes(runs, other_shape_dir, capsys):
    with pytest.raises(CheckpointError, match="another model shape") as err:
        load_checkpoint(runs["lora"], other_shape_dir)
    message = str(err.value)
    # the tiny adapter: r 8 on hidden 64, the other model: hidden 32
    assert "[8, 64] in the adapter but [8, 32] for this model" in message, message
    assert "num_layers 3, hidden_size 32" in message

    capsys.readouterr()  # load_checkpoint above is not the CLI: its loading progress bars are not chat's output
    code, _ = chat_main([runs["lora"], "--base-model", other_shape_dir, "--prompt", QUESTION])
    assert code == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ") and "[8, 32]" in err_lines[0]


@pytest.mark.slow
def test_prefix_on_a_model_of_another_shape_names_both_shapes(runs, other_shape_dir):
    with pytest.raises(CheckpointError, match="another model shape") as err:
        load_checkpoint(runs["ptuning_v2"], other_shape_dir)
    # tiny: 2 layers * 2 * 2 groups * 16 = 128 per token; other: 3 * 2 * 2 * 8 = 96
    assert "is [4, 128], this model needs [4, 96]" in str(err.value), str(err.value)


@pytest.mark.slow
def test_full_model_config_with_pre_seq_len_but_no_prefix_weights_is_refused(reference_ptuning_dir, base_dir,
                                                                             tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(base_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pre_seq_len": 3}))
    with pytest.raises(CheckpointError, match="pre_seq_len=3 but the weights hold no"):
        load_checkpoint(folder)


@pytest.mark.slow
def test_reference_ptuning_checkpoint_chats_with_its_prefix(reference_ptuning_dir, base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = load_checkpoint(reference_ptuning_dir)
    assert loaded.checkpoint.kind == FULL
    assert loaded.model.config.pre_seq_len == REFERENCE_PREFIX_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(reference_ptuning_dir)
    by_hand = AutoModelForCausalLM.from_pretrained(reference_ptuning_dir).eval()
    expected = greedy_reply(by_hand, tokenizer, QUESTION, max_new_tokens=8)
    without_prefix = greedy_reply(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tokenizer, QUESTION,
                                  max_new_tokens=8)
    assert expected != without_prefix  # so the answer below shows that the prefix is used
    code, out = chat_main([reference_ptuning_dir, "--prompt", QUESTION])
    assert code == 0 and out.strip() == expected


@pytest.mark.slow
def test_reference_ptuning_checkpoint_continues_training_from_its_prefix(reference_ptuning_dir, tmp_path):
    from safetensors.torch import load_file

    name = "transformer.prefix_encoder.embedding.weight"
    run = train(tmp_path / "continued", "method=ptuning_v2", f"method.num_virtual_tokens={REFERENCE_PREFIX_TOKENS}",
                f"model.path={reference_ptuning_dir}")
    start = load_file(reference_ptuning_dir / "model.safetensors")[name]
    trained = load_file(run / "final" / "prefix_encoder.safetensors")[name]
    assert trained.shape == start.shape
    # Adam moves each weight by at most about the learning rate (1e-2) per step; a fresh prefix would be N(0, 1)
    # away from it.
    difference = (trained - start).abs().max().item()
    assert 0 < difference < 0.05, difference
    assert find_checkpoint(run).base_model == reference_ptuning_dir.resolve()


@pytest.mark.slow
def test_reference_ptuning_checkpoint_with_another_prefix_length_fails_clearly(reference_ptuning_dir, tmp_path):
    from conftest import run_train

    result = run_train([*TRAIN_ARGS, "method=ptuning_v2", "method.num_virtual_tokens=8",
                        f"model.path={reference_ptuning_dir}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 1
    assert f"set method.num_virtual_tokens={REFERENCE_PREFIX_TOKENS}" in result.stderr
    assert "Traceback" not in result.stderr
