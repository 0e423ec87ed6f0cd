"""The command layer: all verb modules in one process, per-verb `--help`, and the checks every verb
shares (unexpected arguments, bad flags, `--gin.` bindings only where gin is read), run in-process
through `t5lite.cli.main`."""

from __future__ import annotations

import importlib
import json
import re

import pytest
from absl import flags

from t5lite import cli
from t5lite.commands import common

VERB_MODULES = {verb: importlib.import_module(module) for verb, (module, _) in cli.VERBS.items()}
TINY_GIN = "gin/models/t5_1_1/tiny.gin"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`t5lite ARGS` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["t5lite", *args])
    code = exit_info.value.code
    out = capsys.readouterr()
    return (0 if code is None else int(code)), out.out, out.err


def listed_flags(help_text: str) -> set[str]:
    """Flag names a `--help` text lists (`--name:` or `--[no]name:` at the start of a line)."""
    return set(re.findall(r"^\s+--(?:\[no\])?(\w+):", help_text, flags=re.M))


def test_all_verb_modules_coexist_in_one_process():
    assert set(VERB_MODULES) == {"train", "eval", "infer", "data", "vocab", "import", "export",
                                 "info", "teacher-logits", "plan", "quantize"}
    for verb, module in VERB_MODULES.items():
        assert isinstance(module.FLAGS, flags.FlagValues), verb
        assert callable(module.main), verb
    # Same spelling, different meaning, different verbs: each keeps its own.
    assert VERB_MODULES["infer"].FLAGS["format"].parser.enum_values == ["text", "json"]
    assert VERB_MODULES["import"].FLAGS["format"].parser.enum_values == ["hf"]
    # A shared flag has one definition: same type, default and help wherever it is used.
    for name in common.SHARED_FLAGS:
        users = [m.FLAGS[name] for m in VERB_MODULES.values()
                 if name in common.shared_flags_used(m.FLAGS)]
        assert len(users) >= 2, name
        assert len({(type(f), repr(f.default), f.help.split(" (")[0]) for f in users}) == 1, name


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_each_verb_help_lists_its_flags_and_no_others(verb, capsys):
    # Every verb module is imported (module level above) before any verb runs.
    code, out, err = run_cli(capsys, verb, "--help")
    assert code == 1, err  # absl's --help exit status
    own = set(VERB_MODULES[verb].FLAGS)
    listed = listed_flags(out)
    assert listed == own, (sorted(listed ^ own), out)
    assert "Traceback" not in err


def test_help_after_another_verb_ran_in_the_same_process(capsys):
    run_cli(capsys, "import", "--help")
    code, out, _ = run_cli(capsys, "data", "--help")
    assert code == 1
    assert "<text|json>" in out and "<hf>" not in out and "--input" not in out


@pytest.mark.parametrize("verb", ["data", "vocab", "info", "infer", "export", "import", "train",
                                  "eval", "plan"])
def test_unexpected_positional_arguments_are_one_error(verb, capsys):
    code, out, err = run_cli(capsys, verb, "stray")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and "unexpected arguments ['stray']" in errors[0], err
    assert out == ""


@pytest.mark.parametrize("args, want", [
    (["data", "--format=hf"], "--format=hf"),
    (["data", "--no_such_flag=1"], "no_such_flag"),
    (["export", "--gin_file=x.gin"], "gin_file"),  # a flag of other verbs only
    (["vocab", "--gin.TRAIN_STEPS=3"], "gin.TRAIN_STEPS"),  # gin bindings only where gin is read
    (["nosuchverb"], "unknown verb 'nosuchverb'"),
])
def test_bad_flags_are_one_error_and_exit_2(args, want, capsys):
    code, out, err = run_cli(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and want in errors[0], err
    assert "Traceback" not in err


def test_gin_bindings_are_per_run_arguments(repo_root, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)

    def total_params(*extra: str) -> str:
        code, out, err = run_cli(capsys, "info", f"--gin_file={TINY_GIN}", *extra)
        assert code == 0, err
        return re.search(r"total parameters: ([\d,]+)", out)[1]

    plain = total_params()
    bigger = total_params("--gin.ModelConfig.d_ff=512")
    assert bigger != plain
    assert total_params() == plain  # nothing of the previous run's bindings is left over


def test_infer_task_examples_honours_module_import(tmp_path, capsys):
    from t5lite.model_dir import RunInfo, write_run_info

    write_run_info(str(tmp_path), RunInfo(task="my_task", vocabulary="",
                                          task_feature_lengths={"inputs": 8, "targets": 8}))
    code, _, err = run_cli(capsys, "infer", f"--model_dir={tmp_path}", "--task_examples=1",
                           "--module_import=no_such_tasks_module_xyz")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert "no_such_tasks_module_xyz" in errors[0]


def test_data_prints_what_the_library_returns(capsys):
    import t5lite_tasks  # noqa: F401  (registers the demo tasks)
    from t5lite.data.preview import preview_examples

    records = preview_examples("demo_copy", num=1, sequence_length={"inputs": 64, "targets": 64})
    assert records and records[0]["targets"][-1] == 1  # EOS included
    code, out, err = run_cli(capsys, "data", "--task=demo_copy", "--num=1", "--format=json",
                             "--sequence_length=inputs:64,targets:64")
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == records
