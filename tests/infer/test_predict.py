"""`python -m glm_ft predict`: one row per assistant turn in file order, batched with left padding, metrics as in
evaluation, written beside the predictions and printed."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from glm_ft.infer.predict import main
from inference_fixtures import base_dir, greedy_reply, load_by_hand, runs  # noqa: F401

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "你是广告文案助手"}
# A .json array (the reference demo's format), with a multi-turn conversation, a system prompt and an AdvertiseGen
# row; the prompts differ in length, so sorting by length reorders the samples.
ROWS = [
    {"conversations": [{"role": "user", "content": "类型#裙*颜色#红色*风格#简约*图案#条纹"},
                       {"role": "assistant", "content": "这款红色连衣裙简约大方。"}]},
    {"content": "类型#上衣", "summary": "一件上衣。"},
    {"conversations": [SYSTEM,
                       {"role": "user", "content": "类型#裤*材质#牛仔布"},
                       {"role": "assistant", "content": "牛仔裤耐穿。"},
                       {"role": "user", "content": "再写一句"},
                       {"role": "assistant", "content": "百搭又显瘦。"}]},
]
REFERENCES = ["这款红色连衣裙简约大方。", "一件上衣。", "牛仔裤耐穿。", "百搭又显瘦。"]
TOKENS = 6
MAX_INPUT = 200  # no prompt is cut, so each equals the one built by hand


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("predict_data") / "rows.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def predicted(runs, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_out") / "new" / "predictions.jsonl"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([str(runs["lora"]), str(data_file), "--out", str(out), "--batch-size", "3",
                     "--max-new-tokens", str(TOKENS), "--max-input-length", str(MAX_INPUT)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return out, rows, json.loads(printed.getvalue())


@pytest.fixture(scope="module")
def hand(runs, base_dir):
    return load_by_hand(runs["lora"], base_dir)


def test_one_row_per_assistant_turn_in_file_order(predicted, data_file, hand, runs):
    from glm_ft.data.dataset import build_eval_samples, read_conversations

    tokenizer, _ = hand
    _, rows, _ = predicted
    max_output = json.loads((runs["lora"] / "glm_ft_run.json").read_text())["max_output_length"]
    samples = [s for c in read_conversations(data_file)
               for s in build_eval_samples(c.messages, tokenizer, MAX_INPUT, max_output)]
    assert [r["reference"] for r in rows] == REFERENCES
    assert [r["prompt"] for r in rows] == [tokenizer.decode(s["input_ids"]) for s in samples]
    assert rows[3]["prompt"].startswith("[gMASK]sop<|system|>") and "牛仔裤耐穿。" in rows[3]["prompt"]


def test_predictions_equal_greedy_generation_one_prompt_at_a_time(predicted, hand):
    tokenizer, model = hand
    _, rows, _ = predicted
    # (query, history) of each sample, as ChatGLM3's build_chat_input takes them
    prompts = [(ROWS[0]["conversations"][0]["content"], []), (ROWS[1]["content"], []),
               ("类型#裤*材质#牛仔布", [SYSTEM]), ("再写一句", ROWS[2]["conversations"][:3])]
    expected = [greedy_reply(model, tokenizer, query, history, max_new_tokens=TOKENS) for query, history in prompts]
    assert all(expected)
    # batches of 3 sorted by length: the three shorter prompts are left-padded together, the longest runs alone
    assert [r["prediction"] for r in rows] == expected


def test_metrics_are_printed_and_written_beside_the_predictions(predicted):
    from glm_ft.train.metrics import compute_metrics

    out, rows, printed = predicted
    written = json.loads((out.parent / "test_metrics.json").read_text())
    assert written == printed
    expected = compute_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert {k: written[f"test_{k}"] for k in expected} == pytest.approx(expected)
    assert written["test_samples"] == 4


def test_bad_data_file_fails_with_its_line_before_loading(runs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "a", "summary": "b"}\n{"conversations": [{"role": "robot", "content": "x"}]}\n')
    assert main([str(runs["lora"]), str(bad), "--out", str(tmp_path / "p.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:2: ") and "robot" in err and "\n" not in err
    assert not (tmp_path / "p.jsonl").exists()


def test_an_output_path_that_cannot_be_written_is_one_line_before_generating(runs, data_file, tmp_path,
                                                                            monkeypatch, capsys):
    import glm_ft.infer.checkpoint as checkpoint_module

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", never)
    assert main([str(runs["lora"]), str(data_file), "--out", "/proc/glm-ft-x/p.jsonl"]) == 1
    assert capsys.readouterr().err.strip() == \
        "error: --out: cannot write into /proc/glm-ft-x (No such file or directory)"
    assert main([str(runs["lora"]), str(data_file), "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"error: --out: {tmp_path} is a folder; name the predictions")


# A run trained with data.skip_bad_rows=true wrote predictions.jsonl without its file's unusable rows: predict reads
# the file as the run read its test file, not stopping at the first unusable row.
GOOD = [
    {"content": "类型#上衣", "summary": "一件上衣。"},
    {"conversations": [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "一条裙子。"}]},
]
BAD = {"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from glm_ft.chatglm3.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-chatglm3")


def _run(tmp_path, model_folder, **recorded):
    """A run folder as training leaves it: glm_ft_run.json beside a complete full-model checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(model_folder, run / "final")
    (run / "final" / "glm_ft_complete").write_text("{}\n")
    info = {"base_model": str(model_folder), "method": {"name": "sft"}, "max_input_length": 32,
            "max_output_length": 8, "generation_config": {"max_new_tokens": 2, "do_sample": False}, **recorded}
    (run / "glm_ft_run.json").write_text(json.dumps(info))
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (GOOD[0], BAD, GOOD[1])),
                    encoding="utf-8")
    return run / "final", data


def test_a_run_that_skipped_bad_rows_predicts_its_file_the_same_way(tmp_path, model_folder):
    checkpoint, data = _run(tmp_path, model_folder, skip_bad_rows=True)
    out = tmp_path / "p.jsonl"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(checkpoint), str(data), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["reference"] for r in rows] == ["一件上衣。", "一条裙子。"]


def test_without_skip_bad_rows_the_bad_row_is_still_named(tmp_path, model_folder, capsys):
    checkpoint, data = _run(tmp_path, model_folder, skip_bad_rows=True)
    assert main([str(checkpoint), str(data), "--out", str(tmp_path / "p.jsonl"), "--no-skip-bad-rows"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {data}:2: ")
    checkpoint, data = _run(tmp_path / "old", model_folder)  # a run recorded before the setting was: as before
    assert main([str(checkpoint), str(data), "--out", str(tmp_path / "p.jsonl")]) == 1
