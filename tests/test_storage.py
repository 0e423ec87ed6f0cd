"""t5lite.storage on local paths and on gs:// against a real GCS JSON API (fake-gcs-server on
127.0.0.1), plus the bad-input checks of gs:// paths (one `error:` line, exit 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest

from gcs_emulator import GcsEmulator
from t5lite import storage
from t5lite.errors import UserError


@pytest.fixture(scope="module")
def gcs():
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                            "GCE_METADATA_ROOT", "GCE_METADATA_HOST")}
    with GcsEmulator() as emulator:
        emulator.create_bucket("bucket")
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        storage.configure()
        storage._fs.cache_clear()
        try:
            yield emulator
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage._fs.cache_clear()


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("gcs")
    return f"gs://bucket/{uuid.uuid4().hex[:8]}"


def test_files_round_trip(root):
    run = storage.join(root, "run")
    storage.makedirs(run)
    assert not storage.exists(storage.join(run, "a.json"))
    storage.write_atomic(storage.join(run, "a.json"), '{"x": 1}\n')
    storage.write_atomic(storage.join(run, "b.txt"), b"bytes")
    storage.write_atomic(storage.join(run, "a.json"), '{"x": 2}\n')     # replaced whole
    with storage.open(storage.join(run, "sub", "c.txt"), "w") if storage.is_remote(root) else \
            _local_sub(run) as f:
        f.write("line 1\nline 2\n")
    assert storage.read_text(storage.join(run, "a.json")) == '{"x": 2}\n'
    assert storage.read_bytes(storage.join(run, "b.txt")) == b"bytes"
    assert storage.isfile(storage.join(run, "b.txt")) and not storage.isfile(run)
    assert storage.isdir(run) and storage.isdir(storage.join(run, "sub"))
    assert not storage.isdir(storage.join(root, "nothing"))
    assert storage.listdir(run) == ["a.json", "b.txt", "sub"]
    assert storage.glob(storage.join(run, "*.t*")) == [storage.join(run, "b.txt")]
    with storage.open(storage.join(run, "sub", "c.txt")) as f:
        assert f.read().splitlines() == ["line 1", "line 2"]
    local = storage.local_copy(storage.join(run, "b.txt"))
    assert open(local, "rb").read() == b"bytes"
    assert storage.isabs(root) and storage.abspath(run) == run
    assert not [n for n in storage.listdir(run) if ".tmp" in n]   # no temporary files left


def _local_sub(run):
    os.makedirs(os.path.join(run, "sub"))
    return open(os.path.join(run, "sub", "c.txt"), "w")


def test_remote_open_refuses_append(gcs):
    with pytest.raises(ValueError, match="AppendLog"):
        storage.open("gs://bucket/x/log.txt", "a")


def test_append_log_segments_on_gcs(gcs):
    path = f"gs://bucket/{uuid.uuid4().hex[:8]}/metrics.jsonl"
    log = storage.AppendLog(path, flush_secs=3600, segment_bytes=64)
    records = [f'{{"step": {i}, "loss": 1.5}}\n' for i in range(10)]   # 26-27 bytes each
    for r in records[:2]:
        log.write(r)
    assert storage.read_lines(path) == []            # buffered: nothing uploaded yet ...
    log.flush()
    assert storage.read_lines(path) == records[:2]   # ... until a flush (or flush_secs, or
    for r in records[2:]:                            # a full segment)
        log.write(r)
    log.close()
    segments = storage.glob(path + ".*")
    assert len(segments) >= 3                         # rolled over at 64 bytes
    assert all(len(storage.read_bytes(s)) < 64 + 27 for s in segments)
    assert storage.read_lines(path) == records
    # a resumed run continues after the last segment and never rewrites the old ones
    before = {s: storage.read_bytes(s) for s in segments}
    log2 = storage.AppendLog(path, segment_bytes=64)
    log2.write('{"step": 10}\n')
    log2.close()
    assert storage.read_lines(path) == records + ['{"step": 10}\n']
    assert all(storage.read_bytes(s) == b for s, b in before.items())
    # cost: every byte is uploaded at most ceil(segment_bytes / record) times, not once per
    # record of the whole history as with a rewrite of one object
    assert log.uploaded_bytes < 3 * sum(len(r) for r in records)


def test_append_log_local_appends(tmp_path):
    path = str(tmp_path / "m" / "metrics.jsonl")
    log = storage.AppendLog(path)
    log.write("a\n")
    assert open(path).read() == "a\n"                 # visible at once, no buffering
    storage.AppendLog(path).write("b\n")
    assert storage.read_lines(path) == ["a\n", "b\n"]


def test_remote_paths_in_arguments():
    args = ["--model_dir=gs://b1/run", "--gin.INIT_FROM='gs://b2/x'", "--input_file", "gs://b1/p",
            "--output=runs/x"]
    assert storage.remote_paths_in(args) == ["gs://b1/run", "gs://b2/x", "gs://b1/p"]


def test_check_remote_accepts_a_bucket(gcs):
    storage.check_remote("gs://bucket/some/run")


def test_check_remote_missing_bucket(gcs):
    with pytest.raises(UserError, match=r"gs://no-such-bucket/run: bucket gs://no-such-bucket "
                                        r"does not exist"):
        storage.check_remote("gs://no-such-bucket/run")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_remote_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(UserError, match=r"gs://bucket/run: cannot reach the storage endpoint"):
        storage.check_remote("gs://bucket/run", timeout=5)


def test_check_remote_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match=r"gs://bucket/run: no Google Cloud credentials"):
        storage.check_remote("gs://bucket/run")


def test_bucketless_path():
    with pytest.raises(UserError, match="needs a bucket"):
        storage.split_bucket("gs:///run")


@pytest.mark.parametrize("case", ["missing_bucket", "unreachable"])
def test_cli_bad_gs_path_is_one_error_line(gcs, repo_root, case):
    env = gcs.env()
    if case == "unreachable":
        env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{_closed_port()}"
        args = ["eval", "--gin_file=gin/demo.gin", "--model_dir=gs://bucket/run"]
        expected = "error: gs://bucket/run: cannot reach the storage endpoint"
    else:
        args = ["infer", "--model_dir=gs://no-such-bucket/run", "--input=x"]
        expected = "error: gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist"
    r = subprocess.run([sys.executable, "-m", "t5lite.cli", *args], cwd=repo_root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr


# ---------------------------------------------------------------- gs:// inputs and checkpoints

def test_text_and_jsonl_task_sources_and_vocabulary_in_a_bucket(gcs):
    import gzip
    import json

    from t5lite.data import denoisers, tasks
    from t5lite.data.preview import preview_examples as show_examples
    from t5lite.data.vocab import load_vocabulary
    from t5lite_tasks import demo

    root = f"gs://bucket/{uuid.uuid4().hex[:8]}"
    lines = [f"Paragraph {i} says something about the interpreter and modules." for i in
             range(20)]
    storage.write_atomic(f"{root}/data/train-0.txt", "\n".join(lines[:10]) + "\n")
    storage.write_atomic(f"{root}/data/train-1.txt", "\n".join(lines[10:]) + "\n")
    storage.write_atomic(f"{root}/data/val.jsonl.gz", gzip.compress(
        "".join(json.dumps({"body": t}) + "\n" for t in lines[:4]).encode()))
    with open(demo.VOCABULARY_PATH, "rb") as f:
        storage.write_atomic(f"{root}/vocab/spm.model", f.read())
    vocab = load_vocabulary(f"{root}/vocab/spm.model")
    assert vocab.encode("modules") == demo.vocabulary().encode("modules")
    name = f"gcs_text_{uuid.uuid4().hex[:6]}"
    tasks.add_pretraining_task(
        name, tasks.text_files_source({"train": f"{root}/data/train-*.txt",
                                       "validation": [f"{root}/data/val.jsonl.gz"]}),
        vocab, denoisers.prefix_lm(), default_sequence_length={"inputs": 32, "targets": 32})
    records = show_examples(name, num=20, shuffle=False)
    assert [r["inputs"][:-1] + r["targets"][:-1] for r in records] == [
        list(vocab.encode(t)) for t in lines]
    jsonl = f"gcs_jsonl_{uuid.uuid4().hex[:6]}"
    tasks.add_pretraining_task(
        jsonl, tasks.text_files_source({"validation": f"{root}/data/val.jsonl.gz"},
                                       file_format="jsonl", text_key="body"),
        vocab, denoisers.prefix_lm(), default_sequence_length={"inputs": 32, "targets": 32})
    records = show_examples(jsonl, split="validation", num=4, shuffle=False)
    assert [r["inputs"][:-1] + r["targets"][:-1] for r in records] == [
        list(vocab.encode(t)) for t in lines[:4]]
    with pytest.raises(UserError, match="no file matches"):
        tasks.text_files_source({"train": f"{root}/data/nothing-*.txt"})
    with pytest.raises(UserError, match="does not exist"):
        load_vocabulary(f"{root}/vocab/missing.model")


def test_params_checkpoint_in_a_bucket(gcs):
    import jax.numpy as jnp
    import numpy as np

    from t5lite import checkpoint

    run = f"gs://bucket/{uuid.uuid4().hex[:8]}/imported"
    assert checkpoint.latest_step(run) is None
    params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4)}, "bias": jnp.ones(4)}
    checkpoint.save_params(run, params, step=7)
    assert checkpoint.latest_step(run) == 7
    # committed with a marker object, not a directory rename
    assert storage.exists(f"{run}/checkpoints/7/commit_success.txt")
    abstract = {"dense": {"kernel": jnp.zeros((3, 4))}, "bias": jnp.zeros(4)}
    restored = checkpoint.restore_params(run, abstract)
    np.testing.assert_array_equal(restored["dense"]["kernel"], params["dense"]["kernel"])
    with pytest.raises(UserError, match="does not fit"):
        checkpoint.restore_params(run, {"bias": jnp.zeros(5)})
    # a save killed half-way (objects of step 9 written, no commit marker) is not the latest,
    # and saving step 9 again replaces it
    storage.write_atomic(f"{run}/checkpoints/9/params/_METADATA", "{half")
    storage.write_atomic(f"{run}/checkpoints/9/_CHECKPOINT_METADATA", "{half")
    assert checkpoint.latest_step(run) == 7
    checkpoint.save_params(run, {"dense": {"kernel": jnp.zeros((3, 4))}, "bias": jnp.ones(4)},
                           step=9)
    assert checkpoint.latest_step(run) == 9
    np.testing.assert_array_equal(checkpoint.restore_params(run, abstract)["dense"]["kernel"],
                                  np.zeros((3, 4)))


def test_vocabulary_trained_from_and_into_a_bucket(gcs, tmp_path, monkeypatch):
    """`t5lite vocab` with gs:// inputs (a glob over gzipped JSON-lines shards and a text file)
    and a gs:// output prefix: both files land in the bucket, nothing on the local disk."""
    import gzip

    from t5lite.data.vocab import load_vocabulary, piece_id, train_vocabulary
    from t5lite_tasks import demo

    monkeypatch.chdir(tmp_path)  # a stray local "gs:" directory would appear here
    root = f"gs://bucket/{uuid.uuid4().hex[:8]}"
    with open(demo.VALIDATION_FILE, "rb") as f:
        data = f.read()
    lines = (gzip.decompress(data) if demo.VALIDATION_FILE.endswith(".gz") else data).splitlines()
    half = len(lines) // 2
    for i, part in enumerate((lines[:half], lines[half:])):
        storage.write_atomic(f"{root}/corpus/part-{i}.jsonl.gz",
                             gzip.compress(b"\n".join(part) + b"\n"))
    storage.write_atomic(f"{root}/corpus/extra.txt", "Zürich ☃ naïve\n")
    path = train_vocabulary([f"{root}/corpus/part-*.jsonl.gz", f"{root}/corpus/extra.txt"], 600,
                            f"{root}/vocab/v600")
    assert path == f"{root}/vocab/v600.model"
    assert storage.isfile(path) and storage.isfile(f"{root}/vocab/v600.vocab")
    vocab = load_vocabulary(path)
    assert vocab.vocab_size == 700
    assert [piece_id(vocab, t) for t in ("[NLU]", "[NLG]", "[S2S]")] == [3, 4, 5]
    assert vocab.decode(vocab.encode("Zürich ☃ naïve")) == "Zürich ☃ naïve"
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match="matches no file"):
        train_vocabulary([f"{root}/corpus/none-*.txt"], 600, f"{root}/vocab/w")
    with pytest.raises(UserError, match="does not exist"):
        train_vocabulary([f"{root}/corpus/none.txt"], 600, f"{root}/vocab/w")
    assert not storage.exists(f"{root}/vocab/w.model")


def test_transformers_model_imported_from_a_bucket(gcs, tmp_path):
    """`t5lite import --input=gs://...`: the same model dir as a local import; model.gin names
    the bucket; a missing or incomplete bucket directory is refused by its gs:// name."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import jax
    import numpy as np
    from flax import nnx

    from t5lite.export.hf import import_hf
    from t5lite.inference import load_model
    from test_hf_import import save_random_t5
    from test_infer import make_vocab

    local = tmp_path / "hf"
    save_random_t5(str(local), "v1_1", vocab_size=448, seed=3)
    (tmp_path / "vocab").mkdir()
    vocab = make_vocab(str(tmp_path / "vocab"))
    root = f"gs://bucket/{uuid.uuid4().hex[:8]}"
    storage.upload_dir(str(local), f"{root}/hf")
    storage.upload_dir(str(local), f"{root}/no_config")
    storage.remove(f"{root}/no_config/config.json")
    with open(vocab, "rb") as f:
        storage.write_atomic(f"{root}/spiece.model", f.read())

    cfg_local = import_hf(str(local), str(tmp_path / "m_local"), vocab=vocab)
    cfg_gs = import_hf(f"{root}/hf", str(tmp_path / "m_gs"), vocab=f"{root}/spiece.model")
    assert cfg_gs == cfg_local
    a = nnx.state(load_model(str(tmp_path / "m_local"))[0], nnx.Param)
    b = nnx.state(load_model(str(tmp_path / "m_gs"))[0], nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert f"imported from {root}/hf" in (tmp_path / "m_gs" / "model.gin").read_text()
    with pytest.raises(UserError, match=f"{root}/none.*is not a directory"):
        import_hf(f"{root}/none", str(tmp_path / "m1"), vocab=vocab)
    with pytest.raises(UserError, match=f"{root}/no_config has no config.json"):
        import_hf(f"{root}/no_config", str(tmp_path / "m2"), vocab=vocab)
