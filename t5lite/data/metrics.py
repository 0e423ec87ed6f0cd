"""Metric functions in SeqIO's `metric_fns(targets, predictions) -> dict` form."""

from __future__ import annotations

from collections.abc import Sequence


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target after stripping outer whitespace.

    >>> exact_match(["a b", "c"], ["a b ", "d"])
    {'exact_match': 50.0}
    """
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    if not targets:
        return {"exact_match": 0.0}
    hits = sum(str(t).strip() == str(p).strip() for t, p in zip(targets, predictions))
    return {"exact_match": 100.0 * hits / len(targets)}
