"""The bench harness's own arithmetic and bookkeeping, never its timings: FLOP counts, ratios and goals, the
results schema and table, per-child and per-tree peak memory, the output event the first-step figure waits for, the
generated data, the reference-sample baseline, the memory figure's full-logits loss and the GPU script's CPU check."""

from __future__ import annotations

import json
import sys

import pytest

from bench import advertisegen
from bench.common import attention_pairs, matmul_params, run_measured, training_flops
from bench.generation import useful_tokens
from bench.results import (
    RATIO_SOURCES, check_goal, combine_rounds, compute_ratios, goal_values, max_rel_diff, results_name, summarize,
    table, validate_results,
)
from bench.run import interleave

CHATGLM3_6B_SHAPE = {
    "hidden_size": 4096, "num_layers": 28, "ffn_hidden_size": 13696, "kv_channels": 128, "num_attention_heads": 32,
    "multi_query_attention": True, "multi_query_group_num": 2, "padded_vocab_size": 65024,
}


def test_matmul_params_of_chatglm3_6b_match_its_published_parameter_count():
    # 6,243,584,000 parameters in the published checkpoint: the input embedding (65024 x 4096), the norms
    # (57 x 4096) and the qkv biases (28 x 4608) are the only parameters not multiplied through.
    published = 6_243_584_000
    not_matmul = 65024 * 4096 + 57 * 4096 + 28 * 4608
    assert matmul_params(CHATGLM3_6B_SHAPE) == published - not_matmul


def test_matmul_params_equal_the_linear_weights_of_a_real_model():
    torch = pytest.importorskip("torch")
    import glm_ft.chatglm3 as chatglm3
    from glm_ft.chatglm3.configuration import ChatGLMConfig
    from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
    from glm_ft.chatglm3.tiny import TINY_CONFIG

    chatglm3.register()
    model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict(TINY_CONFIG))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(TINY_CONFIG) == linear


def test_attention_pairs_count_the_causal_triangle_and_the_prefix():
    assert attention_pairs([1]) == 1
    assert attention_pairs([4]) == 10  # 1 + 2 + 3 + 4
    assert attention_pairs([4, 2]) == 13
    assert attention_pairs([3], prefix_len=5) == 6 + 15


def test_training_flops_are_6n_for_full_training_and_4n_for_a_frozen_base_plus_3x_attention():
    cfg = dict(CHATGLM3_6B_SHAPE)
    lens = [100, 50]
    n = matmul_params(cfg)
    attn = 4 * 28 * 32 * 128 * attention_pairs(lens)
    assert training_flops(cfg, lens) == 6 * n * 150 + 3 * attn
    assert training_flops(cfg, lens, all_weights_train=False) == 4 * n * 150 + 3 * attn
    with_prefix = training_flops(cfg, lens, all_weights_train=False, prefix_len=128)
    assert with_prefix - training_flops(cfg, lens, all_weights_train=False) == 3 * 4 * 28 * 32 * 128 * 150 * 128
    # the output layer counts only at the tokens that have a target (40 of 150): logits elsewhere are not useful work
    head = 4096 * 65024
    assert training_flops(cfg, lens, targets=40) == training_flops(cfg, lens) - 6 * head * (150 - 40)
    assert training_flops(cfg, lens, all_weights_train=False, targets=150) == \
        training_flops(cfg, lens, all_weights_train=False)


def test_goals_say_whether_they_are_met_and_by_how_much_they_miss():
    assert check_goal(3.0, ">=", 1.5) == {"value": 3.0, "op": ">=", "target": 1.5, "met": True, "gap": 0.5}
    missed = check_goal(1.2, ">=", 1.5)
    assert missed["met"] is False and missed["gap"] == 1.25
    assert check_goal(2.0, "<", 3.0)["met"] is True
    slow = check_goal(4.5, "<", 3.0)
    assert slow["met"] is False and slow["gap"] == 1.5
    assert check_goal(None, ">=", 1.5)["met"] is False
    with pytest.raises(ValueError):
        check_goal(1.0, ">", 2.0)


def _results(**overrides):
    figures = {"training_mid": {"sides": {"baseline": {"tokens_per_s": 100.0, "peak_rss_mib": 900.0},
                                          "glm_ft": {"tokens_per_s": 150.0, "peak_rss_mib": 950.0}}}}
    sources = {"training": ("training_mid", "tokens_per_s", "glm_ft", "baseline"),
               "absent": ("generation", "generated_tokens_per_s", "glm_ft", "baseline")}
    results = {
        "schema": "glm-ft-bench/1", "name": "cpu-x-2c", "created": "2026-01-01T00:00:00+00:00", "command": "x",
        "machine": {"cpu_model": "X", "cores": 2, "ram_gib": 24.0}, "versions": {}, "settings": {},
        "figures": figures, "ratio_sources": {k: list(v) for k, v in sources.items()},
        "ratios": compute_ratios(figures, sources), "goals": {},
    }
    results.update(overrides)
    return results


def test_ratios_follow_from_their_figures_and_missing_figures_give_none():
    results = _results()
    assert results["ratios"] == {"training": 1.5, "absent": None}
    assert validate_results(results) == []


def test_results_validation_catches_missing_keys_memory_and_inconsistent_ratios():
    assert "missing key 'machine'" in validate_results({k: v for k, v in _results().items() if k != "machine"})
    bad = _results()
    del bad["figures"]["training_mid"]["sides"]["glm_ft"]["peak_rss_mib"]
    assert validate_results(bad) == ["figures.training_mid.sides.glm_ft: missing peak_rss_mib"]
    edited = _results(ratios={"training": 2.0, "absent": None})
    assert any("ratios.training is 2.0" in p for p in validate_results(edited))


def test_results_name_is_stable_per_machine_kind():
    assert results_name({"cpu_model": "AMD EPYC", "cores": 2}) == "cpu-amd-epyc-2c"
    assert results_name({"cpu_model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cores": 8}) == \
        "cpu-intel-xeon-platinum-8481c-2-70ghz-8c"


def _round(step_s, digest="same"):
    return {"step_s": step_s, "step_tokens": [100, 300], "step_flops": [1e9, 3e9], "batches_digest": digest}


def test_rounds_of_the_same_steps_combine_through_per_step_minima():
    combined = combine_rounds([_round([1.0, 9.0]), _round([5.0, 3.0])])
    assert combined["timed_s"] == 4.0  # 1.0 from the first round, 3.0 from the second
    assert combined["tokens_per_s"] == 100.0
    assert combined["model_flops_per_s"] == 1e9
    assert combined["tokens_per_s_each_round"] == [40.0, 50.0]


def test_rounds_of_different_steps_fall_back_to_the_fastest_round():
    combined = combine_rounds([_round([1.0, 9.0], "a"), _round([5.0, 3.0], "b"), {"error": "crashed"}])
    assert combined["timed_s"] == 8.0 and combined["combined_from"] == 2
    assert "fastest round" in combined["estimator"]
    assert combine_rounds([{"error": "crashed"}]) == {"combined_from": 0}


def test_useful_tokens_stop_at_the_first_stop_token_or_the_batch_padding():
    assert useful_tokens([5, 6, 2, 0, 0], [2, 9]) == 3
    assert useful_tokens([5, 9, 2], [2, 9]) == 2
    assert useful_tokens([5, 6, -100, -100], [2]) == 2
    assert useful_tokens([5, 6, 7], [2]) == 3


def test_peak_memory_is_measured_per_child():
    touch = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.1)"
    big = run_measured([sys.executable, "-c", touch])
    small = run_measured([sys.executable, "-c", "import time; time.sleep(0.1)"])
    assert big["returncode"] == 0 and small["returncode"] == 0
    assert big["peak_rss_mib"] >= 300
    # its own peak: neither the maximum over all children so far nor this (torch-sized) test process's size
    assert small["peak_rss_mib"] is not None and small["peak_rss_mib"] < 100
    failing = run_measured([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"])
    assert failing["returncode"] == 3 and failing["output"].strip() == "out"
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow["timed_out"] and slow["returncode"] != 0


def test_generated_rows_are_deterministic_advertisegen_rows(tmp_path):
    rows = advertisegen.rows(300, seed=7)
    assert rows == advertisegen.rows(300, seed=7)
    assert rows != advertisegen.rows(300, seed=8)
    assert all(set(r) == {"content", "summary"} and r["content"].startswith("类型#") for r in rows)
    # AdvertiseGen-like spread: short and long replies both occur
    lengths = sorted(len(r["summary"]) for r in rows)
    assert lengths[len(lengths) // 10] < 60 < lengths[-len(lengths) // 10]
    path = advertisegen.write(tmp_path / "train.json", 5, seed=7)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows[:5]


def test_reference_samples_equal_glm_ft_training_samples_for_advertisegen_rows():
    # The preprocessing figure compares both sides' outputs; they must agree on what a sample is.
    from bench.preprocessing import reference_sample
    from glm_ft.chatglm3.tokenization import load_tiny_tokenizer
    from glm_ft.data.dataset import Message, build_train_sample

    tokenizer = load_tiny_tokenizer()
    for row in advertisegen.rows(50, seed=3):
        messages = (Message("user", row["content"]), Message("assistant", row["summary"]))
        ours = build_train_sample(messages, tokenizer, 64, 128)
        assert reference_sample(row, tokenizer, 64, 128) == {"input_ids": ours["input_ids"], "labels": ours["labels"]}


def test_tree_memory_counts_worker_processes():
    worker = ("import multiprocessing as mp, time\n"
              "def f(_):\n"
              "    b = bytearray(100 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)\n"
              "if __name__ == '__main__':\n"
              "    with mp.get_context('fork').Pool(2) as pool: pool.map(f, [1, 2], chunksize=1)\n")
    run = run_measured([sys.executable, "-c", worker], tree=True)
    assert run["returncode"] == 0
    assert run["peak_rss_mib"] < 100  # the parent alone allocated nothing
    assert run["max_processes"] == 3 and run["peak_tree_pss_mib"] >= 200
    assert run_measured([sys.executable, "-c", "pass"])["peak_tree_pss_mib"] is None


def test_every_ratio_in_the_table_is_in_glm_fts_favour_above_one():
    # rates: glm-ft / baseline; times and memory peaks: baseline / glm-ft
    figures = {
        "training_mid": {"sides": {"baseline": {"tokens_per_s": 100.0, "peak_rss_mib": 900.0, "mfu_float32": 0.4},
                                   "glm_ft": {"tokens_per_s": 150.0, "peak_rss_mib": 1800.0, "mfu_float32": 0.5}}},
        "first_step": {"sides": {"baseline": {"first_step_s": 10.0, "peak_tree_pss_mib": 1000.0},
                                 "glm_ft": {"first_step_s": 4.0, "peak_tree_pss_mib": 1250.0}}},
        "memory_mid": {"sides": {"full_logits": {"peak_rss_mib": 3000.0}, "glm_ft": {"peak_rss_mib": 1500.0}}},
    }
    ratios = compute_ratios(figures, RATIO_SOURCES)
    rows = {row["figure"]: row for row in table(figures, ratios)}
    assert rows["training tokens/s, mid"]["ratio"] == 1.5
    assert rows["peak RSS, training mid"]["ratio"] == 0.5
    assert rows["s to the first training step, tiny LoRA (baseline: reference script)"]["ratio"] == 2.5
    assert rows["peak PSS of the process tree, those jobs"]["ratio"] == 0.8
    memory = next(r for label, r in rows.items() if label.startswith("peak RSS, LoRA training mid, 65,024 vocab"))
    assert (memory["baseline"], memory["glm_ft"], memory["ratio"]) == (3000.0, 1500.0, 2.0)
    assert rows["model FLOP/s / fp32 matmul peak, mid (LoRA)"]["ratio"] is None  # shown, not a ratio
    assert not any(label.startswith("eval") for label in rows)  # figures not run leave no rows
    goals = goal_values(figures, ratios)
    assert goals["first_step_time_ratio"] == 2.5 and goals["first_step_memory_ratio"] == 0.8
    assert goals["training_tokens_per_s_ratio"] == 1.5 and goals["mid_training_mfu_fp32"] == 0.5


def test_sides_alternate_their_order_each_round():
    calls = []
    out = interleave(["baseline", "glm_ft"], 3, lambda name: calls.append(name) or len(calls))
    assert calls == ["baseline", "glm_ft", "glm_ft", "baseline", "baseline", "glm_ft"]
    assert out == {"baseline": [1, 4, 5], "glm_ft": [2, 3, 6]}


def test_repeated_runs_give_medians_and_the_highest_peak_and_count_failures():
    runs = [{"returncode": 0, "wall_s": 3.0, "peak_rss_mib": 10.0, "peak_tree_pss_mib": 30.0},
            {"returncode": 0, "wall_s": 1.0, "peak_rss_mib": 20.0, "peak_tree_pss_mib": 25.0},
            {"returncode": 0, "wall_s": 2.0, "peak_rss_mib": 15.0, "peak_tree_pss_mib": 40.0},
            {"returncode": 1, "wall_s": 0.1, "peak_rss_mib": 99.0, "peak_tree_pss_mib": 99.0}]
    out = summarize(runs, ["wall_s", "peak_tree_pss_mib"])
    assert out["wall_s"] == 2.0 and out["wall_s_each"] == [3.0, 1.0, 2.0]
    assert out["peak_rss_mib"] == 20.0 and out["peak_tree_pss_mib"] == 40.0 and out["failures"] == 1
    assert out["peak_tree_pss_mib_each"] == [30.0, 25.0, 40.0]


def test_loss_differences_are_relative_and_catch_different_samples():
    assert max_rel_diff({"a": 2.0, "b": 4.0}, {"a": 2.0, "b": 4.4}) == pytest.approx(0.1)
    assert max_rel_diff([8.0, 4.0], [8.0, 4.0]) == 0.0
    assert max_rel_diff({"a": 1.0}, {"b": 1.0}) == float("inf")
    assert max_rel_diff([1.0, 2.0], [1.0]) == float("inf")
    assert max_rel_diff(None, [1.0]) is None


def test_the_watched_output_event_is_timed_on_stdout_or_stderr():
    # the marker comes after a 0.3 s sleep in the child, so its time can't be earlier, however fast the machine
    child = ("import sys, time; print('starting', flush=True); time.sleep(0.3); "
             "print(\"{'loss': '8.0'}\", file=sys.stderr, flush=True)")
    run = run_measured([sys.executable, "-c", child], watch=b"'loss'")
    assert run["returncode"] == 0 and 0.3 <= run["watch_s"] <= run["wall_s"]
    assert "starting" in run["output"] and "'loss'" in run["output"]  # one stream, both kept
    assert run_measured([sys.executable, "-c", "print('no marker')"], watch=b"'loss'")["watch_s"] is None


def test_the_full_logits_loss_equals_the_models_chunked_loss_with_its_gradients():
    # The memory figure's 'before' side must do the same work as glm-ft's chunked loss.
    torch = pytest.importorskip("torch")
    from bench.training import full_logits_loss
    from glm_ft.chatglm3.modeling import chunked_causal_lm_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    layer = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 7))
    labels[:, :3] = -100
    results = []
    for loss_fn in (full_logits_loss, lambda *a: chunked_causal_lm_loss(*a, chunk=3)):
        hidden.grad, layer.weight.grad = None, None
        loss = loss_fn(hidden, layer, labels, torch.tensor(8))
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), layer.weight.grad.clone()))
    for full, chunked in zip(*results):
        torch.testing.assert_close(full, chunked)


def test_the_gpu_script_refuses_without_cuda_in_one_line_and_runs_its_cpu_check():
    torch = pytest.importorskip("torch")
    import subprocess

    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, "bench/gpu.py"], capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and refused.stderr.startswith("error: bench/gpu.py needs a CUDA GPU")
    smoke = subprocess.run([sys.executable, "bench/gpu.py", "--cpu-smoke"], capture_output=True, text=True,
                           timeout=600)
    assert smoke.returncode == 0, smoke.stderr[-2000:]
    lines = smoke.stdout.splitlines()
    assert lines[0].split()[:2] == ["method", "ckpt"] and len(lines) == 6  # header, 2 methods x 2, the peak line
