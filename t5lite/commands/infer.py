"""`t5lite infer`: decode text with a trained (or imported) model.

Example::

    t5lite infer --model_dir=runs/demo --input="The <extra_id_0> sat on the mat."
    t5lite infer --model_dir=runs/demo --input_file=prompts.txt --decode=beam --beam_size=4 \\
        --format=json --output_file=out.jsonl
    t5lite infer --model_dir=runs/demo --input_file=prompts.txt --quantize=int8 \\
        --cross_kv_dtype=bfloat16                       # int8 weights (t5lite.models.quant)
    t5lite infer --model_dir=runs/demo --input_file=prompts.txt --cross_attention=kv
        # cross-attention from per-layer K/V instead of the CPU default (absorbed: the steps
        # read the encoder output; t5lite.models.attention.absorbed_decode_attention)
    t5lite infer --model_dir=runs/demo --input_file=prompts.txt --dtype=bfloat16
        # bfloat16 compute for a model trained in float32 (weights stay as stored; composes
        # with --quantize=int8, --cross_kv_dtype and int8 model dirs)
    t5lite infer --model_dir=runs/ft --task_examples=5 --gin_file=gin/models/demo.gin \\
        --gin_file=gin/runs/finetune.gin --gin.INIT_FROM=runs/demo ...  # the training run's
        # gin files and flags, for a model fine-tuned on files (MIXTURE_OR_TASK_NAME=text2text)

Contract: one output line per input line, in order.
  --format=text   the decoded text (with --num_samples N > 1: the N outputs joined by a tab);
  --format=json   {"input": ..., "output": text, "output_ids": [ids without the start token, up
                  to and excluding EOS]} (with N > 1, "output" and "output_ids" are lists of N,
                  and "scores" holds each output's score).
Inputs are tokenised with the model's vocabulary (sentinels such as `<extra_id_0>` are
understood), EOS is appended, and they are decoded in padded batches of --batch_size. An input
longer than the model's input length is an error unless --truncate is given (then its first
tokens are kept).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from t5lite.commands import common
from t5lite.errors import UserError

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "model_dir", "step", "seed", "format", "module_import",
                        "gin_file", "dtype", "compilation_cache_dir",
                        model_dir="written by `t5lite train` or `t5lite import`",
                        seed="for sampling", module_import="for --task_examples")
# --gin_file (with --gin.NAME=VALUE): for --task_examples of a model fine-tuned on files
# (task text2text), the training run's gin files and flags, which name the files.
flags.DEFINE_string("input", None, "one input text (use --input_file for many)",
                    flag_values=FLAGS)
flags.DEFINE_string("input_file", None, "a text file with one input per line", flag_values=FLAGS)
flags.DEFINE_enum("decode", "greedy", ["greedy", "sample", "beam"], "decoding method",
                  flag_values=FLAGS)
flags.DEFINE_integer("beam_size", 4, "beam width (--decode=beam)", flag_values=FLAGS)
flags.DEFINE_float("alpha", 0.6, "beam search length penalty exponent ((5+len)/6)^alpha",
                   flag_values=FLAGS)
flags.DEFINE_float("temperature", 1.0, "sampling temperature (0 = greedy)", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)",
                     flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "nucleus sampling probability mass (1 = all)",
                   flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 1, "outputs per input (samples, or best beams)",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_decode_len", None, "max generated tokens (default: the model's "
                     "target length from run_info.json)", flag_values=FLAGS)
flags.DEFINE_string("output_file", None, "write here instead of stdout", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "inputs decoded together", flag_values=FLAGS)
flags.DEFINE_bool("truncate", False, "cut inputs longer than the model's input length instead "
                  "of failing", flag_values=FLAGS)
flags.DEFINE_enum("quantize", None, ["int8"], "quantize the weights after loading "
                  "(t5lite.models.quant; a dir written by `t5lite quantize` is int8 already)",
                  flag_values=FLAGS)
flags.DEFINE_enum("activations", None, ["int8x2", "int8", "float"], "with --quantize: "
                  "activation rows as two int8 parts / one (int8 x int8 matmuls) or float "
                  "(weight-only); default int8x2 on CPU",
                  flag_values=FLAGS)
flags.DEFINE_enum("cross_kv_dtype", "float", ["float", "bfloat16"], "dtype of the "
                  "cross-attention K/V kept for the decoding loop", flag_values=FLAGS)
flags.DEFINE_enum("cross_attention", "auto", ["auto", "kv", "absorbed"], "how decoding steps "
                  "read the encoder: kv = every layer's cross K/V, computed once per request; "
                  "absorbed = the encoder output itself, k / v kernels moved to the query and "
                  "output sides (no K/V; more FLOPs, fewer bytes); auto = absorbed on CPU "
                  "for float weights, kv elsewhere and for int8", flag_values=FLAGS)
flags.DEFINE_integer("task_examples", 0, "instead of --input: decode the first N validation "
                     "examples of the model's task (run_info.json) and print input, output, "
                     "target and the input with the model's filled-in spans", flag_values=FLAGS)


def read_inputs(text: str | None, path: str | None) -> list[str]:
    """The input lines: --input (one text) or --input_file (one per line)."""
    if (text is None) == (path is None):
        raise UserError("give exactly one of --input=TEXT or --input_file=FILE.")
    if text is not None:
        return [text]
    from t5lite import storage

    if not storage.isfile(path):
        raise UserError(f"--input_file {path!r} does not exist.")
    try:
        lines = storage.read_text(path).splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"--input_file {path!r} is not UTF-8 text ({e.reason} at byte "
                        f"{e.start}); convert it, e.g. `iconv -t UTF-8`.") from None
    except OSError as e:
        raise UserError(f"--input_file {path!r} cannot be read: {e.strerror}.") from None
    if not lines:
        raise UserError(f"--input_file {path!r} is empty: nothing to decode (one input per "
                        "line).")
    if not any(line.strip() for line in lines):
        raise UserError(f"--input_file {path!r} has only blank lines: nothing to decode (one "
                        "input per line).")
    return lines


def format_results(results, fmt: str) -> list[str]:
    """One output line per result (see the module docstring for the two formats)."""
    lines = []
    for r in results:
        single = len(r.outputs) == 1
        if fmt == "json":
            obj = {"input": r.input,
                   "output": r.outputs[0] if single else r.outputs,
                   "output_ids": r.output_ids[0] if single else r.output_ids}
            if not single:
                obj["scores"] = r.scores
            lines.append(json.dumps(obj, ensure_ascii=False))
        else:
            lines.append("\t".join(o.replace("\n", " ").replace("\t", " ") for o in r.outputs))
    return lines


def show_task_examples(model_dir: str, num: int, *, module_imports: list[str],
                       step: int | None, batch_size: int, decode: str,
                       **generator_options) -> None:
    """Decode the first `num` validation examples of the model's task and print them."""
    from t5lite.commands.task_setup import prepare_task
    from t5lite.inference_eval import show_predictions
    from t5lite.inference import Generator
    from t5lite.model_dir import read_run_info

    info = read_run_info(model_dir)
    if not info.task:
        raise UserError(f"{model_dir}/run_info.json names no task; --task_examples needs a "
                        "model trained on a registered task.")
    prepare_task(info.task, module_imports, info.task_feature_lengths)  # after parse_gin
    gen = Generator.from_model_dir(model_dir, step=step, batch_size=batch_size,
                                   **generator_options)
    lines = show_predictions(gen, info.task, info.task_feature_lengths, num=num, decode=decode)
    print(f"{num} validation examples of {info.task} decoded by {model_dir} ({decode}):")
    print("\n".join(lines))


def _generator_options() -> dict:
    return {"quantize": FLAGS.quantize, "activations": FLAGS.activations,
            "cross_kv_dtype": FLAGS.cross_kv_dtype, "dtype": FLAGS.dtype,
            "cross_attention": FLAGS.cross_attention}


def main(gin_bindings: Sequence[str]) -> None:
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required.")
    if (FLAGS.gin_file or gin_bindings) and not FLAGS.task_examples:
        raise UserError("--gin_file and --gin.NAME=VALUE are read only with --task_examples "
                        "(they name the files of a task from files); decoding --input needs "
                        "just --model_dir.")
    if FLAGS.task_examples:
        from t5lite.commands import gin_setup

        gin_setup.parse_gin(FLAGS.gin_file, gin_bindings)
        show_task_examples(FLAGS.model_dir, FLAGS.task_examples,
                           module_imports=FLAGS.module_import, step=FLAGS.step,
                           batch_size=FLAGS.batch_size, decode=FLAGS.decode,
                           **_generator_options())
        return
    inputs = read_inputs(FLAGS.input, FLAGS.input_file)
    from t5lite.inference import Generator

    gen = Generator.from_model_dir(FLAGS.model_dir, step=FLAGS.step, batch_size=FLAGS.batch_size,
                                   **_generator_options())
    results = gen.generate(inputs, FLAGS.decode, max_decode_len=FLAGS.max_decode_len,
                           beam_size=FLAGS.beam_size, alpha=FLAGS.alpha,
                           temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                           num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                           truncate=FLAGS.truncate)
    text = "".join(line + "\n" for line in format_results(results, FLAGS.format))
    if FLAGS.output_file:
        from t5lite import storage

        storage.write_atomic(FLAGS.output_file, text)  # local tmp + rename; gs://: one upload
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
