"""The `t5lite` command: `t5lite <verb> [flags]`.

Each verb lives in its own module `t5lite.commands.<verb>` that defines its absl flags in its own
registry `FLAGS` (shared flags come from `t5lite.commands.common`) and a `main()` function
(`main(gin_bindings)` for verbs that read gin). This dispatcher imports only the verb that was
asked for, so `t5lite data` never pays for importing the trainer and vice versa; heavy imports
inside verb modules are deferred to `main`, so importing all of them together is cheap too.

Example::

    t5lite train --gin_file=gin/demo.gin --model_dir=runs/demo
    t5lite data --task=demo_ul2 --num=3
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import NoReturn

from t5lite.errors import UserError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("t5lite.commands.train", "train a model from gin files into --model_dir"),
    "eval": ("t5lite.commands.eval", "evaluate the latest checkpoint in --model_dir"),
    "infer": ("t5lite.commands.infer", "decode text with a trained model"),
    "data": ("t5lite.commands.data", "show what the model will see for a SeqIO task"),
    "vocab": ("t5lite.commands.vocab", "train a SentencePiece vocabulary"),
    "import": ("t5lite.commands.import_model", "import a Hugging Face T5 checkpoint"),
    "export": ("t5lite.commands.export_model", "export a model dir to Hugging Face transformers"),
    "teacher-logits": ("t5lite.commands.teacher_logits",
                       "store a distillation teacher's top-k logits of the training stream"),
    "quantize": ("t5lite.commands.quantize", "write an int8-weight copy of a model dir"),
    "info": ("t5lite.commands.info", "print parameter shapes, axes and counts of a gin model config"),
    "plan": ("t5lite.commands.plan", "compile the train step for a TPU slice: memory per device, fit, FLOPs, collectives"),
}


# Exit statuses: 0 done (or stopped by SIGTERM / SIGINT after saving), 2 bad input (one
# `error:` line), 3 the training loss became NaN/inf (the last good checkpoint is kept),
# 130 interrupted without saving (a second Ctrl-C).
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def exit_status(error: UserError) -> int:
    """The exit status for `error`: its `exit_status` attribute, else 2 (bad input)."""
    return int(getattr(error, "exit_status", EXIT_BAD_INPUT))


def _usage() -> str:
    lines = ["usage: t5lite <verb> [--flags]", "", "verbs:"]
    for verb, (_, text) in VERBS.items():
        lines.append(f"  {verb:<14} {text}")
    lines.append("")
    lines.append("`t5lite <verb> --help` lists the verb's flags.")
    return "\n".join(lines)


def _quiet_library_logs(args: list[str]) -> None:
    """Hide libraries' INFO chatter (Orbax, TensorFlow via absl) unless --verbosity is given."""
    if any(a.startswith(("--verbosity", "-v")) for a in args):
        return
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


def import_verb(verb: str) -> ModuleType:
    """The module of `verb` (UserError for an unknown verb or one missing from this build)."""
    if verb not in VERBS:
        raise UserError(f"unknown verb {verb!r}.\n\n{_usage()}")
    module_name, _ = VERBS[verb]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise UserError(f"`t5lite {verb}` is not available in this build.") from None
        raise


def _parse_flags(prog: str, argv: list[str]) -> list[str]:
    """absl's flag parsing, with bad flags reported as one `error:` line and exit status 2."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = " ".join(str(e).split())
        print(f"error: {text} (`{prog} --help` lists its flags)", file=sys.stderr)
        sys.exit(2)


def run_verb(verb: str, args: list[str]) -> NoReturn:
    """Parse `args` with the flags of `verb` and run it; exits (0, or 2 after an `error:` line).

    The verb's own flag registry (`module.FLAGS`, see t5lite.commands.common) joins absl's
    global registry for this run only, so any number of verbs can run one after another in one
    process (tests do) and `--help` lists just this verb's flags. Verbs that read gin get the
    `--gin.NAME=VALUE` bindings as the argument of their `main`; the others reject them.
    """
    from functools import partial

    from absl import app, flags

    from t5lite.commands import common, gin_setup

    module = import_verb(verb)
    verb_flags: flags.FlagValues = module.FLAGS
    takes_gin = common.takes_gin(verb_flags)
    gin_bindings: list[str] = []
    if takes_gin:
        args, gin_bindings = gin_setup.split_gin_overrides(args)
    prog = f"t5lite {verb}"

    def run(verb_argv: list[str]) -> None:
        verb_flags.mark_as_parsed()  # its flags were parsed through the global registry
        _quiet_library_logs(args)
        try:
            if len(verb_argv) > 1:
                raise UserError(f"unexpected arguments {verb_argv[1:]}; flags look like "
                                "--name=value.")
            from t5lite import storage

            # every gs:// path given: credentials, endpoint and bucket checked in bounded time
            storage.check_remote_args(args + gin_bindings)
            cache_dir = (verb_flags["compilation_cache_dir"].value
                         if "compilation_cache_dir" in verb_flags else None)
            if cache_dir:
                from t5lite import compile_cache

                compile_cache.enable(cache_dir)
            if takes_gin:
                module.main(gin_bindings)
            else:
                module.main()
            if cache_dir and compile_cache.is_first_process():
                print(f"t5lite {verb}: {compile_cache.summary()}", file=sys.stderr)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(exit_status(e))
        except OSError as e:  # a full disk anywhere else (run files, TensorBoard, exports)
            import errno

            if e.errno != errno.ENOSPC:
                raise
            from t5lite.disk import disk_full_error

            print(f"error: {disk_full_error(e.filename or os.getcwd(), 'writing')}",
                  file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:  # a second Ctrl-C in `t5lite train`, or Ctrl-C elsewhere
            print(f"t5lite {verb}: interrupted: {e or 'stopped without saving'}.",
                  file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    flags.FLAGS.append_flag_values(verb_flags)
    try:
        # `--help` shows the key flags of sys.argv[0] (the console script defines none itself).
        for name in verb_flags:
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], verb_flags[name])
        app.run(run, argv=[prog] + args, flags_parser=partial(_parse_flags, prog))
    finally:
        if "t5lite.compile_cache" in sys.modules:  # a later verb in this process starts clean
            sys.modules["t5lite.compile_cache"].disable()
        flags.FLAGS.remove_flag_values(verb_flags)
        for name in verb_flags:
            verb_flags[name].unparse()  # back to the defaults for a later run in this process
    sys.exit(0)  # app.run always exits; this is for type checkers


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: `main(["t5lite", verb, *flags])`.

    Run as a program (`argv` None), it first re-executes itself with the host memory
    allocator `T5LITE_MALLOC` asks for (`t5lite.host_malloc`: jemalloc, t5lite's block cache or
    glibc's huge pages by default where they help; `T5LITE_MALLOC=system` keeps the process as
    started).
    """
    if argv is None:
        from t5lite.host_malloc import reexec_with_chosen_malloc

        reexec_with_chosen_malloc()
    argv = list(sys.argv if argv is None else argv)
    from t5lite import quiet_tf

    quiet_tf.install()  # no TensorFlow C++ start-up lines on the console (see t5lite/quiet_tf.py)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    try:
        import_verb(argv[1])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run_verb(argv[1], argv[2:])


if __name__ == "__main__":
    main()
