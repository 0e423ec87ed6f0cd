"""Transformer layers and layer stacks (scanned or unrolled) shared by both architectures.

A `Context` carries what every layer of a stack shares: the attention mask and the relative
position bias (computed once per stack), RoPE positions, the cross-attention mask, the token
mask used by MoE routing, and for incremental decoding the per-row write positions.

Stacks hold their layers either
  * scanned (`scan_layers=True`): one module whose parameters carry a leading `layers` axis,
    built with `nnx.vmap` and run with `jax.lax.scan` (one compiled layer, fast compiles); when
    MoE layers alternate with dense ones (moe_layer_period p > 1) the scanned unit is a group
    of p consecutive layers;
  * unrolled: an `nnx.List` of layers (parameter paths `layers.<i>.…`).
Both give identical outputs for identical weights (`t5lite.models.layout` converts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5lite.config import ModelConfig
from t5lite.models.attention import (AbsorbedCross, Attention, absorbed_decode_attention,
                                     decode_attention, fold_mask_into_bias, write_position)
from t5lite.models.layers import RMSNorm, dropout, split_key
from t5lite.models.mlp import MLP, MoE, STAT_NAMES, zero_stats
from t5lite.models.quant import QTensor, dense, kernel
from t5lite.models.positions import RelativePositionBias, apply_rope
from t5lite.models.target import target_backend
from t5lite.parallel.rules import constrain

Stats = dict[str, jax.Array]


@dataclasses.dataclass
class Context:
    """Per-call values shared by all layers of a stack (see module docstring).

    self_mask   bool [B|1, 1, T, S]   True = query t may attend to key s
    self_bias   f32 [B|1, heads, T, S] or None (RoPE models)
    cross_bias  [B|1, 1, T, S_enc] or None: the cross-attention mask folded into an additive bias
                (cuDNN attention with `shared_relative_bias`, see `Stack.__call__`)
    positions   int [B|1, T]          positions of the queries (RoPE)
    cross_mask  bool [B|1, 1, T, S_enc] (decoder of an encoder-decoder)
    token_mask  [B, T] or None         1 = real token (MoE routing ignores the others)
    encoded     [B, S_enc, D] or None  encoder output (teacher-forced decoding)
    write_positions int [] or [B]      incremental decoding (`Layer.decode_step`): the cache slot of
                                       the new position (one for all rows, or one per row)
    """

    self_mask: jax.Array | None
    self_bias: jax.Array | None = None
    positions: jax.Array | None = None
    cross_mask: jax.Array | None = None
    token_mask: jax.Array | None = None
    encoded: jax.Array | None = None
    write_positions: jax.Array | None = None
    cross_bias: jax.Array | None = None


def cudnn_backend() -> bool:
    """Whether cuDNN attention runs here (a GPU backend; elsewhere `attention_core` uses the
    einsum core)."""
    return target_backend() == "gpu"


def fold_masks(ctx: Context, dtype) -> Context:
    """`ctx` with its masks folded into additive biases (`fold_mask_into_bias`), no masks."""
    self_bias = ctx.self_bias
    if ctx.self_mask is not None:
        self_bias = fold_mask_into_bias(ctx.self_bias, ctx.self_mask, dtype)
    cross_bias = ctx.cross_bias
    if ctx.cross_mask is not None:
        cross_bias = fold_mask_into_bias(ctx.cross_bias, ctx.cross_mask, dtype)
    return dataclasses.replace(ctx, self_bias=self_bias, self_mask=None, cross_bias=cross_bias,
                               cross_mask=None)


def add_stats(a: Stats, b: Stats) -> Stats:
    return {name: a[name] + b[name] for name in STAT_NAMES}


class Layer(nnx.Module):
    """One pre-norm layer: self-attention, optional cross-attention, feed-forward."""

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool, moe: bool, rngs: nnx.Rngs):
        dt, pd = cfg.compute_dtype, cfg.params_dtype
        self.pre_self_attention_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps, dt, pd, rngs=rngs)
        self.self_attention = Attention(cfg, rngs=rngs)
        if cross_attention:
            self.pre_cross_attention_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps, dt, pd,
                                                    rngs=rngs)
            self.cross_attention = Attention(cfg, rngs=rngs)
        self.has_cross = cross_attention
        self.pre_mlp_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps, dt, pd, rngs=rngs)
        self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, rngs=rngs)
        self.rope_theta = cfg.rope_theta if cfg.position_scheme == "rope" else None
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x: jax.Array, ctx: Context, key: jax.Array | None,
                 cross_kv: tuple[jax.Array, jax.Array] | None = None):
        """Returns (x, stats, (k, v)) where (k, v) are this call's self-attention keys/values
        [B, T, K, H] (RoPE applied) for the caller to cache (prefill). `cross_kv` are
        precomputed cross-attention keys/values (else computed from ctx.encoded)."""
        keys = split_key(key, 6)
        rate = self.dropout_rate
        # self-attention
        h = self.pre_self_attention_norm(x)
        attn = self.self_attention
        q = attn.query(h)
        k, v = attn.key_value(h)
        if self.rope_theta is not None:
            q = apply_rope(q, ctx.positions, self.rope_theta)
            k = apply_rope(k, ctx.positions, self.rope_theta)
        q, k, v = (checkpoint_name(a, n) for a, n in ((q, "query"), (k, "key"), (v, "value")))
        out = attn.attend(q, k, v, ctx.self_bias, ctx.self_mask, keys[0])
        out = checkpoint_name(out, "attention_out")
        x = x + dropout(out, rate, keys[1])
        # cross-attention (no position bias)
        if self.has_cross:
            h = self.pre_cross_attention_norm(x)
            cattn = self.cross_attention
            q = checkpoint_name(cattn.query(h), "query")
            ck, cv = cross_kv if cross_kv is not None else cattn.key_value(ctx.encoded)
            ck, cv = checkpoint_name(ck, "key"), checkpoint_name(cv, "value")
            out = checkpoint_name(cattn.attend(q, ck, cv, ctx.cross_bias, ctx.cross_mask,
                                               keys[2]),
                                  "cross_attention_out")
            x = x + dropout(out, rate, keys[3])
        # feed-forward
        h = self.pre_mlp_norm(x)
        out, stats = self.mlp(h, ctx.token_mask, keys[4])
        x = x + dropout(out, rate, keys[5])
        return x, stats, (k, v)

    def cross_key_value(self, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys/values of the encoder output in the cache layout [B, K, S, H]
        (computed once per request for `decode_step`)."""
        w = self.cross_attention
        names = ("batch", "kv_heads", "length", "kv")
        k = dense("bsd,dkh->bksh", encoded, kernel(w, "k", w.dtype))
        v = dense("bsd,dkh->bksh", encoded, kernel(w, "v", w.dtype))
        return constrain(k, names), constrain(v, names)

    def cross_absorbed_weights(self) -> tuple[Any, Any]:
        """The cross-attention k / v kernels as `AbsorbedCross` reads them (once per request):
        wk [kv_heads, head_dim, embed], wv [kv_heads, embed, head_dim], in the compute dtype,
        or int8 `QTensor`s rearranged the same way (their scales move along; wk's lie on the
        axis the absorbed dot contracts and scale the query first, see `_absorbed_query`)."""
        w = self.cross_attention
        k, v = kernel(w, "k", w.dtype), kernel(w, "v", w.dtype)  # [embed, kv_heads, head_dim]
        return _rearranged(k, (1, 2, 0)), _rearranged(v, (1, 0, 2))

    def decode_step(self, x: jax.Array, ctx: Context, cache: tuple[jax.Array, jax.Array],
               cross_kv: tuple[jax.Array, jax.Array] | AbsorbedCross | None = None):
        """Incremental decoding: x [N, 1, D] holds one new position per row.

        Its keys/values are first written into this layer's cache (k, v) [N, K, M, H] at
        ctx.write_positions, then the position attends over the cache (ctx.self_mask hides the
        slots not written yet) and over `cross_kv` [B, K, S, H] (B divides N: see
        `decode_attention`) or an `AbsorbedCross`. No dropout. Returns (x, (k cache, v cache)).

        Writing before reading lets XLA update the cache in place inside a `while_loop`
        (reading the old cache and writing afterwards made it copy the cache every step).
        """
        attn = self.self_attention
        h = self.pre_self_attention_norm(x)
        q = attn.query(h)
        k, v = attn.key_value(h)
        if self.rope_theta is not None:
            q = apply_rope(q, ctx.positions, self.rope_theta)
            k = apply_rope(k, ctx.positions, self.rope_theta)
        k_cache = write_position(cache[0], k, ctx.write_positions)
        v_cache = write_position(cache[1], v, ctx.write_positions)
        out = decode_attention(q, k_cache, v_cache, bias=ctx.self_bias, mask=ctx.self_mask)
        x = x + attn.decode_output(out)
        if self.has_cross:
            cattn = self.cross_attention
            q = cattn.query(self.pre_cross_attention_norm(x))
            if isinstance(cross_kv, AbsorbedCross):
                out = absorbed_decode_attention(q, cross_kv, ctx.cross_mask)
            else:
                out = decode_attention(q, cross_kv[0], cross_kv[1], bias=None,
                                       mask=ctx.cross_mask)
            x = x + cattn.decode_output(out)
        out, _ = self.mlp(self.pre_mlp_norm(x), ctx.token_mask, None)
        return x + out, (k_cache, v_cache)


def _rearranged(w: Any, axes: tuple[int, ...]) -> Any:
    """A kernel transposed by `axes`; for an int8 QTensor the int8 values and the keepdims
    scale alike (no float copy of the weight)."""
    if isinstance(w, QTensor):
        return dataclasses.replace(w, value=jnp.transpose(w.value, axes),
                                   scale=jnp.transpose(w.scale, axes))
    return jnp.transpose(w, axes)


class LayerGroup(nnx.Module):
    """`period` consecutive layers: the scanned unit when MoE and dense layers alternate."""

    def __init__(self, layers: list[Layer]):
        self.layers = nnx.List(layers)


_REMAT_POLICIES: dict[str, Any] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    # what the weight gradients and the residual stream need, nothing recomputable cheaply:
    # q/k/v, the attention core's output (input of the o projection), the attention outputs
    # (so the residual stream is rebuilt without matmuls) and the MLP's input projections
    # (GELU / gating recomputed from them); norms, softmax and activations are recomputed
    "save_projections": jax.checkpoint_policies.save_only_these_names(
        "query", "key", "value", "attended", "attention_out", "cross_attention_out", "mlp_wi"),
}

# function applied to each layer: (layer, x, per-layer inputs) -> (x, stats, per-layer outputs)
LayerFn = Callable[[Layer, jax.Array, Any], tuple[jax.Array, Stats, Any]]


class Stack(nnx.Module):
    """Embedding-free layer stack + final norm. kind: "encoder", "decoder" (with
    cross-attention) or "lm" (decoder-only: self-attention and feed-forward)."""

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        name = "encoder" if kind == "encoder" else "decoder"
        self.num_layers = cfg.num_encoder_layers if kind == "encoder" else cfg.num_decoder_layers
        self.kind = kind
        if cfg.position_scheme == "relative":
            self.relpos = RelativePositionBias(
                cfg.relative_num_buckets, cfg.relative_max_distance, cfg.num_heads,
                bidirectional=(kind == "encoder"), param_dtype=cfg.params_dtype, rngs=rngs,
                init_std=cfg.d_model ** -0.5)
        else:
            self.relpos = None
        cross = kind == "decoder"
        moe_flags = [cfg.is_moe_layer(name, i) for i in range(self.num_layers)]
        self.period = cfg.moe_layer_period if any(moe_flags) else 1
        self.scanned = cfg.scan_layers
        self.remat_policy = cfg.remat_policy
        self.scan_unroll = cfg.scan_unroll
        self.shared_bias = cfg.shared_relative_bias
        # cuDNN takes one additive bias: fold the masks into it once per stack, not per layer
        self.fold_masks = cfg.shared_relative_bias and cfg.attention_impl == "cudnn"
        self.dtype = cfg.compute_dtype
        if cfg.scan_layers:
            period = self.period

            def make_unit(r: nnx.Rngs):
                if period == 1:
                    return Layer(cfg, cross_attention=cross, moe=moe_flags[0], rngs=r)
                return LayerGroup([Layer(cfg, cross_attention=cross, moe=moe_flags[j], rngs=r)
                                   for j in range(period)])

            make = nnx.split_rngs(splits=self.num_layers // period)(
                nnx.vmap(make_unit, in_axes=(0,), out_axes=0,
                         transform_metadata={nnx.PARTITION_NAME: "layers"}))
            self.layers = make(rngs)
        else:
            self.layers = nnx.List([Layer(cfg, cross_attention=cross, moe=moe_flags[i], rngs=rngs)
                                    for i in range(self.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps, cfg.compute_dtype,
                                  cfg.params_dtype, rngs=rngs)

    def position_bias(self, query_positions: jax.Array, key_positions: jax.Array):
        """float32 [B|1, heads, q, k] relative position bias, or None with RoPE."""
        if self.relpos is None:
            return None
        return self.relpos(query_positions, key_positions)

    def sequence_bias(self, positions: jax.Array, length: int):
        """The self-attention bias of a full-sequence pass over `length` tokens at `positions`
        [B|1, length]: float32 [B, heads, T, T] from the positions, or with
        `shared_relative_bias` one [1, heads, T, T] from 0..T-1 (equal on every pair of tokens
        of one packed segment: both use the distance within the segment). None with RoPE."""
        if self.relpos is None:
            return None
        if self.shared_bias:
            positions = jnp.arange(length)[None]
        return self.relpos(positions, positions)

    def _maybe_remat(self, fn):
        if self.remat_policy == "none":
            return fn
        return jax.checkpoint(fn, policy=_REMAT_POLICIES[self.remat_policy], prevent_cse=False)

    def run(self, layer_fn: LayerFn, x: jax.Array, per_layer: Any) -> tuple[jax.Array, Stats, Any]:
        """Apply `layer_fn` layer by layer. `per_layer` is a pytree of arrays with a leading
        num_layers axis (layer i gets slice i); the per-layer outputs come back stacked the
        same way. Returns (x, summed stats, stacked outputs)."""
        num = self.num_layers
        take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        if not self.scanned:
            stats, outs = zero_stats(), []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)

                def one(state, x, xs, graphdef=graphdef):
                    return layer_fn(nnx.merge(graphdef, state), x, xs)

                x, s, y = self._maybe_remat(one)(state, x, take(per_layer, i))
                stats = add_stats(stats, s)
                outs.append(y)
            stacked = jax.tree.map(lambda *ys: jnp.stack(ys), *outs) if outs else None
            return x, stats, stacked
        period = self.period
        graphdef, state = nnx.split(self.layers)
        grouped = jax.tree.map(lambda a: a.reshape(num // period, period, *a.shape[1:]),
                               per_layer)

        def body(carry, inputs):
            x, stats = carry
            unit_state, xs = inputs
            unit = nnx.merge(graphdef, unit_state)
            layers = [unit] if period == 1 else list(unit.layers)
            outs = []
            for j, layer in enumerate(layers):
                x, s, y = layer_fn(layer, x, take(xs, j))
                stats = add_stats(stats, s)
                outs.append(y)
            return (x, stats), jax.tree.map(lambda *ys: jnp.stack(ys), *outs)

        (x, stats), ys = jax.lax.scan(self._maybe_remat(body), (x, zero_stats()),
                                      (state, grouped), unroll=self.scan_unroll)
        ys = jax.tree.map(lambda a: a.reshape(num, *a.shape[2:]), ys)
        return x, stats, ys

    def layer_modules(self) -> list[Layer]:
        """The layers as a list of modules, in order. For a scanned stack each one holds
        static slices of the stacked parameters: call this once, outside a decoding loop, so
        the slices are taken once per request rather than in every step (XLA does not hoist
        them out of the loop by itself)."""
        if not self.scanned:
            return list(self.layers)
        graphdef, state = nnx.split(self.layers)
        out: list[Layer] = []
        for g in range(self.num_layers // self.period):
            unit = nnx.merge(graphdef, jax.tree.map(lambda a, g=g: a[g], state))
            out.extend([unit] if self.period == 1 else list(unit.layers))
        return out

    def layer_keys(self, key: jax.Array | None) -> jax.Array | None:
        return None if key is None else jax.random.split(key, self.num_layers)

    def __call__(self, x: jax.Array, ctx: Context, key: jax.Array | None = None):
        """Full-sequence pass (no cache). Returns (normed output, stats)."""
        if self.fold_masks and cudnn_backend():
            ctx = fold_masks(ctx, self.dtype)

        def fn(layer, x, layer_key):
            x, stats, _ = layer(x, ctx, layer_key)
            return x, stats, None

        x, stats, _ = self.run(fn, x, self.layer_keys(key))
        return self.final_norm(x), stats
