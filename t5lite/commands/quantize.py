"""`t5lite quantize`: write an int8 copy of a model dir that loads without the float weights.

Example::

    t5lite quantize --model_dir=runs/demo --output=runs/demo_int8
    t5lite infer --model_dir=runs/demo_int8 --input="The <extra_id_0> sat on the mat."

The output dir holds model_config.json, run_info.json (its vocabulary copied in), a params-only
checkpoint with int8 weights and float32 per-channel scales, and quantization.json (what was
quantized and how: see `t5lite.models.quant`). `t5lite infer` and
`Generator.from_model_dir` read it like any model dir. `--activations=int8x2` (the CPU default)
also quantizes each activation row on the fly (two int8 parts, ~15 bits) so every matmul runs
int8 x int8; `int8` uses one part; `float` keeps activations float (weight-only, the GPU/TPU
default).
"""

from __future__ import annotations

from absl import flags

from t5lite.commands import common
from t5lite.errors import UserError

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "model_dir", "step", model_dir="the float model to quantize")
flags.DEFINE_string("output", None, "directory to write the quantized model dir to (must not "
                    "hold a model yet)", flag_values=FLAGS)
flags.DEFINE_enum("weights", "int8", ["int8"], "weight format", flag_values=FLAGS)
flags.DEFINE_enum("activations", None, ["int8x2", "int8", "float"], "int8x2 / int8: "
                  "quantize activation rows on the fly into two int8 parts / one (int8 x int8 "
                  "matmuls); float: weight-only (default: int8x2 on CPU, float elsewhere)",
                  flag_values=FLAGS)


def main() -> None:
    if not FLAGS.model_dir or not FLAGS.output:
        raise UserError("--model_dir and --output are both required.")
    from t5lite.models.quant import QuantConfig
    from t5lite.models.quant_dir import quantize_model_dir

    config = QuantConfig(weights=FLAGS.weights, activations=FLAGS.activations).resolved()
    summary = quantize_model_dir(FLAGS.model_dir, FLAGS.output, config, step=FLAGS.step)
    print(f"quantized {FLAGS.model_dir} (step {summary['step']}) to {FLAGS.output}: "
          f"{summary['quantized_weights']} weights int8 ({summary['float_mb']:.1f} MB float -> "
          f"{summary['int8_mb']:.1f} MB int8 + scales), activations {config.activations}")
