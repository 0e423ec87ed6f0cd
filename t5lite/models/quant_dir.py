"""Quantized model dirs: `quantize_model_dir(src, dst)` (the `t5lite quantize` verb).

A quantized model dir is a normal model dir (model_config.json, run_info.json, a params-only
checkpoint) plus `quantization.json`; its checkpoint holds the int8 weights and their float32
`<name>_scale` arrays instead of the float weights, so `load_model` builds the quantized
structure abstractly and restores it directly (the float weights are never read).

Example::

    >>> quantize_model_dir("runs/demo", "runs/demo_int8", QuantConfig())["quantized_weights"]
    31
"""

from __future__ import annotations

import dataclasses
import posixpath

import jax
import numpy as np
from flax import nnx

from t5lite import storage
from t5lite.errors import UserError
from t5lite.models.quant import QuantConfig, quantize_model, read_quant_info, write_quant_info


def _nbytes(state) -> int:
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(state)))


def quantize_model_dir(src: str, dst: str, config: QuantConfig, step: int | None = None
                       ) -> dict:
    """Quantize the checkpoint of model dir `src` (latest, or `step`) into a new model dir
    `dst`. Returns a summary {step, quantized_weights, float_mb, int8_mb}."""
    from t5lite import checkpoint
    from t5lite.inference import load_model
    from t5lite.model_dir import (read_model_config, read_run_info, write_model_config,
                                  write_run_info)

    if not storage.isdir(src):
        raise UserError(f"--model_dir {src!r} does not exist.")
    if read_quant_info(src) is not None:
        raise UserError(f"{src} is already quantized ({src}/quantization.json); quantize the "
                        "float model dir it came from.")
    if storage.abspath(src) == storage.abspath(dst):
        raise UserError("--output must differ from --model_dir (the float model is kept).")
    if storage.exists(storage.join(dst, "model_config.json")) or \
            checkpoint.latest_step(dst) is not None:
        raise UserError(f"--output {dst!r} already holds a model; choose a new directory.")
    cfg = read_model_config(src)
    info = read_run_info(src)
    if not storage.exists(info.vocabulary):
        raise UserError(f"the vocabulary {info.vocabulary} of {src} is missing; the quantized "
                        "dir needs a copy of it.")
    model, found = load_model(src, step=step, config=cfg)
    float_params = nnx.state(model, nnx.Param)
    float_bytes = _nbytes(float_params)
    before = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(float_params)}
    quantize_model(model, config)
    params = nnx.state(model, nnx.Param)
    after = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    storage.makedirs(dst)
    vocab_name = posixpath.basename(info.vocabulary)
    storage.write_atomic(storage.join(dst, vocab_name), storage.read_bytes(info.vocabulary))
    vocab_extra = posixpath.splitext(info.vocabulary)[0] + ".vocab"
    if storage.exists(vocab_extra):
        storage.write_atomic(storage.join(dst, posixpath.basename(vocab_extra)),
                             storage.read_bytes(vocab_extra))
    checkpoint.save_params(dst, params, step=found)
    write_model_config(dst, cfg)
    write_run_info(dst, dataclasses.replace(info, vocabulary=vocab_name))
    write_quant_info(dst, config, source=storage.abspath(src), source_step=int(found))
    return {"step": int(found), "quantized_weights": len(after - before),
            "float_mb": float_bytes / 1e6, "int8_mb": _nbytes(params) / 1e6}
