"""Import from / export to a Hugging Face `transformers` T5 directory.

`import_hf(HF_DIR, MODEL_DIR)` turns a `save_pretrained` directory of
`T5ForConditionalGeneration` (T5 v1.1 / mT5 layout: gated-GELU, untied; or the original T5
layout: ReLU, tied, scaled logits) into a t5lite model dir:

    MODEL_DIR/checkpoints/0/   params-only checkpoint (`t5lite.checkpoint.save_params`)
    MODEL_DIR/model_config.json, run_info.json
    MODEL_DIR/model.gin        `ModelConfig.<field> = value` for every field: pass it as
                               --gin_file to `t5lite train` together with init_from=MODEL_DIR
                               to fine-tune
    MODEL_DIR/spiece.model     the vocabulary (HF_DIR/spiece.model, or --vocab)

`t5lite infer`, `t5lite eval` and fine-tuning run on it. Weights are read from
`model.safetensors` (or its sharded index) without torch, or from `pytorch_model.bin` with torch.
Layouts t5lite cannot represent exactly (T5EncoderModel, UMT5's per-layer position biases,
LongT5, Switch Transformers, erf-GELU feed-forwards, ...) are refused with a message that names
what is unsupported.

`export_hf(MODEL_DIR, OUT_DIR)` writes the reverse: config.json, generation_config.json,
model.safetensors, spiece.model and a transformers tokenizer (tokenizer.json, ...; see
`t5lite.export.hf_tokenizer`), loadable with `T5ForConditionalGeneration.from_pretrained(OUT_DIR)`
and `AutoTokenizer.from_pretrained(OUT_DIR)`, which tokenizes exactly as t5lite does.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import numpy as np

from t5lite.config import ModelConfig, config_to_dict
from t5lite.errors import ConfigError, UserError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("t5", "mt5")
SUPPORTED_ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration",
                           "T5WithLMHeadModel")
MODEL_GIN_FILE = "model.gin"
VOCAB_FILE = "spiece.model"


# ------------------------------------------------------------------------------ reading HF
def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise UserError(f"--input {hf_dir!r} is not a directory (expected a transformers "
                        "save_pretrained directory).")
    if not os.path.exists(path):
        raise UserError(f"{hf_dir} has no config.json; is it a transformers save_pretrained "
                        "directory?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_supported(hf_config: dict[str, Any]) -> None:
    """Raise UserError naming every unsupported part of a transformers config."""
    problems = []
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type={model_type!r} (supported: {list(SUPPORTED_MODEL_TYPES)}; "
                        "UMT5, LongT5 and Switch Transformers have different layers)")
    archs = hf_config.get("architectures") or []
    unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        problems.append(f"architectures={unsupported} (supported: "
                        f"{list(SUPPORTED_ARCHITECTURES)}; an encoder-only T5EncoderModel has "
                        "no decoder to generate with)")
    if hf_config.get("is_encoder_decoder") is False or hf_config.get("is_decoder") is True:
        problems.append("is_encoder_decoder=False / is_decoder=True (only full encoder-decoder "
                        "T5 models are supported)")
    if problems:
        raise UserError("cannot import this transformers model: " + "; ".join(problems) + ".")


def read_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a save_pretrained directory as float32 numpy arrays."""
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    torch_bin = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.exists(single) or os.path.exists(index):
        from safetensors.numpy import load_file

        files = [single] if os.path.exists(single) else sorted(
            {os.path.join(hf_dir, f) for f in json.load(open(index))["weight_map"].values()})
        state: dict[str, np.ndarray] = {}
        for f in files:
            state.update(load_file(f))
    elif os.path.exists(torch_bin):
        try:
            import torch
        except ImportError:
            raise UserError(f"{torch_bin} needs PyTorch to read; install torch or re-save the "
                            "model with safetensors.") from None
        state = {k: v.float().numpy() for k, v in
                 torch.load(torch_bin, map_location="cpu", weights_only=True).items()}
    else:
        raise UserError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin.")
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}


# ------------------------------------------------------------------------------ gin file
def model_gin_text(cfg: ModelConfig, source: str) -> str:
    """A gin file binding every ModelConfig field (what `t5lite train --gin_file` reads)."""
    lines = [f"# t5lite model config imported from {source}",
             "# Use with: t5lite train --gin_file=<this file> --gin_file=gin/runs/pretrain.gin "
             "--gin.INIT_FROM='<this model dir>' ...", ""]
    for name, value in config_to_dict(cfg).items():
        text = json.dumps(value) if isinstance(value, str) else repr(value)
        lines.append(f"ModelConfig.{name} = {text}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ import
def import_hf(hf_dir: str, model_dir: str, *, vocab: str | None = None,
              scan_layers: bool = True, inputs_length: int = 512, targets_length: int = 114,
              dtype: str = "float32", source: str | None = None) -> ModelConfig:
    """Write a t5lite model dir from a transformers T5 directory (see module docstring).
    A gs:// `hf_dir` (or `vocab`) is downloaded to a temporary directory first. `source` is
    what model.gin names as the origin (default: `hf_dir`, made absolute when local)."""
    from t5lite import storage

    if storage.is_remote(hf_dir):
        if not storage.isdir(hf_dir):
            raise UserError(f"--input {hf_dir!r} is not a directory (expected a transformers "
                            "save_pretrained directory).")
        with tempfile.TemporaryDirectory(prefix="t5lite-import-") as tmp:
            for name in storage.listdir(hf_dir):
                if storage.isfile(storage.join(hf_dir, name)):
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(storage.read_bytes(storage.join(hf_dir, name)))
            try:
                return import_hf(tmp, model_dir, vocab=vocab, scan_layers=scan_layers,
                                 inputs_length=inputs_length, targets_length=targets_length,
                                 dtype=dtype, source=source or hf_dir)
            except UserError as e:  # name the bucket's directory, not the temporary copy
                raise UserError(str(e).replace(tmp, hf_dir)) from None
    if vocab is not None:
        vocab = storage.local_copy(vocab)
    import jax
    from flax import nnx

    from t5lite import checkpoint
    from t5lite.data.vocab import load_vocabulary
    from t5lite.export.hf_mapping import config_from_hf, hf_state_dict_to_params
    from t5lite.model_dir import RunInfo, write_model_config, write_run_info
    from t5lite.models import abstract_model

    hf_config = read_hf_config(hf_dir)
    check_supported(hf_config)
    if checkpoint.latest_step(model_dir) is not None:
        raise UserError(f"--model_dir {model_dir} already holds a checkpoint; import into an "
                        "empty directory (nothing was changed).")
    vocab_src = vocab or os.path.join(hf_dir, VOCAB_FILE)
    if not os.path.exists(vocab_src):
        raise UserError(f"{hf_dir} has no {VOCAB_FILE} (transformers 5 saves tokenizer.json "
                        "instead); pass the SentencePiece model with --vocab=PATH.")
    try:
        cfg = config_from_hf(hf_config, scan_layers=scan_layers, dropout_rate=0.0, dtype=dtype)
    except ConfigError as e:
        raise UserError(f"cannot import this transformers model: {e}") from None
    spm = load_vocabulary(vocab_src)
    if spm.vocab_size > cfg.vocab_size:
        raise UserError(f"vocabulary {vocab_src} has {spm.vocab_size} ids (with 100 extra ids) "
                        f"but the model has only {cfg.vocab_size} embedding rows; is it the "
                        "right vocabulary?")

    state = read_hf_weights(hf_dir)
    if not cfg.tie_embeddings and "lm_head.weight" not in state:
        # transformers 5 may save a v1.1 model with its output layer tied to the embedding
        state["lm_head.weight"] = state["shared.weight"]
    pure = hf_state_dict_to_params(state, cfg)
    abstract = nnx.state(abstract_model(cfg), nnx.Param)
    want = jax.tree.map(lambda a: tuple(a.shape), nnx.to_pure_dict(abstract))
    got = jax.tree.map(lambda a: tuple(np.shape(a)), pure)
    if want != got:
        raise UserError(f"the weights in {hf_dir} do not match its config.json (expected "
                        "parameter shapes differ); the directory may be corrupt.")
    params = jax.tree.map(lambda a, ref: np.asarray(a, dtype=ref.dtype), pure,
                          nnx.to_pure_dict(abstract))

    from t5lite import storage

    storage.makedirs(model_dir)
    checkpoint.save_params(model_dir, params, step=0)
    with open(vocab_src, "rb") as f:
        storage.write_atomic(storage.join(model_dir, VOCAB_FILE), f.read())
    write_model_config(model_dir, cfg)
    write_run_info(model_dir, RunInfo(task=None, vocabulary=VOCAB_FILE,
                                      task_feature_lengths={"inputs": int(inputs_length),
                                                            "targets": int(targets_length)},
                                      extra_ids=100, feature_converter="enc_dec"))
    storage.write_atomic(storage.join(model_dir, MODEL_GIN_FILE),
                         model_gin_text(cfg, source or os.path.abspath(hf_dir)))
    log.info("imported %s into %s", source or hf_dir, model_dir)
    return cfg


# ------------------------------------------------------------------------------ export
def export_hf(model_dir: str, output_dir: str, *, step: int | None = None) -> dict[str, Any]:
    """Write `model_dir`'s checkpoint as a transformers T5 directory; returns the config dict.

    A gs:// `output_dir` is written locally first and then uploaded, config.json last: a
    directory with config.json is complete."""
    from safetensors.numpy import save_file

    from t5lite import storage

    if storage.is_remote(output_dir):
        if storage.exists(storage.join(output_dir, "config.json")):
            raise UserError(f"--output {output_dir} already holds a model (config.json); choose "
                            "an empty directory.")
        with tempfile.TemporaryDirectory(prefix="t5lite-export-") as tmp:
            config = export_hf(model_dir, tmp, step=step)
            storage.upload_dir(tmp, output_dir, last=("config.json",))
        return config

    from t5lite.export.hf_mapping import check_hf_compatible, hf_config_from, params_to_hf_state_dict
    from t5lite.inference import load_model
    from t5lite.model_dir import read_model_config, read_run_info

    cfg = read_model_config(model_dir)
    try:
        check_hf_compatible(cfg)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if os.path.exists(os.path.join(output_dir, "config.json")):
        raise UserError(f"--output {output_dir} already holds a model (config.json); choose an "
                        "empty directory.")
    model, used_step = load_model(model_dir, step=step, config=cfg)
    tensors = params_to_hf_state_dict(model, cfg)
    # The token embeddings of both stacks are transformers' aliases of shared.weight; so is
    # lm_head.weight when tied. An untied lm_head is written and transformers keeps it untied
    # (it ties only weights that are absent or equal).
    dropped = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if cfg.tie_embeddings:
        dropped.add("lm_head.weight")
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32).copy()
               for k, v in tensors.items() if k not in dropped}
    config = dict(hf_config_from(cfg), model_type="t5",
                  architectures=["T5ForConditionalGeneration"], is_gated_act=cfg.gated,
                  dense_act_fn={"gelu": "gelu_new", "silu": "silu", "relu": "relu"}[
                      cfg.activation])
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(output_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}, f)
    try:
        info = read_run_info(model_dir)
    except UserError:
        info = None
        log.warning("%s has no run_info.json: no vocabulary copied", model_dir)
    if info is not None and storage.exists(info.vocabulary):
        # spiece.model plus a tokenizer.json that tokenizes exactly like t5lite (hf_tokenizer)
        from t5lite.export.hf_tokenizer import write_hf_tokenizer

        write_hf_tokenizer(storage.local_copy(info.vocabulary), output_dir, extra_ids=info.extra_ids,
                           model_max_length=info.task_feature_lengths.get("inputs", 512))
    log.info("exported %s (step %s) to %s", model_dir, used_step, output_dir)
    return config


__all__ = ["check_supported", "export_hf", "import_hf", "model_gin_text", "read_hf_weights"]
