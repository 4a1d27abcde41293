"""ROUGE-1/2/L and BLEU-4 on Chinese text, on the same scale as the reference fine-tuning demo.

Both metrics are computed per sample on jieba words and averaged:
- "rouge-1", "rouge-2", "rouge-l": rouge-score F-measure × 100 (0..100).
- "bleu-4": NLTK sentence BLEU, weights 0.25 each, smoothing method 3, NOT × 100 (0..1).

Where this differs from the demo, on purpose:
- rouge-score, not rouge-chinese: n-grams count with multiplicity, so repeating a word is not rewarded.
- whitespace tokens are dropped before both metrics; the demo's BLEU counted them, its ROUGE did not.
- an empty (or whitespace-only) prediction or reference scores 0 for its sample instead of crashing.
"""

from __future__ import annotations

import logging

# jieba, rouge-score and NLTK (which rouge-score imports whole, scipy.stats included) are imported where a score
# is computed: together ~2 s and ~60 MiB of imports that training's first step need not wait for
# (bench/README.md, start-up), and a run that never scores never loads them.

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
_ROUGE_TYPES = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}
# What load_best_model_at_end and early stopping judge by when training_args.metric_for_best_model is null: ROUGE-L,
# which the shipped sweeps rank trials by (transformers' own default, the loss, is never computed by this evaluation).
BEST_MODEL_METRIC = "eval_rouge-l"


def eval_metric_name(name: str) -> str:
    """A metric_for_best_model as the Trainer compares it: eval_ prefixed, as transformers prefixes it."""
    return str(name) if str(name).startswith("eval_") else f"eval_{name}"


def best_model_metric(args) -> str | None:
    """training_args.metric_for_best_model as the Trainer compares it (eval_metric_name), or BEST_MODEL_METRIC when
    it is null and keeping the best model or early stopping is on; None when neither."""
    name = args.metric_for_best_model
    if name is None:
        on = args.load_best_model_at_end or args.early_stopping_patience is not None
        return BEST_MODEL_METRIC if on else None
    return eval_metric_name(name)


class JiebaTokenizer:
    """The `tokenize(text)` object rouge-score accepts; its default tokenizer keeps only [a-z0-9] and so scores
    Chinese as 0."""

    def __init__(self) -> None:
        import jieba

        # jieba logs its dictionary loading at DEBUG to stderr on first use
        jieba.setLogLevel(logging.WARNING)
        self._cut = jieba.cut

    def tokenize(self, text: str) -> list[str]:
        return [token for token in self._cut(text) if token and not token.isspace()]


def compute_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean per-sample scores, keys METRIC_NAMES. An empty list gives 0.0 for every key."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    if not predictions:
        return totals

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score.rouge_scorer import RougeScorer

    tokenizer = JiebaTokenizer()
    scorer = RougeScorer(list(_ROUGE_TYPES.values()), tokenizer=tokenizer)
    smoothing = SmoothingFunction().method3
    for prediction, reference in zip(predictions, references):
        prediction_tokens, reference_tokens = tokenizer.tokenize(prediction), tokenizer.tokenize(reference)
        if not prediction_tokens or not reference_tokens:
            continue
        # rouge-score tokenizes again; jieba is deterministic, so the tokens are the ones above
        scores = scorer.score(reference, prediction)
        for name, rouge_type in _ROUGE_TYPES.items():
            totals[name] += scores[rouge_type].fmeasure * 100
        totals["bleu-4"] += sentence_bleu([reference_tokens], prediction_tokens, weights=(0.25, 0.25, 0.25, 0.25),
                                          smoothing_function=smoothing)
    return {name: total / len(predictions) for name, total in totals.items()}


def prefix_metrics(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """{"rouge-1": x} -> {"eval_rouge-1": x}: the Trainer's naming for eval_ and test_ metrics."""
    return {f"{prefix}_{name}": value for name, value in metrics.items()}
