"""What the `t5lite` verbs share: a flag registry per verb and the flags several verbs take.

Every verb module defines its flags in its OWN absl registry, made by `new_flags()`, instead of
absl's global `flags.FLAGS`. So all verb modules can be imported into one process together
(a spelling may mean one thing in one verb and another in another, as `--input` is one text for
`infer`, a transformers directory for `import` and training files for `vocab`), and
`t5lite <verb> --help` lists exactly that verb's flags. `t5lite.cli` adds the requested verb's
registry to absl's global one for the duration of the run (see `t5lite.cli.run_verb`).

Flags that several verbs take are defined here once, with one meaning and one default, and a
verb picks the ones it uses with `use_shared_flags`:

  --gin_file        gin file(s) (train, eval, info, infer, data, ...); `--gin.NAME=VALUE` bindings
                    come with it
  --module_import   modules that register SeqIO tasks (train, eval, data, infer)
  --model_dir       a t5lite model dir (train, eval, infer, info, import, export)
  --step            checkpoint step to read (infer, export)
  --seed            random seed (data: example order; infer: sampling)
  --format          output format, text or json (data, infer)
  --compilation_cache_dir  keep compiled programs there and load them on the next start
                    (train, eval, infer, teacher-logits; see t5lite.compile_cache)

A verb takes `--gin.NAME=VALUE` bindings exactly when it uses `--gin_file`; its `main` then
receives them as an argument: `main(gin_bindings)`, otherwise `main()`.

Example (a verb module)::

    from absl import flags
    from t5lite.commands import common

    FLAGS = common.new_flags()
    common.use_shared_flags(FLAGS, "model_dir", "format")
    flags.DEFINE_string("input", None, "one input text", flag_values=FLAGS)

    def main() -> None:
        ...  # FLAGS.model_dir, FLAGS.format, FLAGS.input hold the parsed values
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from absl import flags

# registry -> the shared flags it took through use_shared_flags
_SHARED_USED: weakref.WeakKeyDictionary[flags.FlagValues, tuple[str, ...]] = (
    weakref.WeakKeyDictionary())


def new_flags() -> flags.FlagValues:
    """An empty flag registry for one verb (its flags never meet another verb's)."""
    return flags.FlagValues()


def _gin_file(fv: flags.FlagValues, note: str) -> None:
    flags.DEFINE_multi_string(
        "gin_file", [], "gin file(s), parsed in order, then the --gin.NAME=VALUE bindings; e.g. "
        "--gin_file=gin/models/t5_1_1/small.gin --gin_file=gin/runs/pretrain.gin" + note,
        flag_values=fv)


def _module_import(fv: flags.FlagValues, note: str) -> None:
    flags.DEFINE_multi_string("module_import", ["t5lite_tasks"],
                              "modules that register SeqIO tasks / mixtures (repeatable)" + note,
                              flag_values=fv)


def _model_dir(fv: flags.FlagValues, note: str) -> None:
    flags.DEFINE_string("model_dir", None, "a t5lite model dir: checkpoints, model_config.json, "
                        "run_info.json, metrics" + note, flag_values=fv)


def _step(fv: flags.FlagValues, note: str) -> None:
    flags.DEFINE_integer("step", None, "checkpoint step to read (default: the latest)" + note,
                         flag_values=fv)


def _seed(fv: flags.FlagValues, note: str) -> None:
    flags.DEFINE_integer("seed", 0, "random seed: the same seed gives the same output" + note,
                         flag_values=fv)


def _format(fv: flags.FlagValues, note: str) -> None:
    flags.DEFINE_enum("format", "text", ["text", "json"], "output format: text for people, json "
                      "for programs (one object per line)" + note, flag_values=fv)


def _dtype(fv: flags.FlagValues, note: str) -> None:
    flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "compute dtype of the model "
                      "(activations and matmuls; the weights stay as stored); default: the model "
                      "dir's own (model_config.json `dtype`)" + note, flag_values=fv)


def _compilation_cache_dir(fv: flags.FlagValues, note: str) -> None:
    flags.DEFINE_string(
        "compilation_cache_dir", None, "persistent compilation cache: compiled programs are "
        "written to this directory (local or gs://, created if missing) and a later run of the "
        "same program loads them instead of compiling; share one across hosts and restarts. "
        "Only programs that took >= 1 s to compile are stored" + note, flag_values=fv)


SHARED_FLAGS: dict[str, Callable[[flags.FlagValues, str], None]] = {
    "gin_file": _gin_file,
    "module_import": _module_import,
    "model_dir": _model_dir,
    "step": _step,
    "seed": _seed,
    "format": _format,
    "dtype": _dtype,
    "compilation_cache_dir": _compilation_cache_dir,
}


def use_shared_flags(fv: flags.FlagValues, *names: str, **notes: str) -> None:
    """Define the shared flags `names` in the verb's registry `fv`.

    `notes` adds a verb's remark to a flag's help text without changing its meaning, e.g.
    `use_shared_flags(FLAGS, "seed", seed="for sampling")` gives "random seed: ... (for sampling)".
    """
    unknown = [n for n in (*names, *notes) if n not in SHARED_FLAGS]
    if unknown:
        raise ValueError(f"not shared flags: {unknown}; shared are {sorted(SHARED_FLAGS)}")
    stray = [n for n in notes if n not in names]
    if stray:
        raise ValueError(f"notes for flags not used: {stray}")
    for name in names:
        SHARED_FLAGS[name](fv, f" ({notes[name]})" if name in notes else "")
    _SHARED_USED[fv] = _SHARED_USED.get(fv, ()) + names


def shared_flags_used(fv: flags.FlagValues) -> tuple[str, ...]:
    """The shared flags a verb's registry took (its other flags are the verb's own)."""
    return _SHARED_USED.get(fv, ())


def takes_gin(fv: flags.FlagValues) -> bool:
    """Whether the verb reads gin (then its main takes the `--gin.NAME=VALUE` bindings)."""
    return "gin_file" in fv
