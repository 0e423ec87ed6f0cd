"""What a model directory holds, and the plain-JSON files in it.

A model dir is what `t5lite train` writes and what `t5lite eval`, `t5lite infer`, `t5lite export`
and the Python inference API read. `t5lite import` writes the same layout from a Hugging Face
checkpoint. Library code reads only the JSON files here (never gin):

    MODEL_DIR/
      model_config.json    ModelConfig fields (config_to_dict)
      run_info.json        task / vocabulary / feature lengths the model was trained with
      operative_config.gin the gin config of the last run (for people; not read back by code)
      model-info.txt       parameter shapes, logical axes, mesh axes, counts
      metrics.jsonl        one JSON object per line (train and eval metrics)
      checkpoints/         Orbax checkpoints, owned by t5lite.checkpoint
      tensorboard/         event files

Example::

    >>> write_run_info(d, RunInfo(task="demo_span_corruption", vocabulary="tasks/demo/spm.model",
    ...                           task_feature_lengths={"inputs": 512, "targets": 114}))
    >>> read_run_info(d).task
    'demo_span_corruption'
"""

from __future__ import annotations

import dataclasses
import json
import os

from t5lite import storage
from t5lite.config import ModelConfig, config_from_dict, config_to_dict
from t5lite.errors import UserError

MODEL_CONFIG_FILE = "model_config.json"
RUN_INFO_FILE = "run_info.json"
OPERATIVE_GIN_FILE = "operative_config.gin"
MODEL_INFO_FILE = "model-info.txt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"
TENSORBOARD_SUBDIR = "tensorboard"


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """How a model dir's model reads text: its task, vocabulary file and feature lengths."""

    task: str | None
    vocabulary: str  # path to a SentencePiece model (absolute, or relative to the model dir)
    task_feature_lengths: dict[str, int]
    extra_ids: int = 100
    feature_converter: str = "enc_dec"  # or "prefix_lm" for DecoderOnly models


def _write_json_atomic(path: str, payload: dict) -> None:
    storage.write_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _read_json(path: str, what: str) -> dict:
    if not storage.exists(path):
        raise UserError(f"{path} not found: {what}. Is this a t5lite model dir (written by "
                        "`t5lite train` or `t5lite import`)?")
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it or re-run `t5lite train`.")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); restore it "
                        "or re-run `t5lite train`.") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read: {e.strerror}.") from None


def write_model_config(model_dir: str, config: ModelConfig) -> None:
    storage.makedirs(model_dir)
    _write_json_atomic(os.path.join(model_dir, MODEL_CONFIG_FILE), config_to_dict(config))


def read_model_config(model_dir: str) -> ModelConfig:
    return config_from_dict(_read_json(os.path.join(model_dir, MODEL_CONFIG_FILE),
                                       "the model's architecture is unknown"))


def write_run_info(model_dir: str, info: RunInfo) -> None:
    storage.makedirs(model_dir)
    _write_json_atomic(os.path.join(model_dir, RUN_INFO_FILE), dataclasses.asdict(info))


def read_run_info(model_dir: str) -> RunInfo:
    path = os.path.join(model_dir, RUN_INFO_FILE)
    info = run_info_from_dict(_read_json(path, "the model's vocabulary and feature lengths are "
                                         "unknown"), path)
    if not storage.isabs(info.vocabulary):
        candidate = os.path.join(model_dir, info.vocabulary)
        if storage.exists(candidate):
            info = dataclasses.replace(info, vocabulary=candidate)
    return info


def run_info_from_dict(values: object, path: str = RUN_INFO_FILE) -> RunInfo:
    """A RunInfo from the JSON object of `path`; UserError naming unknown, missing or
    mistyped keys."""
    fields = {f.name: f for f in dataclasses.fields(RunInfo)}
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
    fix = "fix the file, or delete it and re-run `t5lite train` to rewrite it"
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a JSON object with keys {sorted(fields)}; {fix}.")
    unknown = sorted(set(values) - set(fields))
    missing = sorted(required - set(values))
    if unknown or missing:
        what = ([f"unknown keys {unknown}"] if unknown else []) + (
            [f"missing keys {missing}"] if missing else [])
        raise UserError(f"{path} has {' and '.join(what)} (expected {sorted(fields)}); {fix}.")
    lengths = values["task_feature_lengths"]
    if not isinstance(lengths, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in lengths.items()):
        raise UserError(f"{path}: task_feature_lengths must map feature names to positive "
                        f"ints, got {lengths!r}; {fix}.")
    checks = {"task": (str, type(None)), "vocabulary": (str,), "extra_ids": (int,),
              "feature_converter": (str,)}
    for key, types in checks.items():
        if key in values and (not isinstance(values[key], types)
                              or isinstance(values[key], bool)):
            raise UserError(f"{path}: {key} has the wrong type ({values[key]!r}); {fix}.")
    return RunInfo(**values)


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(model_dir, CHECKPOINT_SUBDIR)
