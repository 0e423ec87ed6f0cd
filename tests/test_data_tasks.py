"""Task registry, vocabularies, user task helper, the C4 TFDS path and the `t5lite data` CLI."""

from __future__ import annotations

import gzip
import importlib
import json
import os
import subprocess
import sys

import pytest
import seqio
import tensorflow_datasets as tfds

from t5lite.data import denoisers, registry, tasks
from t5lite.data.metrics import exact_match
from t5lite.data.preview import preview_examples
from t5lite.data.vocab import load_vocabulary, piece_id, train_vocabulary
from t5lite.errors import ConfigError, UserError

registry.import_task_modules(["t5lite_tasks"])
import t5lite_tasks  # noqa: E402
from t5lite_tasks import c4 as c4_tasks  # noqa: E402
from t5lite_tasks import demo  # noqa: E402

CONTRACT_NAMES = ["demo_span_corruption", "demo_prefix_lm", "demo_ul2", "demo_bart",
                  "c4_span_corruption", "c4_ul2", "demo_copy"]


def test_contract_task_names_are_registered():
    assert set(CONTRACT_NAMES) <= set(registry.registered_names())
    assert registry.get_vocabulary("demo_ul2").vocab_size == 8100
    assert registry.get_vocabulary("demo_span_corruption").extra_ids == 100


def test_importing_the_tasks_again_is_harmless():
    importlib.reload(demo)
    importlib.reload(t5lite_tasks)
    registry.import_task_modules(["t5lite_tasks", "t5lite_tasks"])
    assert "demo_ul2" in registry.registered_names()


def test_unknown_task_lists_registered_names():
    with pytest.raises(UserError, match=r"unknown task or mixture 'demo_ul3'; registered: .*"
                                        r"demo_span_corruption.*demo_ul2"):
        registry.get_task_or_mixture("demo_ul3")


def test_missing_task_module_is_a_clear_error():
    with pytest.raises(UserError, match="cannot import task module 'no_such_tasks'"):
        registry.import_task_modules(["no_such_tasks"])


def test_parse_sequence_length():
    assert registry.parse_sequence_length("inputs:512,targets:114") == {"inputs": 512,
                                                                       "targets": 114}
    for bad in ("inputs=512", "inputs:x", "inputs:-1", ""):
        with pytest.raises(UserError):
            registry.parse_sequence_length(bad)


def test_missing_or_broken_vocabulary_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_vocabulary(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="not a readable SentencePiece model"):
        load_vocabulary(str(junk))
    missing = seqio.SentencePieceVocabulary(str(tmp_path / "gone.model"), extra_ids=100)
    with pytest.raises(UserError, match="gone.model' does not exist"):
        tasks.add_pretraining_task("broken_task", demo.source(), missing,
                                   denoisers.span_corruption(),
                                   default_sequence_length={"inputs": 64, "targets": 16})
    assert "broken_task" not in registry.registered_names()


def test_vocabulary_without_enough_sentinels_is_refused_at_registration():
    few = seqio.SentencePieceVocabulary(demo.VOCABULARY_PATH, extra_ids=20)
    with pytest.raises(ConfigError, match="needs 28 sentinels.*20 extra ids"):
        tasks.add_pretraining_task("few_sentinels", demo.source(), few,
                                   denoisers.span_corruption(),
                                   default_sequence_length={"inputs": 512, "targets": 114})


def test_train_vocabulary_has_paradigm_pieces_and_byte_fallback(tmp_path):
    prefix = train_vocabulary([demo.VALIDATION_FILE], 600, str(tmp_path / "v"))
    vocab = load_vocabulary(prefix)
    assert vocab.vocab_size == 700
    assert [piece_id(vocab, t) for t in ("[NLU]", "[NLG]", "[S2S]")] == [3, 4, 5]
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    text = "Zürich ☃ naïve"
    ids = vocab.encode(text)
    assert vocab.unk_id not in ids and vocab.decode(ids) == text
    assert os.path.exists(str(tmp_path / "v.vocab"))
    with pytest.raises(UserError, match="does not exist"):
        train_vocabulary([str(tmp_path / "none.txt")], 600, str(tmp_path / "w"))


def test_user_text_and_jsonl_tasks(tmp_path):
    lines = [f"Paragraph {i} says something about the interpreter and modules." for i in
             range(40)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    with gzip.open(tmp_path / "val.jsonl.gz", "wt") as f:
        for line in lines[:5]:
            f.write(json.dumps({"body": line}) + "\n")
    vocab = demo.vocabulary()
    tasks.add_pretraining_task(
        "user_text_sc", tasks.text_files_source({"train": str(tmp_path / "*.txt")}), vocab,
        denoisers.span_corruption(), default_sequence_length={"inputs": 32, "targets": 12})
    tasks.add_pretraining_task(
        "user_jsonl_plm",
        tasks.text_files_source({"validation": [str(tmp_path / "val.jsonl.gz")]},
                                file_format="jsonl", text_key="body"),
        vocab, denoisers.prefix_lm(), default_sequence_length={"inputs": 32, "targets": 32})
    records = preview_examples("user_text_sc", num=3)
    assert len(records) == 3 and all(len(r["inputs"]) == 32 for r in records)
    records = preview_examples("user_jsonl_plm", split="validation", num=5, shuffle=False)
    assert [r["inputs"][:-1] + r["targets"][:-1] for r in records] == [
        list(vocab.encode(line)) for line in lines[:5]]
    with pytest.raises(UserError, match="no file matches"):
        tasks.text_files_source({"train": str(tmp_path / "nothing*.txt")})


class T5liteTinyC4(tfds.core.GeneratorBasedBuilder):
    """A C4-shaped TFDS dataset (features text/url/timestamp) made from the demo corpus."""

    VERSION = tfds.core.Version("3.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en")]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "url": tfds.features.Text(),
             "timestamp": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(demo.TRAIN_FILE, 40),
                "validation": self._generate_examples(demo.VALIDATION_FILE, 10)}

    def _generate_examples(self, path, limit):
        with gzip.open(path, "rt") as f:
            for i, line in zip(range(limit), f):
                record = json.loads(line)
                yield i, {"text": record["text"], "url": record["url"],
                          "timestamp": "2019-04-25T12:00:00Z"}


def test_c4_task_path_over_a_local_tfds_dataset(tmp_path):
    builder = T5liteTinyC4(data_dir=str(tmp_path))
    builder.download_and_prepare()
    names = c4_tasks.add_c4_tasks(prefix="tiny_c4", tfds_name="t5lite_tiny_c4/en:3.1.0",
                                  data_dir=str(tmp_path), vocabulary=demo.vocabulary())
    assert names == ["tiny_c4_span_corruption", "tiny_c4_ul2"]
    records = preview_examples("tiny_c4_span_corruption", split="validation", num=4,
                               sequence_length={"inputs": 512, "targets": 114})
    assert [len(r["inputs"]) for r in records].count(512) >= 3
    assert all("<extra_id_0>" in r["targets_pretty"] for r in records)
    ul2 = preview_examples("tiny_c4_ul2", num=3, sequence_length={"inputs": 128, "targets": 128})
    assert all(r["inputs_pretty"].split()[0] in ("[NLU]", "[NLG]", "[S2S]") for r in ul2)
    # The bundled c4 tasks use the same code with TFDS c4/en:3.1.0.
    source = registry.get_task_or_mixture("c4_ul2").source
    assert isinstance(source, seqio.TfdsDataSource) and source.tfds_dataset.name == "c4/en:3.1.0"


def test_demo_copy_task_and_exact_match_metric():
    task = registry.get_task_or_mixture("demo_copy")
    records = preview_examples("demo_copy", split="validation", num=3, shuffle=False)
    for r in records:
        assert r["inputs_pretty"] == "copy: " + r["targets_pretty"]
    assert exact_match in task.metric_fns
    assert exact_match(["a b", "c"], ["a b ", "d"]) == {"exact_match": 50.0}


def test_demo_bart_examples_decode_to_text():
    records = preview_examples("demo_bart", num=4, sequence_length={"inputs": 64, "targets": 64})
    vocab = demo.vocabulary()
    mask = vocab.vocab_size - 1  # seqio: <extra_id_0> is the last id
    for r in records:
        assert len(r["targets"]) <= 64 and r["targets"][-1] == 1
        # BART: the targets are the original text; the inputs are that text with spans
        # replaced by the mask token (30% of the tokens: every demo text has masks)
        assert mask in r["inputs"] and "<extra_id_0>" in r["inputs_pretty"]
        assert mask not in r["targets"]
        assert r["targets_pretty"] == vocab.decode(r["targets"][:-1])


def test_data_cli_json_contract_and_errors():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-m", "t5lite.cli", "data", "--task=demo_ul2", "--num=2",
         "--format=json", "--sequence_length=inputs:128,targets:128", "--seed=3"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2
    vocab = demo.vocabulary()
    for row in rows:
        assert set(row) == {"inputs", "targets", "inputs_pretty", "targets_pretty"}
        assert row["inputs"][-1] == 1 and row["targets"][-1] == 1  # EOS included
        assert row["inputs_pretty"] == vocab.decode(row["inputs"][:-1])
        assert row["inputs"][0] in (3, 4, 5)
    bad = subprocess.run(
        [sys.executable, "-m", "t5lite.cli", "data", "--task=demo_ul2",
         "--sequence_length=inputs:512,targets:512"],
        capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: ul2: denoiser X(mu=3,d=0.5)")
    assert "Traceback" not in bad.stderr
