"""A frozen distillation teacher: any t5lite model dir, checked, loaded sharded, and applied.

    check_teacher_vocabulary(cfg.teacher_model_dir, student_vocab_file, student_extra_ids)
    teacher = load_teacher(cfg, student_config, mesh, student_rules)   # sharded, frozen
    logits = teacher.logits(teacher.params, batch)      # inside the jitted train step

The teacher is an `EncoderDecoder` (it reads the student's batch as is) or a `DecoderOnly`
prefix-LM (it reads `[inputs ; targets]`, see `t5lite.train.distill.prefix_lm_teacher_batch`);
a transformers T5 brought in with `t5lite import` is an `EncoderDecoder` model dir like any
other. Its parameters live on the student's mesh with the shardings of its *own* logical rules
(`DistillConfig.teacher_partitioning`, default the student's recipe), are never part of the
train state (so never in the optimiser state nor in the student's checkpoints), and its forward
pass runs under `stop_gradient` in the same jitted step. With `teacher_dtype="bfloat16"` it
computes in bfloat16 and its parameters are held in bfloat16 (half the memory).

Vocabularies must match: the same SentencePiece model file (compared by content) and the same
number of extra ids; the teacher's `vocab_size` may be padded larger than the student's (its
extra logits are dropped), never smaller. Every check here only reads files, so a refused
teacher leaves the student's model dir untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5lite import checkpoint, storage
from t5lite import model_dir as md
from t5lite.config import ModelConfig
from t5lite.errors import ConfigError, UserError
from t5lite.models import build_model, param_logical_axes
from t5lite.parallel.rules import Rules, axes_to_pure, axis_rules, get_rules, tree_shardings
from t5lite.train.distill import (DistillConfig, DistillLoss, prefix_lm_teacher_batch,
                                  slice_vocab)
from t5lite.train.steps import model_forward

Batch = dict[str, jax.Array]


@dataclasses.dataclass
class Teacher:
    """A loaded teacher. `logits(params, batch)` is traceable (call it inside jit) and returns
    stop-gradient float32 logits [B, target_len, student_vocab] aligned with the student's
    decoder positions."""

    model_dir: str
    config: ModelConfig
    params: Any  # pure dict of sharded arrays
    shardings: Any  # matching NamedShardings
    logits: Callable[[Any, Batch], jax.Array]


def read_teacher_config(teacher_model_dir: str, dtype: str | None = None) -> ModelConfig:
    """The teacher's ModelConfig from its model_config.json (compute dtype overridden)."""
    if not storage.isdir(teacher_model_dir):
        raise UserError(f"TEACHER_MODEL_DIR={teacher_model_dir!r} is not a directory; give a "
                        "t5lite model dir written by `t5lite train` or `t5lite import`.")
    cfg = md.read_model_config(teacher_model_dir)
    changes: dict[str, Any] = {"dropout_rate": 0.0}
    if dtype is not None:
        changes["dtype"] = dtype
        if dtype != "bfloat16" and cfg.attention_impl == "cudnn":
            changes["attention_impl"] = "einsum"
    return cfg.replace(**changes)


def check_teacher_config(teacher: ModelConfig, student: ModelConfig,
                         teacher_model_dir: str) -> None:
    """Refuse a teacher whose logits cannot be compared with the student's."""
    if teacher.vocab_size < student.vocab_size:
        raise ConfigError(
            f"the teacher in {teacher_model_dir} has vocab_size={teacher.vocab_size}, smaller "
            f"than the student's {student.vocab_size}; distillation needs the same vocabulary "
            "(a teacher padded larger is fine). Use a teacher trained with the student's "
            "SentencePiece model, or set the student's ModelConfig.vocab_size to "
            f"{teacher.vocab_size} or less.")
    if student.architecture != "encoder_decoder":
        raise ConfigError("distillation trains an encoder-decoder student; this student has "
                          f"architecture={student.architecture!r}.")


def _digest(path: str) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def check_teacher_vocabulary(teacher_model_dir: str, student_vocabulary: str,
                             student_extra_ids: int) -> None:
    """Refuse a teacher whose SentencePiece model (by content) or extra ids differ."""
    info = md.read_run_info(teacher_model_dir)
    if not info.vocabulary or not storage.exists(info.vocabulary):
        raise UserError(f"the teacher's vocabulary {info.vocabulary!r} (run_info.json of "
                        f"{teacher_model_dir}) is not found; distillation must check that "
                        "teacher and student use the same SentencePiece model. Fix the path in "
                        "run_info.json.")
    if not student_vocabulary or not storage.exists(student_vocabulary):
        raise UserError(f"the student's vocabulary {student_vocabulary!r} is not found; "
                        "distillation needs a SentencePiece vocabulary to compare.")
    if _digest(info.vocabulary) != _digest(student_vocabulary):
        raise UserError(
            f"the teacher in {teacher_model_dir} uses the SentencePiece model "
            f"{info.vocabulary}, which differs from the student's {student_vocabulary}; "
            "distillation compares token distributions, so both must use the same vocabulary.")
    if int(info.extra_ids) != int(student_extra_ids):
        raise UserError(f"the teacher in {teacher_model_dir} has {info.extra_ids} extra ids "
                        f"but the student's task has {student_extra_ids}; the sentinel ids would "
                        "not mean the same tokens. Use a teacher trained with the same task "
                        "vocabulary.")


def _abstract(cfg: ModelConfig):
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def load_teacher(config: DistillConfig, student: ModelConfig, mesh: Mesh,
                 student_rules: Rules) -> Teacher:
    """Read, check and restore the teacher of `config` sharded on `mesh` (nothing written)."""
    tdir = config.teacher_model_dir
    tcfg = read_teacher_config(tdir, config.teacher_dtype)
    check_teacher_config(tcfg, student, tdir)
    rules = (get_rules(config.teacher_partitioning) if config.teacher_partitioning
             else student_rules)
    graphdef, abs_params_state, abs_rest = _abstract(tcfg)
    axes = axes_to_pure(param_logical_axes(abs_params_state))
    abs_params = nnx.to_pure_dict(abs_params_state)
    shardings = tree_shardings(axes, abs_params, mesh, rules)
    params = checkpoint.restore_params(tdir, abs_params, shardings,
                                       config.teacher_checkpoint_step)
    if tcfg.dtype == "bfloat16":
        params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p),
                         out_shardings=shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh), axis_rules(mesh, rules):
        rest = jax.jit(lambda: nnx.split(build_model(tcfg, rngs=nnx.Rngs(params=0, dropout=1)),
                                         nnx.Param, ...)[2],
                       out_shardings=jax.tree.map(lambda _: replicated, abs_rest))()
    vocab = student.vocab_size
    decoder_only = tcfg.architecture == "decoder_only"

    def logits(tparams: Any, batch: Batch) -> jax.Array:
        with axis_rules(mesh, rules):
            model = nnx.merge(graphdef, tparams, rest)
            if decoder_only:
                out, _ = model_forward(model, prefix_lm_teacher_batch(batch), None)
                out = out[:, batch["encoder_input_tokens"].shape[1]:]
            else:
                keys = ("encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids",
                        "decoder_segment_ids", "encoder_positions", "decoder_positions")
                out, _ = model_forward(model, {k: batch[k] for k in keys if k in batch}, None)
        return jax.lax.stop_gradient(slice_vocab(out.astype(jnp.float32), vocab))

    return Teacher(model_dir=tdir, config=tcfg, params=params, shardings=shardings,
                   logits=logits)


@dataclasses.dataclass
class Distillation:
    """The distillation pieces of a run: the loss for the train step and its teacher (None
    when the teacher's top-k logits come with the batches)."""

    loss: DistillLoss
    teacher: Teacher | None

    def bind(self, step_fn: Callable[..., Any], state_shardings: Any,
             replicated: Any) -> Callable[[Any, Batch], Any]:
        """Jit `step_fn(state, batch, teacher_params)` and return `step(state, batch)`: the
        teacher's parameters are an argument of the compiled step (not a constant baked into
        it, not part of the train state)."""
        if self.teacher is None:
            jitted = jax.jit(lambda state, batch: step_fn(state, batch, None),
                             in_shardings=(state_shardings, None),
                             out_shardings=(state_shardings, replicated), donate_argnums=(0,))
            return jitted
        jitted = jax.jit(step_fn, in_shardings=(state_shardings, None, self.teacher.shardings),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
        params = self.teacher.params
        return lambda state, batch: jitted(state, batch, params)


def make_distillation(config: DistillConfig | None, student: ModelConfig, mesh: Mesh,
                      student_rules: Rules) -> Distillation | None:
    """None without distillation; else the loss and (online) the loaded teacher."""
    if config is None:
        return None
    if config.offline_logits_dir:
        check_teacher_config(read_teacher_config(config.teacher_model_dir), student,
                             config.teacher_model_dir)
        return Distillation(DistillLoss(config, None), None)
    teacher = load_teacher(config, student, mesh, student_rules)
    return Distillation(DistillLoss(config, teacher.logits), teacher)


def distillation_data(config: DistillConfig, data: Any, vocab: Any, train_config: Any) -> Any:
    """The command-line checks of a distillation run (vocabulary; offline logits matching the
    stream) and its DataSource: `data` itself, or `data` plus the stored teacher logits."""
    check_teacher_vocabulary(config.teacher_model_dir,
                             getattr(vocab, "sentencepiece_model_file", ""),
                             int(getattr(vocab, "extra_ids", 0)))
    if not config.offline_logits_dir:
        return data
    from t5lite.train.offline_teacher import OfflineTeacherData, check_meta, stream_meta

    check_meta(config.offline_logits_dir,
               stream_meta(data.config, train_config.batch_size, config.teacher_model_dir, 0))
    return OfflineTeacherData(data, config.offline_logits_dir)


__all__ = ["Distillation", "distillation_data", "Teacher", "make_distillation", "check_teacher_config", "check_teacher_vocabulary", "load_teacher",
           "read_teacher_config"]
