"""ROUGE/BLEU on Chinese: hand-checked values, and the reference demo's defects that the project must not repeat."""

import math

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score.rouge_scorer import RougeScorer

from glm_ft.train.metrics import METRIC_NAMES, JiebaTokenizer, compute_metrics, prefix_metrics

# jieba: 这/条/黑色/的/裙子/很/好看 (7) and 这/条/裙子/版型/宽松/，/穿着/很/舒适 (9)
PREDICTION = "这条黑色的裙子很好看"
REFERENCE = "这条裙子版型宽松，穿着很舒适"


@pytest.fixture(scope="module")
def tokenizer():
    return JiebaTokenizer()


def test_segmentation_the_hand_checks_rely_on(tokenizer):
    assert tokenizer.tokenize(PREDICTION) == ["这", "条", "黑色", "的", "裙子", "很", "好看"]
    assert tokenizer.tokenize(REFERENCE) == ["这", "条", "裙子", "版型", "宽松", "，", "穿着", "很", "舒适"]
    assert tokenizer.tokenize("line one\nline two") == ["line", "one", "line", "two"]


def test_identical_chinese_strings_score_full_marks():
    metrics = compute_metrics([REFERENCE], [REFERENCE])
    assert metrics == pytest.approx({"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 1.0})


def test_chinese_pair_matches_hand_computation():
    metrics = compute_metrics([PREDICTION], [REFERENCE])
    # shared unigrams 这 条 裙子 很: F = 2·4 / (7 + 9); shared bigram 这条 only: F = 2·1 / (6 + 8);
    # longest common subsequence 这 条 裙子 很 has length 4, like the unigrams
    assert metrics["rouge-1"] == pytest.approx(50.0)
    assert metrics["rouge-2"] == pytest.approx(100 * 2 / 14)
    assert metrics["rouge-l"] == pytest.approx(50.0)
    # BLEU: p1 = 4/7, p2 = 1/6, no 3- or 4-gram matches -> method 3 gives 1/(2·5) and 1/(4·4);
    # brevity penalty exp(1 − 9/7) as the prediction is shorter
    precisions = [4 / 7, 1 / 6, 1 / 10, 1 / 16]
    expected = math.exp(1 - 9 / 7) * math.exp(sum(0.25 * math.log(p) for p in precisions))
    assert metrics["bleu-4"] == pytest.approx(expected)


def test_chinese_is_not_scored_zero_as_with_rouge_scores_default_tokenizer():
    default = RougeScorer(["rouge1", "rouge2", "rougeL"]).score(REFERENCE, PREDICTION)
    assert all(score.fmeasure == 0.0 for score in default.values())
    assert compute_metrics([PREDICTION], [REFERENCE])["rouge-1"] == pytest.approx(50.0)


def test_empty_prediction_or_reference_scores_zero_for_its_sample():
    assert compute_metrics(["", " \n", PREDICTION], [REFERENCE, REFERENCE, "  "]) == dict.fromkeys(METRIC_NAMES, 0.0)
    # averaged over every sample, the empty one included
    metrics = compute_metrics([REFERENCE, ""], [REFERENCE, REFERENCE])
    assert metrics == pytest.approx({"rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0, "bleu-4": 0.5})


def test_whitespace_tokens_count_for_neither_metric():
    prediction, reference = "line one\nline two", "line one line two"
    assert compute_metrics([prediction], [reference]) == pytest.approx(
        {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 1.0})
    # the reference demo fed jieba's raw tokens, spaces and newline included, to BLEU
    import jieba

    naive = sentence_bleu([list(jieba.cut(reference))], list(jieba.cut(prediction)),
                          smoothing_function=SmoothingFunction().method3)
    assert naive < 0.5


def test_repeated_word_counts_with_multiplicity():
    # rouge-score semantics: 40 predicted 裙子 match the reference's single 裙子 once, P = 1/40, R = 1/9,
    # F = 2/49 = 4.08; rouge-chinese's default counted distinct unigrams and gave 2/(1 + 9) = 20.0
    metrics = compute_metrics(["裙子" * 40], [REFERENCE])
    assert metrics["rouge-1"] == pytest.approx(100 * 2 / 49)
    assert round(metrics["rouge-1"], 2) == 4.08
    assert metrics["rouge-l"] == pytest.approx(100 * 2 / 49)
    assert metrics["rouge-2"] == 0.0


def test_scores_are_averaged_over_samples():
    pair = compute_metrics([PREDICTION], [REFERENCE])
    both = compute_metrics([PREDICTION, REFERENCE], [REFERENCE, REFERENCE])
    assert both == pytest.approx({name: (pair[name] + full) / 2 for name, full in
                                  zip(METRIC_NAMES, (100.0, 100.0, 100.0, 1.0))})


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])


def test_no_samples_gives_zeros():
    assert compute_metrics([], []) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}


def test_prefix_metrics():
    assert prefix_metrics({"rouge-1": 1.5, "bleu-4": 0.1}, "eval") == {"eval_rouge-1": 1.5, "eval_bleu-4": 0.1}


def test_training_does_not_wait_on_the_scorers_imports():
    """jieba, rouge-score and NLTK load when a score is first computed, not when training's modules load."""
    import subprocess
    import sys

    code = ("import sys, glm_ft.train.finetune, glm_ft.train.evaluation; "
            "print(sorted(m for m in ('jieba', 'nltk', 'rouge_score') if m in sys.modules)); "
            "from glm_ft.train.metrics import compute_metrics; compute_metrics(['这条裙子'], ['这条裙子']); "
            "print(sorted(m for m in ('jieba', 'nltk', 'rouge_score') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "['jieba', 'nltk', 'rouge_score']"]
