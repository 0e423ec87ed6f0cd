"""`t5lite import`: bring a Hugging Face transformers T5 checkpoint into a t5lite model dir.

Example::

    t5lite import --format=hf --input=/path/to/t5-v1_1-small --model_dir=runs/t5_small
    t5lite infer --model_dir=runs/t5_small --input="translate English to German: Hello"
    t5lite train --gin_file=runs/t5_small/model.gin --gin_file=gin/runs/pretrain.gin \
        --gin.INIT_FROM="'runs/t5_small'" --gin.MIXTURE_OR_TASK_NAME=... --model_dir=runs/ft

The directory is what `save_pretrained` writes (config.json + model.safetensors or
pytorch_model.bin). Its `spiece.model` is copied into the model dir; transformers 5 saves
tokenizer.json instead, so then pass the SentencePiece model with --vocab. See
`t5lite.export.hf` for the supported layouts.
"""

from __future__ import annotations

from absl import flags

from t5lite.commands import common
from t5lite.errors import UserError

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "model_dir", model_dir="the one to write; must hold no checkpoint")
flags.DEFINE_enum("format", "hf", ["hf"], "source format (hf = transformers save_pretrained)",
                  flag_values=FLAGS)
flags.DEFINE_string("input", None, "the transformers model directory", flag_values=FLAGS)
flags.DEFINE_string("vocab", None, "SentencePiece model (default: INPUT/spiece.model)",
                    flag_values=FLAGS)
flags.DEFINE_integer("inputs_length", 512, "input length recorded in run_info.json (max input "
                     "tokens for infer/eval)", flag_values=FLAGS)
flags.DEFINE_integer("targets_length", 114, "target length recorded in run_info.json (default "
                     "max decode length)", flag_values=FLAGS)
flags.DEFINE_bool("scan_layers", True, "store the layers stacked for nnx.scan (fast compiles)",
                  flag_values=FLAGS)


def main() -> None:
    if not FLAGS.input:
        raise UserError("--input is required (a transformers save_pretrained directory).")
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required (where the t5lite model dir is written).")
    from t5lite.export.hf import import_hf

    cfg = import_hf(FLAGS.input, FLAGS.model_dir, vocab=FLAGS.vocab,
                    scan_layers=FLAGS.scan_layers, inputs_length=FLAGS.inputs_length,
                    targets_length=FLAGS.targets_length)
    print(f"imported {FLAGS.input} into {FLAGS.model_dir}: d_model={cfg.d_model}, "
          f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, vocab {cfg.vocab_size}, "
          f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings; gin: "
          f"{FLAGS.model_dir}/model.gin")
