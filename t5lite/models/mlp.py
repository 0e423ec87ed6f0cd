"""Feed-forward blocks: the (gated) MLP and the mixture-of-experts FFN.

MLP (T5 names): gated  y = wo( act(x wi_0) * (x wi_1) );  plain  y = wo( act(x wi) ).
MoE: a top-k softmax router sends each token to k experts (each a gated or plain MLP with the
`expert` logical axis first). Dispatch is capacity based, per group (= one example):
every expert takes at most C = ceil(k * T * capacity_factor / num_experts) tokens of a group;
first choices are served before second choices, earlier tokens before later ones; an
assignment beyond capacity is *dropped* (the token skips that expert; the residual carries
it). `moe_dropless=True` sets C = T so nothing is ever dropped. Padding tokens (token_mask 0)
are never dispatched and do not count in the losses.

Statistics returned with every FFN call (float32 scalars, summed over layers by the stacks):
  aux_loss  Switch/GShard load balancing: num_experts * sum_e f_e * p_e, where f_e is the fraction
            of assignments routed to e (before capacity) and p_e the mean router probability;
            1.0 when perfectly balanced.
  z_loss    mean over tokens of logsumexp(router logits)**2.
  assigned  number of (token, choice) assignments = k * valid tokens.
  dropped   assignments that did not fit in their expert's capacity.

Example: 1 group of T=4 tokens, 2 experts, k=1, capacity factor 1.0 -> C = 2. If every token
picks expert 0, tokens 0 and 1 are processed, tokens 2 and 3 are dropped (dropped = 2,
assigned = 4).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5lite.config import ModelConfig
from t5lite.models.layers import (activation_fn, dropout, make_param, normal,
                                  shared_input_dense)
from t5lite.models.quant import dense, is_quantized, kernel
from t5lite.parallel.rules import constrain

STAT_NAMES = ("aux_loss", "z_loss", "assigned", "dropped")


def zero_stats() -> dict[str, jax.Array]:
    return {name: jnp.zeros((), jnp.float32) for name in STAT_NAMES}


class MLP(nnx.Module):
    """Dense feed-forward block with T5's parameter names (wi_0/wi_1 gated, wi plain)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.d_model, cfg.d_ff, cfg.params_dtype
        self.gated = cfg.gated
        if cfg.gated:
            self.wi_0 = make_param(rngs, normal(d ** -0.5), (d, f), ("embed", "mlp"), pd)
            self.wi_1 = make_param(rngs, normal(d ** -0.5), (d, f), ("embed", "mlp"), pd)
        else:
            self.wi = make_param(rngs, normal(d ** -0.5), (d, f), ("embed", "mlp"), pd)
        self.wo = make_param(rngs, normal(f ** -0.5), (f, d), ("mlp", "embed"), pd)
        self.act = activation_fn(cfg.activation)
        self.dtype = cfg.compute_dtype
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
        del token_mask
        dt = self.dtype
        names = ("wi_0", "wi_1") if self.gated else ("wi",)
        if is_quantized(self, names[0]):
            hs = [dense("btd,df->btf", x, kernel(self, n, dt)) for n in names]
        else:
            hs = shared_input_dense(x, *(kernel(self, n, dt) for n in names))
        hs = [checkpoint_name(a, "mlp_wi") for a in hs]
        h = self.act(hs[0]) * hs[1] if self.gated else self.act(hs[0])
        h = constrain(h, ("batch", "length", "mlp"))
        h = dropout(h, self.dropout_rate, dropout_key)
        y = dense("btf,fd->btd", h, kernel(self, "wo", dt))
        return constrain(y, ("batch", "length", "embed")), zero_stats()


def expert_capacity(cfg: ModelConfig, group_size: int) -> int:
    """Slots per expert per group."""
    if cfg.moe_dropless:
        return group_size
    cap = math.ceil(cfg.experts_top_k * group_size * cfg.expert_capacity_factor
                    / cfg.num_experts)
    return max(1, min(group_size, cap))


class MoE(nnx.Module):
    """Top-k routed mixture of experts with capacity-based dispatch (see module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, e, pd = cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.params_dtype
        self.cfg = cfg
        self.router = make_param(rngs, normal(d ** -0.5), (d, e), ("embed", "expert"), pd)
        self.gated = cfg.gated
        if cfg.gated:
            self.wi_0 = make_param(rngs, normal(d ** -0.5), (e, d, f), ("expert", "embed", "mlp"),
                                   pd)
            self.wi_1 = make_param(rngs, normal(d ** -0.5), (e, d, f), ("expert", "embed", "mlp"),
                                   pd)
        else:
            self.wi = make_param(rngs, normal(d ** -0.5), (e, d, f), ("expert", "embed", "mlp"),
                                 pd)
        self.wo = make_param(rngs, normal(f ** -0.5), (e, f, d), ("expert", "mlp", "embed"), pd)
        self.act = activation_fn(cfg.activation)
        self.dtype = cfg.compute_dtype

    def route(self, x: jax.Array, token_mask: jax.Array | None):
        """Dispatch and combine tensors [G, S, E, C] plus statistics."""
        cfg = self.cfg
        groups, size, _ = x.shape
        num_experts, k = cfg.num_experts, cfg.experts_top_k
        capacity = expert_capacity(cfg, size)
        valid = (jnp.ones((groups, size), jnp.float32) if token_mask is None
                 else token_mask.astype(jnp.float32))
        logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32),
                            self.router[...].astype(jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)
        gates, experts = jax.lax.top_k(probs, k)  # [G, S, k]
        if k > 1:
            gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
        choice = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * valid[..., None, None]
        # priority order: all first choices (in token order), then all second choices, ...
        order = jnp.transpose(choice, (0, 2, 1, 3)).reshape(groups, k * size, num_experts)
        slot = jnp.sum((jnp.cumsum(order, axis=1) - 1.0) * order, axis=-1)  # [G, kS]
        kept = (slot < capacity) & (jnp.sum(order, axis=-1) > 0)
        slot_onehot = jax.nn.one_hot(jnp.where(kept, slot, capacity).astype(jnp.int32),
                                     capacity, dtype=jnp.float32)  # out of range -> zeros
        placed = order[..., None] * slot_onehot[:, :, None, :]  # [G, kS, E, C]
        placed = placed.reshape(groups, k, size, num_experts, capacity)
        dispatch = jnp.sum(placed, axis=1)  # [G, S, E, C]
        combine = jnp.einsum("gks,gksec->gsec", jnp.transpose(gates, (0, 2, 1)), placed)
        num_valid = jnp.maximum(jnp.sum(valid), 1.0)
        fraction = jnp.sum(choice, axis=(0, 1, 2)) / (num_valid * k)
        mean_prob = jnp.sum(probs * valid[..., None], axis=(0, 1)) / num_valid
        z = jax.nn.logsumexp(logits, axis=-1)
        stats = {
            "aux_loss": num_experts * jnp.sum(fraction * mean_prob),
            "z_loss": jnp.sum(jnp.square(z) * valid) / num_valid,
            "assigned": jnp.sum(valid) * k,
            "dropped": jnp.sum(valid) * k - jnp.sum(kept.astype(jnp.float32)),
        }
        return dispatch, combine, stats

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
        dt = self.dtype
        dispatch, combine, stats = self.route(x, token_mask)
        expert_in = jnp.einsum("gsec,gsd->egcd", dispatch.astype(dt), x)
        expert_in = constrain(expert_in, ("expert", "batch", None, "embed"))
        if self.gated:
            h = (self.act(jnp.einsum("egcd,edf->egcf", expert_in, self.wi_0[...].astype(dt)))
                 * jnp.einsum("egcd,edf->egcf", expert_in, self.wi_1[...].astype(dt)))
        else:
            h = self.act(jnp.einsum("egcd,edf->egcf", expert_in, self.wi[...].astype(dt)))
        h = dropout(h, self.cfg.dropout_rate, dropout_key)
        expert_out = jnp.einsum("egcf,efd->egcd", h, self.wo[...].astype(dt))
        y = jnp.einsum("gsec,egcd->gsd", combine.astype(dt), expert_out)
        return constrain(y, ("batch", "length", "embed")), stats
