"""`t5lite export`: write a model dir's checkpoint as a Hugging Face transformers T5 directory.

Example::

    t5lite export --format=hf --model_dir=runs/demo --output=/tmp/demo_hf
    python -c "import transformers; transformers.T5ForConditionalGeneration.from_pretrained('/tmp/demo_hf')"

Only configurations transformers' T5 can express are exported (relative positions, MHA, dense
FFN, encoder-decoder); others are refused with the reason.
"""

from __future__ import annotations

from absl import flags

from t5lite.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_enum("format", "hf", ["hf"], "target format (hf = transformers save_pretrained)")
flags.DEFINE_string("model_dir", None, "the t5lite model dir to export")
flags.DEFINE_string("output", None, "directory to write (must not hold a model yet)")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
    if not FLAGS.model_dir or not FLAGS.output:
        raise UserError("--model_dir and --output are both required.")
    from t5lite.export.hf import export_hf

    export_hf(FLAGS.model_dir, FLAGS.output, step=FLAGS.step)
    print(f"exported {FLAGS.model_dir} to {FLAGS.output} (transformers T5ForConditionalGeneration)")
