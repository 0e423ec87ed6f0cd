"""Metric functions in SeqIO's `metric_fns(targets, predictions) -> dict` form, and lookup by name.

All scores are percentages (0-100), as T5 reports them:

    exact_match   predictions equal to their target after stripping outer whitespace
    accuracy      predictions identical to their target (classification labels)
    rouge         mean F-measure of ROUGE-1, ROUGE-2 and ROUGE-L (rouge-score, Porter stemmer,
                  as T5's `t5.evaluation.metrics.rouge`), keys rouge1 / rouge2 / rougeL
    bleu          corpus BLEU with sacrebleu's "intl" tokenizer and exponential smoothing (T5's
                  `t5.evaluation.metrics.bleu` settings), key bleu

`metric_fns(["exact_match", "rouge"])` turns names (as in `--gin.METRICS=...`) into functions;
an unknown name is a `UserError` listing the known ones.

>>> accuracy(["yes", "no"], ["yes", "no "])
{'accuracy': 50.0}
>>> rouge(["the cat sat"], ["the cat sat"])
{'rouge1': 100.0, 'rouge2': 100.0, 'rougeL': 100.0}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from t5lite.errors import UserError

MetricFn = Callable[[Sequence[str], Sequence[str]], dict[str, float]]


def _check(targets: Sequence[str], predictions: Sequence[str]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target after stripping outer whitespace.

    >>> exact_match(["a b", "c"], ["a b ", "d"])
    {'exact_match': 50.0}
    """
    _check(targets, predictions)
    if not targets:
        return {"exact_match": 0.0}
    hits = sum(str(t).strip() == str(p).strip() for t, p in zip(targets, predictions))
    return {"exact_match": 100.0 * hits / len(targets)}


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions identical to their target (no normalisation at all)."""
    _check(targets, predictions)
    if not targets:
        return {"accuracy": 0.0}
    hits = sum(t == p for t, p in zip(targets, predictions))
    return {"accuracy": 100.0 * hits / len(targets)}


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the metric needs the {package!r} package: pip install {package} "
                        "(it is a dependency of t5lite; reinstall with `pip install -e .`)"
                        ) from None


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (x100) over the examples, with stemming."""
    _check(targets, predictions)
    scorer_mod = _need("rouge_score.rouge_scorer", "rouge-score")
    keys = ("rouge1", "rouge2", "rougeL")
    if not targets:
        return {k: 0.0 for k in keys}
    scorer = scorer_mod.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for t, p in zip(targets, predictions):
        scores = scorer.score(str(t), str(p))
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * totals[k] / len(targets) for k in keys}


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, "intl" tokenisation, exponential smoothing), 0-100."""
    _check(targets, predictions)
    sacrebleu = _need("sacrebleu", "sacrebleu")
    if not targets:
        return {"bleu": 0.0}
    result = sacrebleu.corpus_bleu([str(p) for p in predictions], [[str(t) for t in targets]],
                                   smooth_method="exp", smooth_value=0.0, force=False,
                                   lowercase=False, tokenize="intl", use_effective_order=False)
    return {"bleu": float(result.score)}


METRICS: dict[str, MetricFn] = {"exact_match": exact_match, "accuracy": accuracy,
                                "rouge": rouge, "bleu": bleu}


def metric_fns(names: Sequence[str] | str) -> list[MetricFn]:
    """Metric functions by name; `names` may be a comma-separated string.

    >>> [f.__name__ for f in metric_fns("exact_match,bleu")]
    ['exact_match', 'bleu']
    """
    if isinstance(names, str):
        names = [n for n in (part.strip() for part in names.split(",")) if n]
    out = []
    for name in names:
        if name not in METRICS:
            raise UserError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
        if METRICS[name] not in out:
            out.append(METRICS[name])
    return out
