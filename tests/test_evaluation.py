"""SeqIO inference evaluation on a task registered here (targets = the model's own greedy
outputs for half the examples, so exact match is known exactly)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from test_infer import TEXTS, make_model_dir, make_vocab, tiny_config
from t5lite.data.metrics import exact_match
from t5lite.data.vocab import load_vocabulary
from t5lite.inference_eval import (fill_in_spans, has_inference_metrics, make_predict_eval_fn,
                               show_predictions, target_log_likelihoods, load_examples)
from t5lite.inference import Generator

LENGTHS = {"inputs": 48, "targets": 8}
SEEN: dict[str, list] = {}


def recording_metric(targets, predictions):
    SEEN["targets"], SEEN["predictions"] = list(targets), list(predictions)
    return {"n": len(targets)}


def mean_score(targets, scores):
    SEEN["scores"] = list(scores)
    return {"mean_log_likelihood": seqio.metrics.Scalar(float(np.mean(scores)))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("eval_model"))
    vocab_path = make_vocab(d)
    make_model_dir(d, tiny_config(), vocab_path, inputs_len=LENGTHS["inputs"],
                   targets_len=LENGTHS["targets"])
    gen = Generator.from_model_dir(d, batch_size=4)
    own = [r.output for r in gen.generate(TEXTS)]
    # targets: the model's own output for the first two inputs, something else for the rest
    targets = own[:2] + ["walk home", "read books"]
    vocab = load_vocabulary(vocab_path)

    def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({"inputs": TEXTS, "targets": targets})

    features = {"inputs": seqio.Feature(vocab, add_eos=True),
                "targets": seqio.Feature(vocab, add_eos=True)}
    seqio.TaskRegistry.remove("test_eval_task")
    seqio.TaskRegistry.add(
        "test_eval_task",
        source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        postprocess_fn=lambda text, example=None, is_target=False: text.strip(),
        metric_fns=[exact_match, recording_metric, mean_score])
    return d, gen, own, targets


def test_predict_eval_fn_metrics(setup):
    _, gen, own, targets = setup
    assert has_inference_metrics("test_eval_task")
    fn = make_predict_eval_fn("test_eval_task", LENGTHS, batch_size=4)
    metrics = fn(gen.model, 10)
    assert metrics["decode/exact_match"] == 50.0
    assert metrics["decode/n"] == 4.0
    assert metrics["decode/num_examples"] == 4.0
    assert SEEN["targets"] == [t.strip() for t in targets]
    assert SEEN["predictions"] == [o.strip() for o in own]
    # score metrics get the teacher-forced log-likelihood of each target, here checked against
    # an unbatched, unpadded forward pass
    examples = load_examples(seqio.get_mixture_or_task("test_eval_task"), LENGTHS)
    for i in (0, 3):
        enc = jnp.asarray([examples.inputs[i]])
        tgt = examples.targets_ids[i]
        logits, _ = gen.model(enc, jnp.asarray([[0] + tgt[:-1]]))
        logp = np.asarray(jax_log_softmax(logits[0]))
        want = sum(logp[t, tok] for t, tok in enumerate(tgt))
        np.testing.assert_allclose(SEEN["scores"][i], want, rtol=1e-5)
    assert metrics["decode/mean_log_likelihood"] == pytest.approx(np.mean(SEEN["scores"]))
    # a second call (the train loop's next eval) reuses the generator and its compiled function
    again = fn(gen.model, 20)
    assert again == metrics


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(x, axis=-1)


def test_score_of_greedy_output_equals_its_decoding_score(setup):
    """Teacher-forced log-likelihood of the greedy tokens (EOS included when generated) equals
    the decoding loop's accumulated score: scorer and cached decoder agree."""
    _, gen, _, _ = setup
    examples = load_examples(seqio.get_mixture_or_task("test_eval_task"), LENGTHS)
    tokens, scores = gen.generate_ids(examples.inputs, gen.make_config("greedy"))
    examples.targets_ids = [[int(t) for t in row if t != 0] for row in tokens[:, 0]]
    teacher_forced = target_log_likelihoods(gen.model, examples, batch_size=4)
    np.testing.assert_allclose(teacher_forced, scores[:, 0], rtol=1e-4)


def test_tasks_without_metrics_get_no_hook():
    seqio.TaskRegistry.remove("test_eval_nometrics")
    vocab = seqio.PassThroughVocabulary(10)
    seqio.TaskRegistry.add(
        "test_eval_nometrics",
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
                {"inputs": [[3, 4]], "targets": [[5]]}), splits=["validation"]),
        preprocessors=[], output_features={"inputs": seqio.Feature(vocab),
                                           "targets": seqio.Feature(vocab)})
    assert make_predict_eval_fn("test_eval_nometrics", LENGTHS) is None


def test_show_predictions_and_fill_in(setup):
    _, gen, own, _ = setup
    lines = show_predictions(gen, "test_eval_task", LENGTHS, num=2)
    assert lines[0].startswith("[1] input : ") and own[0].strip() in lines[1]
    assert fill_in_spans("a <extra_id_0> b <extra_id_1> c", "<extra_id_0> x y <extra_id_1> z") \
        == "a [x y] b [z] c"
    assert fill_in_spans("a <extra_id_0> b <extra_id_1>", "<extra_id_0> x") == "a [x] b [?]"
