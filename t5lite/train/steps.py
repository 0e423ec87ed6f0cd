"""Pure step functions: init, train step (with gradient accumulation) and eval step.

These functions know nothing about meshes, files or loops; `t5lite.train.setup` jits them with
explicit shardings. The model enters as an `ApplyFn`: `(params, batch, dropout_key) -> (logits,
aux)` where `params` is the pure dict of the model's parameters and `dropout_key` is None for
deterministic evaluation.

Loss normalisation: the loss of a step is `sum over all target tokens of the global batch of the
token loss / number of target tokens of the global batch` (+ the MoE auxiliary losses). With
`microbatches = k` the batch is split into k microbatches, each contributes its token-loss sum
divided by the *global* token count, and the gradients are summed — the same update as one big
batch, up to floating-point summation order. Microbatch i takes rows i, i+k, i+2k, ... of the
batch so every data shard contributes to every microbatch (no cross-device shuffling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from t5lite.models.compute_cast import widen_like
from t5lite.parallel.rules import constrain
from t5lite.train.chunked_loss import loss_sums
from t5lite.train.losses import LossConfig, token_loss_sums
from t5lite.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class ApplyFn(Protocol):
    def __call__(self, params: Any, batch: Batch, dropout_key: jax.Array | None,
                 features: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def model_forward(model: Any, batch: Batch, dropout_key: jax.Array | None,
                  features: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Call an EncoderDecoder (batch has `encoder_input_tokens`) or a DecoderOnly model.

    `dropout_key=None` means deterministic (evaluation); otherwise dropout uses that key.
    `features=True`: `OutputFeatures` in place of the logits (`t5lite.models.features`).
    """
    kwargs = {"deterministic": dropout_key is None, "dropout_rng": dropout_key}
    if features:
        kwargs["return_features"] = True
    if "encoder_input_tokens" in batch:
        return model(batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                     encoder_segment_ids=batch.get("encoder_segment_ids"),
                     decoder_segment_ids=batch.get("decoder_segment_ids"),
                     encoder_positions=batch.get("encoder_positions"),
                     decoder_positions=batch.get("decoder_positions"), **kwargs)
    return model(batch["decoder_input_tokens"],
                 decoder_segment_ids=batch.get("decoder_segment_ids"),
                 decoder_positions=batch.get("decoder_positions"),
                 decoder_causal_attention=batch.get("decoder_causal_attention"), **kwargs)


def make_apply_fn(graphdef: nnx.GraphDef, rest: nnx.State) -> ApplyFn:
    """An ApplyFn for an NNX model split as `(graphdef, params, rest)`.

    `rest` is the model's non-parameter state (its own RNG streams, unused here: the dropout
    key is passed explicitly, derived from the checkpointed RNG and the step number).
    """

    def apply(params: Any, batch: Batch, dropout_key: jax.Array | None,
              features: bool = False):
        model = nnx.merge(graphdef, params, rest)
        return model_forward(model, batch, dropout_key, features)

    return apply


def _moe_loss(aux: dict[str, jax.Array]) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for name in ("moe_aux_loss", "moe_z_loss"):
        if name in aux:
            total = total + jnp.asarray(aux[name], jnp.float32)
    return total


def _split_microbatches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...]; microbatch i holds rows i, i+k, i+2k, ..."""

    def one(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        y = x.reshape((b // k, k) + x.shape[1:])
        y = jnp.swapaxes(y, 0, 1)
        return constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

    return {name: one(x) for name, x in batch.items()}


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation,
                    learning_rate: Callable[[Any], Any], loss_config: LossConfig,
                    microbatches: int = 1, distill: Any = None,
                    param_cast: Callable[[Any], Any] | None = None
                    ) -> Callable[..., tuple[TrainState, Metrics]]:
    """`step(state, batch) -> (new_state, metrics)`; metrics are global scalars.

    `param_cast` (e.g. `t5lite.models.compute_cast.cast_matmul_kernels` to bfloat16): applied
    to the parameters once per step, before the microbatch loop; gradients are taken with
    respect to its output and widened back to the parameters' dtypes.
    `loss_config.vocab_chunk > 0` (without distillation): the loss is computed from the
    model's `OutputFeatures` over vocabulary chunks (`t5lite.train.chunked_loss`).

    With `distill` (a `t5lite.train.distill.DistillLoss`) the step is
    `step(state, batch, teacher_params)`, the optimised token sum is the distillation total
    and the metrics gain `ce_loss`, `kd_loss`, `teacher_ce`, `distill_alpha` and
    `distill_temperature`.
    """

    chunked = loss_config.vocab_chunk > 0 and distill is None

    def loss_fn(params, batch, normalizer, key, teacher_params=None, step=None):
        if chunked:
            feats, aux = apply_fn(params, batch, key, features=True)
            sums = loss_sums(feats, batch["decoder_target_tokens"],
                             batch["decoder_loss_weights"], loss_config)
        else:
            logits, aux = apply_fn(params, batch, key)
            sums = token_loss_sums(logits, batch["decoder_target_tokens"],
                                   batch["decoder_loss_weights"], loss_config)
        moe = _moe_loss(aux)
        if distill is not None:
            total, kd_sums = distill(teacher_params, batch, logits, sums["loss"], step)
            sums = {**sums, **kd_sums}
            loss = total / normalizer + moe / microbatches
        else:
            loss = sums["loss"] / normalizer + moe / microbatches
        extra = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        return loss, (sums, extra)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch,
             teacher_params: Any = None) -> tuple[TrainState, Metrics]:
        weights = batch["decoder_loss_weights"].astype(jnp.float32)
        normalizer = jnp.maximum(jnp.sum(weights), 1.0)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        params_in = state.params if param_cast is None else param_cast(state.params)
        if microbatches == 1:
            grads, (sums, aux) = grad_fn(params_in, batch, normalizer, step_key,
                                         teacher_params, state.step)
            grads = widen_like(grads, state.params)
        else:
            mbs = _split_microbatches(batch, microbatches)

            def body(carry, xs):
                acc_grads, acc_sums, acc_aux = carry
                mb, i = xs
                g, (s, a) = grad_fn(params_in, mb, normalizer,
                                    jax.random.fold_in(step_key, i), teacher_params, state.step)
                acc_grads = jax.tree.map(lambda acc, x: acc + x.astype(acc.dtype), acc_grads, g)
                acc_sums = jax.tree.map(jnp.add, acc_sums, s)
                acc_aux = jax.tree.map(lambda x, y: x + y / microbatches, acc_aux, a)
                return (acc_grads, acc_sums, acc_aux), None

            zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            first = jax.tree.map(lambda x: x[0], mbs)
            abstract = jax.eval_shape(lambda: grad_fn(params_in, first, normalizer,
                                                      step_key, teacher_params,
                                                      state.step)[1])
            zeros_s, zeros_a = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
            (grads, sums, aux), _ = jax.lax.scan(
                body, (zeros_g, zeros_s, zeros_a),
                (mbs, jnp.arange(microbatches, dtype=jnp.int32)))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        weight = jnp.maximum(sums["weight"], 1.0)
        loss = sums.get("total", sums["loss"]) / weight + _moe_loss(aux)
        metrics = {
            "loss": loss,
            "cross_entropy": sums["nll"] / weight,
            "z_loss": sums["z_loss"] / weight,
            "accuracy": sums["correct"] / weight,
            "target_tokens": sums["weight"],
            "learning_rate": jnp.asarray(learning_rate(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            # the updated parameters too: a finite loss with an overflowing update must not
            # be saved as a "good" checkpoint
            "finite": (jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
                       & jnp.isfinite(optax.tree.norm(params))),
        }
        metrics.update(aux)
        if distill is not None:
            metrics.update(ce_loss=sums["loss"] / weight, kd_loss=sums["kd"] / weight,
                           teacher_ce=sums["teacher_nll"] / weight,
                           **distill.step_metrics(state.step))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=state.rng)
        return new_state, metrics

    return step


def make_eval_step(apply_fn: ApplyFn) -> Callable[[Any, Batch], Metrics]:
    """`eval_step(params, batch) -> sums` (nll, correct, weight): teacher-forced, no dropout."""
    plain = LossConfig(z_loss=0.0, label_smoothing=0.0)

    def eval_step(params: Any, batch: Batch) -> Metrics:
        logits, _ = apply_fn(params, batch, None)
        sums = token_loss_sums(logits, batch["decoder_target_tokens"],
                               batch["decoder_loss_weights"], plain)
        return {"nll": sums["nll"], "correct": sums["correct"], "weight": sums["weight"]}

    return eval_step


def new_train_state(params: Any, tx: optax.GradientTransformation, seed: int,
                    step: int | jax.Array = 0) -> TrainState:
    """A TrainState around `params` with a fresh optimiser state. Meant to run under
    `jax.jit(out_shardings=...)` so the state is born sharded."""
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))
