"""`python -m glm_ft chat`: answers equal greedy generation by hand on LoRA, P-Tuning v2 and SFT runs; multi-turn
history re-encoded in ChatGLM3's format, system prompt, clear/exit, sampling with a seed."""

from __future__ import annotations

import io

import pytest

from glm_ft.infer.chat import main
from inference_fixtures import base_dir, greedy_reply, load_by_hand, runs  # noqa: F401

pytestmark = pytest.mark.slow

QUESTION = "类型#裙*颜色#红色*风格#简约"
FOLLOW_UP = "再短一点"
TOKENS = 12


def chat(args: list[str], stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    code = main([*map(str, args), "--max-new-tokens", str(TOKENS)], stdin=io.StringIO(stdin), stdout=out)
    return code, out.getvalue()


def replies(transcript: str) -> list[str]:
    """The streamed answers of an interactive transcript (each is followed by the next "User: " prompt)."""
    return [part.split("\n\nUser: ", 1)[0].strip() for part in transcript.split("Assistant: ")[1:]]


@pytest.fixture(scope="module")
def by_hand(runs, base_dir):
    return {method: load_by_hand(run, base_dir) for method, run in runs.items()}


@pytest.mark.parametrize("method", ["lora", "ptuning_v2", "sft"])
def test_prompt_answers_like_greedy_generate_by_hand(method, runs, by_hand):
    tokenizer, model = by_hand[method]
    expected = greedy_reply(model, tokenizer, QUESTION, max_new_tokens=TOKENS)
    assert expected  # an empty reply would make the comparison meaningless

    code, out = chat([runs[method], "--prompt", QUESTION])
    assert code == 0
    assert out.strip() == expected and out.endswith("\n")


def test_checkpoint_folder_and_run_folder_give_the_same_answer(runs):
    # checkpoint-2 and final/ hold the same weights (both written after step 2)
    assert chat([runs["lora"] / "checkpoint-2", "--prompt", QUESTION]) == chat([runs["lora"], "--prompt", QUESTION])


def test_multi_turn_with_system_prompt_clear_and_exit(runs, by_hand):
    tokenizer, model = by_hand["lora"]
    system = [{"role": "system", "content": "你是广告文案助手"}]
    first = greedy_reply(model, tokenizer, QUESTION, system, max_new_tokens=TOKENS)
    history = [*system, {"role": "user", "content": QUESTION}, {"role": "assistant", "content": first}]
    second = greedy_reply(model, tokenizer, FOLLOW_UP, history, max_new_tokens=TOKENS)
    assert first and second and first != second

    stdin = f"{QUESTION}\n{FOLLOW_UP}\nclear\n{FOLLOW_UP}\nexit\n{QUESTION}\n"
    code, out = chat([runs["lora"], "--system", system[0]["content"]], stdin)
    assert code == 0
    after_clear = greedy_reply(model, tokenizer, FOLLOW_UP, system, max_new_tokens=TOKENS)
    # "exit" stops before the last line: three answers, the third one without the cleared history
    assert replies(out) == [first, second, after_clear]
    assert "(history cleared)" in out


def test_end_of_input_ends_the_chat(runs):
    code, out = chat([runs["sft"]], f"{QUESTION}\n")
    assert code == 0
    assert len(replies(out)) == 1


def test_sampling_is_reproducible_with_a_seed_and_differs_from_greedy(runs):
    sample = [runs["lora"], "--prompt", QUESTION, "--do-sample", "--temperature", "1.0", "--top-p", "0.95"]
    first = chat([*sample, "--seed", "1"])
    assert first[0] == 0
    assert chat([*sample, "--seed", "1"]) == first
    assert chat([*sample, "--seed", "2"]) != first
    assert chat([runs["lora"], "--prompt", QUESTION]) != first


def test_sampling_options_need_do_sample(runs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs["lora"]), "--temperature", "0.5"])
    assert exit_info.value.code == 2
    assert "--do-sample" in capsys.readouterr().err


@pytest.mark.parametrize("args, expect", [(["--do-sample", "--temperature", "0"], "--temperature must be > 0"),
                                          (["--do-sample", "--temperature", "-1"], "--temperature must be > 0"),
                                          (["--do-sample", "--top-p", "2"], "--top-p must be in [0, 1]")])
def test_sampling_values_generate_refuses_are_usage_errors(runs, capsys, args, expect):
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs["lora"]), "--prompt", QUESTION, *args])
    assert exit_info.value.code == 2 and expect in capsys.readouterr().err


def test_a_message_that_does_not_fit_the_context_is_refused_and_the_history_kept(runs, by_hand, capsys):
    """The tiny model's context is 1,024 tokens: a message of thousands is not sent (it used to be generated from
    anyway, after the history was emptied), and the conversation goes on with its history."""
    tokenizer, model = by_hand["lora"]
    long = QUESTION * 300
    code = main([str(runs["lora"]), "--prompt", long, "--max-new-tokens", "8"], stdout=io.StringIO())
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: the message (") and "exceeds the model's context of 1024 tokens" in err[0]

    first = greedy_reply(model, tokenizer, QUESTION, max_new_tokens=TOKENS)
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first}]
    second = greedy_reply(model, tokenizer, FOLLOW_UP, history, max_new_tokens=TOKENS)
    code, out = chat([runs["lora"]], f"{QUESTION}\n{long}\n{FOLLOW_UP}\n")
    assert code == 0 and "(not sent: the message (" in out
    assert replies(out) == [first, second]
