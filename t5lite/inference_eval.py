"""SeqIO inference evaluation: decode a task's validation split and run its metric functions.

For every task (a mixture's sub-tasks one by one) that has prediction metrics
(`metric_fns(targets, predictions)`, e.g. exact match, accuracy, BLEU, ROUGE from seqio / t5),
the examples' `inputs` are decoded with the model, predictions are detokenised with the task's
target vocabulary and passed through the task's `postprocess_fn`, targets come from
`targets_pretokenized` (else the decoded target ids) through the same postprocessor, exactly as
SeqIO's evaluator does, and the metric functions' results become floats named
`decode/<metric>` (one task) or `decode/<task>/<metric>` (several). Score metrics
(`metric_fns(targets, scores)`) get the teacher-forced log-likelihood of each target.

Used by `t5lite eval` and the train loop's periodic eval through `make_predict_eval_fn`, whose
result is the loop's `predict_eval_fn(model, step) -> dict[str, float]` hook::

    fn = make_predict_eval_fn("demo_copy", {"inputs": 32, "targets": 32}, num_examples=64)
    metrics = fn(model, step)      # {"decode/exact_match": 12.5, "decode/num_examples": 64.0}

`show_predictions` renders a few validation inputs with the model's output; for span corruption
each sentinel in the input is replaced by the span the model filled in::

    input : The <extra_id_0> sat on the <extra_id_1>.
    output: <extra_id_0> cat <extra_id_1> mat
    filled: The [cat] sat on the [mat].
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5lite.errors import UserError
from t5lite.models.decoding import trim_at_eos
from t5lite.parallel.rules import DEFAULT_INFERENCE_RECIPE

log = logging.getLogger(__name__)

# The train loop's and `t5lite eval`'s hook: (model, step) -> {metric name: value}.
PredictEvalFn = Callable[[nnx.Module, int], dict[str, float]]
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


@dataclasses.dataclass
class EvalExamples:
    """The decoded-once validation examples of one task."""

    task: Any  # seqio.Task
    inputs: list[list[int]]  # token ids (with EOS) as the task's pipeline made them
    targets_ids: list[list[int]]
    raw: list[dict[str, Any]]  # the numpy examples (for postprocess_fn(example=...))


def _tasks_with_metrics(name: str) -> list[Any]:
    from t5lite.data.registry import get_task_or_mixture

    import seqio

    provider = get_task_or_mixture(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    return [t for t in tasks if t.predict_metric_fns or t.score_metric_fns]


def has_inference_metrics(name: str) -> bool:
    """True when task/mixture `name` has prediction or score metric functions."""
    return bool(_tasks_with_metrics(name))


def load_examples(task: Any, lengths: dict[str, int], split: str = "validation",
                  num_examples: int | None = None) -> EvalExamples:
    """The first `num_examples` (all when None) examples of `split`, unshuffled."""
    ds = task.get_dataset(sequence_length=dict(lengths), split=split, shuffle=False,
                          num_epochs=1, use_cached=False, seed=0)
    if num_examples:
        ds = ds.take(num_examples)
    inputs, targets, raw = [], [], []
    for ex in ds.as_numpy_iterator():
        inputs.append([int(t) for t in ex["inputs"]])
        targets.append([int(t) for t in ex["targets"]])
        raw.append(ex)
    if not inputs:
        raise UserError(f"task {task.name!r} has no {split!r} examples to evaluate on.")
    return EvalExamples(task=task, inputs=inputs, targets_ids=targets, raw=raw)


def _as_text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _targets(examples: EvalExamples) -> list[Any]:
    task = examples.task
    vocab = task.output_features["targets"].vocabulary
    out = []
    for ex, ids in zip(examples.raw, examples.targets_ids):
        text = _as_text(ex["targets_pretokenized"]) if "targets_pretokenized" in ex else \
            vocab.decode(trim_at_eos(ids))
        out.append(task.postprocess_fn(text, example=ex, is_target=True))
    return out


def _scalar(value: Any) -> float | None:
    value = getattr(value, "value", value)  # seqio.metrics.Scalar
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(arr) if arr.ndim == 0 else None


def target_log_likelihoods(model: nnx.Module, examples: EvalExamples,
                           batch_size: int = 8) -> list[float]:
    """Teacher-forced sum of log p(target token) per example (SeqIO's `scores`)."""
    if model.config.architecture != "encoder_decoder":
        raise UserError("score metrics need an encoder-decoder model.")
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, enc, dec_in, dec_out):
        m = nnx.merge(graphdef, state)
        logits, _ = m(enc, dec_in)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(logp, dec_out[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(dec_out != 0, tok, 0.0), axis=-1)

    in_len = max(len(r) for r in examples.inputs)
    out_len = max(len(r) for r in examples.targets_ids)
    scores: list[float] = []
    for start in range(0, len(examples.inputs), batch_size):
        enc = np.zeros((batch_size, in_len), np.int32)
        dec_out = np.zeros((batch_size, out_len), np.int32)
        rows = range(start, min(start + batch_size, len(examples.inputs)))
        for r, i in enumerate(rows):
            enc[r, : len(examples.inputs[i])] = examples.inputs[i]
            dec_out[r, : len(examples.targets_ids[i])] = examples.targets_ids[i]
        dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), dec_out[:, :-1]], axis=1)
        got = np.asarray(score(state, enc, dec_in, dec_out))
        scores.extend(float(s) for s in got[: len(rows)])
    return scores


def evaluate_task(generator: Any, examples: EvalExamples, decode_config: Any,
                  seed: int = 0) -> tuple[dict[str, float], list[Any]]:
    """Run one task's metric functions on `examples`; returns (metrics, predictions)."""
    task = examples.task
    vocab = task.output_features["targets"].vocabulary
    targets = _targets(examples)
    metrics: dict[str, float] = {}
    predictions: list[Any] = []
    if task.predict_metric_fns:
        tokens, _ = generator.generate_ids(examples.inputs, decode_config, seed=seed)
        for ex, row in zip(examples.raw, tokens[:, 0]):
            text = vocab.decode(trim_at_eos(row))
            predictions.append(task.postprocess_fn(text, example=ex, is_target=False))
        for fn in task.predict_metric_fns:
            metrics.update(_float_metrics(fn(targets, predictions), fn))
    if task.score_metric_fns:
        scores = target_log_likelihoods(generator.model, examples, generator.batch_size)
        for fn in task.score_metric_fns:
            metrics.update(_float_metrics(fn(targets, scores), fn))
    return metrics, predictions


def _float_metrics(result: Any, fn: Any) -> dict[str, float]:
    out = {}
    for key, value in dict(result).items():
        number = _scalar(value)
        if number is None:
            log.warning("metric %s of %s is not a scalar; not recorded", key,
                        getattr(fn, "__name__", fn))
            continue
        out[str(key)] = number
    return out


def make_predict_eval_fn(task_name: str, task_feature_lengths: dict[str, int], *,
                         vocabulary: Any = None, split: str = "validation",
                         num_examples: int | None = 256, decode: str = "greedy",
                         max_decode_len: int | None = None, beam_size: int = 4,
                         alpha: float = 0.6, batch_size: int = 8, mesh: Any = None,
                         rules: Any = DEFAULT_INFERENCE_RECIPE) -> PredictEvalFn | None:
    """The train loop's / `t5lite eval`'s decoding hook for `task_name`, or None when the task
    (or no sub-task of the mixture) has metric functions that need predictions or scores.

    Examples are loaded on first use and kept; the model's compiled decoding function is kept
    across calls as long as the model's structure does not change.
    """
    tasks = _tasks_with_metrics(task_name)
    if not tasks:
        return None
    if jax.process_count() > 1:
        log.warning("decoding metrics of %s are skipped: inference evaluation runs in "
                    "single-process jobs only (run `t5lite eval` on one host).", task_name)
        return None
    from t5lite.inference import Generator

    lengths = dict(task_feature_lengths)
    state: dict[str, Any] = {"examples": None, "generator": None}
    many = len(tasks) > 1

    def predict_eval_fn(model: nnx.Module, step: int) -> dict[str, float]:
        if state["examples"] is None:
            state["examples"] = [load_examples(t, lengths, split, num_examples) for t in tasks]
        gen = state["generator"]
        if gen is None:
            vocab = vocabulary or tasks[0].output_features["targets"].vocabulary
            gen = Generator(model, vocab, max_input_len=lengths["inputs"],
                            default_decode_len=lengths.get("targets", 64),
                            batch_size=batch_size, mesh=mesh, rules=rules)
            state["generator"] = gen
        else:
            gen.set_model(model)
        config = gen.make_config(decode, max_decode_len=max_decode_len, beam_size=beam_size,
                                 alpha=alpha)
        out: dict[str, float] = {}
        for examples in state["examples"]:
            metrics, _ = evaluate_task(gen, examples, config)
            prefix = f"decode/{examples.task.name}/" if many else "decode/"
            out.update({prefix + k: v for k, v in metrics.items()})
            out[prefix + "num_examples"] = float(len(examples.inputs))
        log.info("step %d decode metrics: %s", step, out)
        return out

    return predict_eval_fn


# ------------------------------------------------------------------------- showing outputs
def fill_in_spans(input_text: str, output_text: str) -> str:
    """Replace each sentinel of `input_text` by the span that follows the same sentinel in
    `output_text`, in brackets (missing spans show as [?]).

    >>> fill_in_spans("The <extra_id_0> sat on the <extra_id_1>.",
    ...               "<extra_id_0> cat <extra_id_1> mat")
    'The [cat] sat on the [mat].'
    """
    spans: dict[str, str] = {}
    pieces = _SENTINEL.split(output_text)
    for i in range(1, len(pieces) - 1, 2):
        spans.setdefault(pieces[i], pieces[i + 1].strip())
    return _SENTINEL.sub(lambda m: f"[{spans.get(m.group(1), '?')}]", input_text)


def show_predictions(generator: Any, task_name: str, lengths: dict[str, int], num: int = 5,
                     split: str = "validation", decode: str = "greedy") -> list[str]:
    """Human-readable lines for the first `num` examples of `task_name`'s `split`: the input,
    the model's output, the target, and (when the input has sentinels) the filled-in input."""
    from t5lite.data.registry import get_task_or_mixture

    import seqio

    provider = get_task_or_mixture(task_name)
    task = provider.tasks[0] if isinstance(provider, seqio.Mixture) else provider
    examples = load_examples(task, lengths, split, num)
    vocab = task.output_features["targets"].vocabulary
    in_vocab = task.output_features["inputs"].vocabulary
    config = generator.make_config(decode)
    tokens, _ = generator.generate_ids(examples.inputs, config)
    lines = []
    for n, (ids, row, target) in enumerate(zip(examples.inputs, tokens[:, 0],
                                               examples.targets_ids), 1):
        text_in = in_vocab.decode(trim_at_eos(ids))
        text_out = vocab.decode(trim_at_eos(row))
        lines.append(f"[{n}] input : {text_in}")
        lines.append(f"    output: {text_out}")
        lines.append(f"    target: {vocab.decode(trim_at_eos(target))}")
        if _SENTINEL.search(text_in):
            lines.append(f"    filled: {fill_in_spans(text_in, text_out)}")
    return lines


__all__ = ["EvalExamples", "evaluate_task", "fill_in_spans", "has_inference_metrics",
           "load_examples", "make_predict_eval_fn", "show_predictions",
           "target_log_likelihoods"]
