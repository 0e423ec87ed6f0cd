"""The `t5lite` command: `t5lite <verb> [flags]`.

Each verb lives in its own module `t5lite.commands.<verb>` that defines its absl flags and a
`main(argv)` function; this dispatcher imports only the verb that was asked for, so `t5lite data`
never pays for importing the trainer and vice versa.

Example::

    t5lite train --gin_file=gin/demo.gin --model_dir=runs/demo
    t5lite data --task=demo_ul2 --num=3
"""

from __future__ import annotations

import importlib
import sys

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
    "info": ("t5lite.commands.info", "print parameter shapes, axes and counts of a gin model config"),
}


def _usage() -> str:
    lines = ["usage: t5lite <verb> [--flags]", "", "verbs:"]
    for verb, (_, text) in VERBS.items():
        lines.append(f"  {verb:<8} {text}")
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    verb = argv[1]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}.\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    module_name, _ = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"error: `t5lite {verb}` is not available in this build.", file=sys.stderr)
            sys.exit(2)
        raise
    from absl import app, flags

    # `t5lite <verb> --help` lists the flags the verb's module defines (absl shows the key
    # flags of sys.argv[0], the console script, which defines none itself).
    for flag in flags.FLAGS.get_flags_for_module(module.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def run_verb(verb_argv: list[str]) -> None:
        _quiet_library_logs(argv[2:])
        try:
            module.main(verb_argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    from t5lite.commands import gin_setup

    rest, gin_setup.COMMAND_LINE_BINDINGS[:] = gin_setup.split_gin_overrides(argv[2:])
    app.run(run_verb, argv=[f"t5lite {verb}"] + rest)


if __name__ == "__main__":
    main()
