"""Checks that a fine-tuning run's `init_from` model dir fits the run's `ModelConfig`.

`check_init_from_config(init_from, model_config)` compares the fields that decide parameter
shapes and names with the `model_config.json` of `init_from` and raises one `UserError` naming
the first field that differs, e.g.::

    INIT_FROM=runs/demo was trained with ModelConfig.vocab_size=8192 but this run has
    ModelConfig.vocab_size=32128; the parameters cannot be restored. ...

It runs while the run is planned, before anything is written to the model dir. Fields that do
not change shapes (dropout_rate, dtype, remat_policy, attention_impl, ...) may differ freely.
A checkpoint dir without model_config.json is checked parameter by parameter instead
(`t5lite.checkpoint.check_params_compatible`).
"""

from __future__ import annotations

from t5lite import storage
from t5lite.config import ModelConfig
from t5lite.errors import UserError

# ModelConfig fields that change which parameters exist or their shapes.
SHAPE_FIELDS = ("architecture", "vocab_size", "d_model", "num_heads", "num_kv_heads",
                "head_dim", "d_ff", "gated", "num_encoder_layers", "num_decoder_layers",
                "position_scheme", "relative_num_buckets", "tie_embeddings", "num_experts",
                "moe_layer_period", "moe_in_encoder", "moe_in_decoder", "scan_layers")


def check_init_from_config(init_from: str, model_config: ModelConfig) -> None:
    """Raise `UserError` naming the first shape-deciding ModelConfig field that differs."""
    from t5lite.model_dir import MODEL_CONFIG_FILE, read_model_config

    if not storage.exists(storage.join(init_from, MODEL_CONFIG_FILE)):
        if not (storage.exists(init_from) or storage.isdir(init_from)):
            raise UserError(f"INIT_FROM={init_from} does not exist; give the model dir of a "
                            "trained (`t5lite train`) or imported (`t5lite import`) model.")
        return  # a bare checkpoint dir: the per-parameter shape check applies
    saved = read_model_config(init_from)
    for field in SHAPE_FIELDS:
        theirs, ours = getattr(saved, field), getattr(model_config, field)
        if theirs != ours:
            raise UserError(
                f"INIT_FROM={init_from} was trained with ModelConfig.{field}={theirs!r} but this "
                f"run has ModelConfig.{field}={ours!r}; the parameters cannot be restored. Use "
                f"the model's own architecture (its model_config.json; an imported model's "
                f"model.gin) or set --gin.ModelConfig.{field}={theirs!r}. Nothing was written.")
