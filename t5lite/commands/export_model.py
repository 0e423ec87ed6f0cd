"""`t5lite export`: write a model dir's checkpoint as a Hugging Face transformers T5 directory.

Example::

    t5lite export --format=hf --model_dir=runs/demo --output=/tmp/demo_hf
    python -c "import transformers; transformers.T5ForConditionalGeneration.from_pretrained('/tmp/demo_hf')"

Only configurations transformers' T5 can express are exported (relative positions, MHA, dense
FFN, encoder-decoder); others are refused with the reason.
"""

from __future__ import annotations

from absl import flags

from t5lite.commands import common
from t5lite.errors import UserError

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "model_dir", "step", model_dir="the one to export")
flags.DEFINE_enum("format", "hf", ["hf"], "target format (hf = transformers save_pretrained)",
                  flag_values=FLAGS)
flags.DEFINE_string("output", None, "directory to write (must not hold a model yet)",
                    flag_values=FLAGS)


def main() -> None:
    if not FLAGS.model_dir or not FLAGS.output:
        raise UserError("--model_dir and --output are both required.")
    from t5lite.export.hf import export_hf

    export_hf(FLAGS.model_dir, FLAGS.output, step=FLAGS.step)
    print(f"exported {FLAGS.model_dir} to {FLAGS.output} (transformers T5ForConditionalGeneration)")
