"""The first examples of a SeqIO task as the model will see them (before packing).

What `t5lite data` prints, for Python users. Token ids end with EOS; the `*_pretty` strings are
the decoded text without padding and EOS, with sentinels (`<extra_id_0>`, ...) and paradigm
tokens visible.

Example::

    >>> import t5lite_tasks  # registers demo_ul2
    >>> from t5lite.data.preview import preview_examples
    >>> record = preview_examples("demo_ul2", num=1, sequence_length={"inputs": 128,
    ...                                                                 "targets": 128})[0]
    >>> sorted(record)
    ['inputs', 'inputs_pretty', 'targets', 'targets_pretty']
    >>> record["targets"][-1]  # EOS
    1
"""

from __future__ import annotations

from typing import Any

from t5lite.errors import UserError


def _pretty(vocab: Any, ids: list[int]) -> str:
    """Decoded text of `ids` without padding and EOS."""
    ids = [i for i in ids if i not in (vocab.pad_id, vocab.eos_id)]
    return vocab.decode(ids)


def preview_examples(task_name: str, *, split: str = "train", num: int = 3,
                     sequence_length: dict[str, int] | None = None, seed: int | None = 0,
                     shuffle: bool = True) -> list[dict[str, Any]]:
    """The first `num` examples of a registered task or mixture.

    Each is a dict with "inputs" / "targets" (token ids, EOS included) and "inputs_pretty" /
    "targets_pretty" (their decoded text) for the features the task has. `sequence_length`
    defaults to the task's registered lengths; the same `seed` gives the same examples.
    Raises UserError for an unknown task or split.
    """
    from t5lite.data.registry import default_sequence_length, get_task_or_mixture

    provider = get_task_or_mixture(task_name)
    if split not in provider.splits:
        raise UserError(f"task {task_name!r} has no split {split!r}; it has "
                        f"{sorted(provider.splits)}")
    lengths = sequence_length or default_sequence_length(task_name)
    ds = provider.get_dataset(sequence_length=lengths, split=split, shuffle=shuffle, seed=seed,
                              num_epochs=1)
    features = provider.output_features
    out = []
    for ex in ds.take(num).as_numpy_iterator():
        record: dict[str, Any] = {}
        for key in ("inputs", "targets"):
            if key in ex:
                record[key] = [int(i) for i in ex[key]]
        for key in ("inputs", "targets"):
            if key in record:
                record[f"{key}_pretty"] = _pretty(features[key].vocabulary, record[key])
        out.append(record)
    return out
