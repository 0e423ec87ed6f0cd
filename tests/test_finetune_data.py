"""Text-to-text tasks from files (TSV / JSONL, gzip, globs, prefix, mixtures), their bad-input
errors, and the metrics by name."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from t5lite.data import metrics, tasks
from t5lite.data.text2text import (Text2TextConfig, read_examples, register_from_config,
                                   text2text_source)
from t5lite.errors import ConfigError, UserError
from test_infer import make_vocab

LENGTHS = {"inputs": 24, "targets": 8}


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory) -> str:
    return make_vocab(str(tmp_path_factory.mktemp("t2t_vocab")))


def write(path, text: str) -> str:
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return str(path)


def examples_of(task, split: str) -> list[dict]:
    ds = task.get_dataset(LENGTHS, split=split, shuffle=False, num_epochs=1)
    return list(ds.as_numpy_iterator())


def test_tsv_and_jsonl_tasks(tmp_path, vocab_path):
    from t5lite.data.vocab import load_vocabulary

    vocab = load_vocabulary(vocab_path)
    write(tmp_path / "a-1.tsv", "the cat sat\tcat\n\nthe dog ran\tdog\n")
    write(tmp_path / "a-2.tsv.gz", "a bird sings\tbird\n")
    write(tmp_path / "dev.tsv", "the fish swims\tfish\n")
    task = tasks.add_text2text_task(
        "t2t_tsv", train_files=str(tmp_path / "a-*"), validation_files=str(tmp_path / "dev.tsv"),
        vocabulary=vocab_path, prefix="animal: ", metrics=["exact_match", "rouge"],
        default_sequence_length=LENGTHS)
    train = examples_of(task, "train")
    assert [ex["targets_pretokenized"].decode() for ex in train] == ["cat", "dog", "bird"]
    assert train[0]["inputs_pretokenized"].decode() == "animal: the cat sat"
    assert train[0]["inputs"].tolist() == vocab.encode("animal: the cat sat") + [1]
    assert train[2]["targets"].tolist() == vocab.encode("bird") + [1]
    assert [f.__name__ for f in task.predict_metric_fns] == ["exact_match", "rouge"]
    assert examples_of(task, "validation")[0]["targets_pretokenized"] == b"fish"

    # JSONL with other keys, gzip, numbers as targets, comma-separated file list
    write(tmp_path / "q1.jsonl.gz", json.dumps({"q": "one plus one", "a": 2}) + "\n")
    write(tmp_path / "q2.json", json.dumps({"q": "the sun", "a": "star", "x": 1}) + "\n")
    task = tasks.add_text2text_task(
        "t2t_jsonl", train_files=f"{tmp_path / 'q1.jsonl.gz'},{tmp_path / 'q2.json'}",
        validation_files=[str(tmp_path / "q2.json")], vocabulary=vocab,
        input_key="q", target_key="a", metrics="accuracy")
    got = [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode())
           for ex in examples_of(task, "train")]
    assert got == [("one plus one", "2"), ("the sun", "star")]

    # a mixture of file tasks with rates (multi-task fine-tuning)
    mix = tasks.add_mixture("t2t_mix", [("t2t_tsv", 3.0), ("t2t_jsonl", 1.0)])
    ds = mix.get_dataset(LENGTHS, split="train", shuffle=True, seed=0, num_epochs=None)
    targets = [vocab.decode(ex["targets"].tolist()) for ex in ds.take(200).as_numpy_iterator()]
    share = sum(t in ("cat", "dog", "bird") for t in targets) / len(targets)
    assert set(targets) <= {"cat", "dog", "bird", "2", "star"}
    assert 0.6 < share < 0.9  # rate 3:1


def test_shards_are_disjoint_and_cover(tmp_path):
    import seqio

    write(tmp_path / "t.tsv", "".join(f"in {i}\tout {i}\n" for i in range(10)))
    src = text2text_source({"train": str(tmp_path / "t.tsv")})
    seen = []
    for i in range(3):
        ds = src.get_dataset("train", shuffle=True, seed=i,
                             shard_info=seqio.ShardInfo(index=i, num_shards=3))
        seen += [ex["targets"].decode() for ex in ds.as_numpy_iterator()]
    assert sorted(seen) == sorted(f"out {i}" for i in range(10))


@pytest.mark.parametrize("name,content,message", [
    ("a.tsv", "fine\tok\nno tab here\n", r"a\.tsv:2: the line has no tab"),
    ("a.tsv", "x\ty\tz\n", r"a\.tsv:1: the line has 2 tabs"),
    ("a.tsv", "ok\tok\ninput only\t \n", r"a\.tsv:2: empty target"),
    ("a.tsv", "\ttarget\n", r"a\.tsv:1: empty input"),
    ("a.jsonl", '{"input": "a", "target": "b"}\n{"input": "a", "target"\n',
     r"a\.jsonl:2: not valid JSON"),
    ("a.jsonl", '{"input": "a"}\n', r"a\.jsonl:1: the JSON object has no 'target' field"),
    ("a.jsonl", '["a", "b"]\n', r"a\.jsonl:1: expected a JSON object"),
    ("a.jsonl", '{"input": "a", "target": null}\n', r"a\.jsonl:1: field 'target' must be"),
    ("a.tsv", "\n\n", r"a\.tsv: the file has no examples"),
    ("a.txt", "x\ty\n", r"a\.txt: cannot tell the format"),
])
def test_bad_lines_name_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(UserError, match=message):
        read_examples(path)


def test_bad_files(tmp_path, vocab_path):
    with pytest.raises(UserError, match=r"no file matches .*nothing-\*\.tsv.*glob"):
        text2text_source({"train": str(tmp_path / "nothing-*.tsv")})
    with pytest.raises(UserError, match=r"no file matches .*missing\.tsv"):
        text2text_source({"train": str(tmp_path / "missing.tsv")})
    (tmp_path / "broken.tsv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"broken\.tsv\.gz: cannot read the file"):
        read_examples(str(tmp_path / "broken.tsv.gz"))
    (tmp_path / "latin1.tsv").write_bytes("caf\xe9\tx\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.tsv:1: not valid UTF-8"):
        read_examples(str(tmp_path / "latin1.tsv"))
    if os.geteuid() != 0:  # root reads anything
        unreadable = write(tmp_path / "locked.tsv", "a\tb\n")
        os.chmod(unreadable, 0)
        with pytest.raises(UserError, match=r"locked\.tsv: cannot read the file"):
            read_examples(unreadable)
    # the gin-side config: required files, vocabulary from INIT_FROM or VOCABULARY
    write(tmp_path / "ok.tsv", "a\tb\n")
    with pytest.raises(UserError, match="needs TRAIN_FILES"):
        register_from_config(Text2TextConfig(), None)
    with pytest.raises(UserError, match="needs VALIDATION_FILES"):
        register_from_config(Text2TextConfig(train_files=str(tmp_path / "ok.tsv")), None)
    with pytest.raises(UserError, match="needs a vocabulary"):
        register_from_config(Text2TextConfig(train_files=str(tmp_path / "ok.tsv"),
                                             validation_files=str(tmp_path / "ok.tsv")), None)
    with pytest.raises(ConfigError, match="unknown metric 'blue'"):
        Text2TextConfig(metrics=["blue"])
    task = register_from_config(
        Text2TextConfig(train_files=str(tmp_path / "ok.tsv"),
                        validation_files=str(tmp_path / "ok.tsv"), vocabulary=vocab_path),
        None, name="t2t_from_config")
    assert task.name == "t2t_from_config"


def test_file_tasks_mixture(tmp_path, vocab_path):
    """FILE_TASKS: one task per entry (keys left out take the single-task settings) and the
    mixture `text2text` of them by rate; a name a module registered is refused."""
    import seqio

    a = write(tmp_path / "a.tsv", "one two\tone\nthree four\tthree\n")
    b = write(tmp_path / "b.jsonl", json.dumps({"q": "five six", "a": "six"}) + "\n")
    config = Text2TextConfig(prefix="p: ", metrics="exact_match", vocabulary=vocab_path, tasks=[
        {"name": "ft_a", "train_files": a, "validation_files": a, "rate": 3},
        {"name": "ft_b", "train_files": b, "validation_files": [b], "input_key": "q",
         "target_key": "a", "prefix": "", "metrics": ["accuracy"]}])
    assert [(s.name, s.rate, s.prefix, s.input_key) for s in config.tasks] == [
        ("ft_a", 3, "p: ", "input"), ("ft_b", 1.0, "", "q")]
    mixture = register_from_config(config, None, name="ft_mix")
    assert isinstance(mixture, seqio.Mixture)
    assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {"ft_a": 3.0, "ft_b": 1.0}
    by_task = {t.name: examples_of(t, "validation") for t in mixture.tasks}
    assert [e["inputs_pretokenized"].decode() for e in by_task["ft_a"]] == ["p: one two",
                                                                            "p: three four"]
    assert [e["targets_pretokenized"].decode() for e in by_task["ft_b"]] == ["six"]
    assert [f.__name__ for f in seqio.TaskRegistry.get("ft_b").predict_metric_fns] == [
        "accuracy"]
    register_from_config(config, None, name="ft_mix")  # registering again is harmless

    tasks.add_text2text_task("ft_module_task", train_files=a, vocabulary=vocab_path)
    taken = Text2TextConfig(vocabulary=vocab_path, tasks=[
        {"name": "ft_module_task", "train_files": a, "validation_files": a}])
    with pytest.raises(UserError, match="'ft_module_task' is taken by a registered task"):
        register_from_config(taken, None, name="ft_mix2")
    missing = Text2TextConfig(vocabulary=vocab_path, tasks=[
        {"name": "ft_c", "train_files": str(tmp_path / "none.tsv"), "validation_files": a}])
    with pytest.raises(UserError, match=r"FILE_TASKS task 'ft_c': train files: no file matches"):
        register_from_config(missing, None, name="ft_mix3")


@pytest.mark.parametrize("entries,message", [
    ([{"name": "x", "train_files": "t", "validation_files": "v", "rat": 1}],
     r"FILE_TASKS\[0\] \('x'\): unknown key 'rat'; the keys are name, train_files"),
    ([{"name": "x", "train_files": "t"}], r"\('x'\): the key 'validation_files' is missing"),
    ([{"name": "x", "train_files": "t", "validation_files": "v", "rate": -1}],
     r"rate=-1 must be a positive number"),
    ([{"name": "x", "train_files": "t", "validation_files": "v", "rate": float("inf")}],
     r"rate=inf must be a positive number"),
    ([{"name": "x", "train_files": "t", "validation_files": "v"}] * 2,
     r"FILE_TASKS\[1\] \('x'\): the task name 'x' is used by FILE_TASKS\[0\] too"),
    ([{"name": "text2text", "train_files": "t", "validation_files": "v"}],
     r"the mixture's own name"),
    ([{"name": "x y", "train_files": "t", "validation_files": "v"}], r"is not a task name"),
    ([{"name": "x", "train_files": [], "validation_files": "v"}], r"train_files=\[\] must be"),
    ([{"name": "x", "train_files": "t", "validation_files": "v", "metrics": "f1"}],
     r"\('x'\): unknown metric 'f1'"),
    ([{"name": "x", "train_files": "t", "validation_files": "v", "file_format": "csv"}],
     r"file_format='csv' is unknown"),
    ("x.tsv", r"FILE_TASKS must be a list of entries"),
    (["x.tsv"], r"FILE_TASKS\[0\] must be a dict"),
])
def test_file_tasks_bad_entries(entries, message):
    with pytest.raises(ConfigError, match=message):
        Text2TextConfig(tasks=entries)


def test_file_tasks_exclude_train_files():
    with pytest.raises(ConfigError, match="TRAIN_FILES / VALIDATION_FILES .* or FILE_TASKS"):
        Text2TextConfig(train_files="t.tsv", tasks=[
            {"name": "x", "train_files": "t", "validation_files": "v"}])


def test_metrics():
    assert metrics.exact_match(["a b", "c"], [" a b", "C"]) == {"exact_match": 50.0}
    assert metrics.accuracy(["a", "b", "c", "d"], ["a", "b ", "c", "x"]) == {"accuracy": 50.0}
    r = metrics.rouge(["the cat sat on the mat", "hello"], ["the cat sat on the mat", "bye"])
    assert r == pytest.approx({"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0})
    # stemming, as T5's rouge: "cats" ~ "cat"; one of two words -> P = R = F = 0.5
    assert metrics.rouge(["cats run"], ["cat walks"])["rouge1"] == pytest.approx(50.0)
    assert metrics.bleu(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == \
        {"bleu": pytest.approx(100.0)}
    partial = metrics.bleu(["the quick brown fox jumps over the dog"],
                           ["the quick brown fox leaps over the dog"])["bleu"]
    assert 20.0 < partial < 80.0
    assert metrics.bleu(["abc"], ["xyz"])["bleu"] == pytest.approx(0.0)
    assert [f.__name__ for f in metrics.metric_fns(" rouge, bleu ,rouge")] == ["rouge", "bleu"]
    with pytest.raises(UserError, match="known metrics: exact_match, accuracy, rouge, bleu"):
        metrics.metric_fns(["f1"])
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.rouge(["a", "b"], ["a"])
    assert np.isfinite(metrics.bleu([], [])["bleu"])
