"""Checks that run before a training run writes anything into its model dir.

`t5lite train` (and `t5lite.train.loop.train`) rewrites `model_config.json`, `run_info.json`,
`operative_config.gin`, `model-info.txt` and creates `checkpoints/` and `tensorboard/` when it
starts. Every input that can be refused is refused before that, so a rejected command leaves the
model dir byte-identical:

- `check_data`: the task's pipeline is built once (nothing is read), which runs the objective's
  length checks (e.g. span corruption with a targets length too short for its inputs length);
- `check_model_dir`: an existing `run_info.json` / `model_config.json` must be readable, and when
  the dir holds a checkpoint, the architecture must be the one it was trained with (the message
  names every changed field);
- `check_optimizer_state`: a full checkpoint's optimiser state must fit the configured optimiser
  (the message names the entries that differ) instead of failing inside Orbax.

The architecture / feature-converter pairing is checked by `t5lite.config.check_feature_converter`
(called by the training loop before it writes). Example::

    >>> config_changes(ModelConfig(d_ff=64), ModelConfig(d_ff=96, dropout_rate=0.1))
    ['d_ff: 64 -> 96']
"""

from __future__ import annotations

import dataclasses
from typing import Any

from t5lite.errors import ConfigError, UserError

# ModelConfig fields that change how a model is computed, not what its parameters mean: they may
# differ between a checkpoint and the run that resumes from it.
RUNTIME_FIELDS = frozenset({"dropout_rate", "dtype", "remat_policy", "attention_impl",
                            "expert_capacity_factor", "moe_dropless", "scan_unroll",
                            "shared_relative_bias", "cast_params_once"})


def check_data(data_config: Any) -> None:
    """Build (but do not read) the training pipeline: raises the task's and the objective's
    ConfigErrors (unknown split, sequence lengths too short for the objective, ...)."""
    from t5lite.data.pipeline import build_dataset

    cfg = dataclasses.replace(data_config, split="train", host_batch_size=1, num_epochs=None)
    build_dataset(cfg)


def config_changes(saved: Any, wanted: Any) -> list[str]:
    """`["d_ff: 64 -> 96", ...]` for every architecture field that differs (RUNTIME_FIELDS
    excepted)."""
    out = []
    for field in dataclasses.fields(wanted):
        if field.name in RUNTIME_FIELDS:
            continue
        a, b = getattr(saved, field.name), getattr(wanted, field.name)
        if a != b:
            out.append(f"{field.name}: {a!r} -> {b!r}")
    return out


def check_model_dir(model_dir: str, model_config: Any) -> None:
    """Refuse a model dir whose run files are unreadable, or whose checkpoint was trained with
    another architecture (read only; nothing is written)."""
    from t5lite import checkpoint, storage
    from t5lite import model_dir as md

    if storage.isfile(model_dir):
        raise UserError(f"--model_dir={model_dir} exists and is not a directory.")
    if storage.exists(storage.join(model_dir, md.RUN_INFO_FILE)):
        md.read_run_info(model_dir)  # UserError naming the file and the bad keys
    config_path = storage.join(model_dir, md.MODEL_CONFIG_FILE)
    if not storage.exists(config_path) or checkpoint.latest_step(model_dir) is None:
        return
    saved = md.read_model_config(model_dir)
    changes = config_changes(saved, model_config)
    if changes:
        raise ConfigError(
            f"{model_dir} holds a checkpoint of another architecture: "
            + ", ".join(changes) + f" ({config_path} -> this run's config). Use the config the "
            "checkpoint was trained with, or a fresh --model_dir (INIT_FROM takes the parameters "
            "of a model with the same shapes).")


def check_optimizer_state(model_dir: str, step: int, abstract_opt_state: Any) -> None:
    """Refuse a full checkpoint whose optimiser state does not fit `abstract_opt_state`."""
    from t5lite import checkpoint

    saved = checkpoint.saved_opt_state_shapes(model_dir, step)
    if saved is None:  # a params-only checkpoint: the run builds a fresh optimiser state
        return
    wanted = checkpoint.opt_state_shapes(abstract_opt_state)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if not (missing or extra or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} entries the checkpoint lacks (e.g. {missing[0]} "
                     f"{wanted[missing[0]]})")
    if extra:
        parts.append(f"{len(extra)} entries this optimiser does not have (e.g. {extra[0]} "
                     f"{saved[extra[0]]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} entries of another shape (e.g. {k}: {saved[k]} in the "
                     f"checkpoint, {wanted[k]} now)")
    raise ConfigError(
        f"the checkpoint of step {step} in {model_dir} was written with another optimiser "
        f"configuration (OptimizerConfig: name, factoring or momentum changed): "
        + "; ".join(parts) + ". Resume with the optimiser it was trained with, or start a "
        "fresh --model_dir with INIT_FROM (parameters only, fresh optimiser state).")
