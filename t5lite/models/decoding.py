"""Decoding loops: greedy, temperature / top-k / top-p sampling, and beam search.

Every loop is a `jax.lax.while_loop` meant to run under `jax.jit`, written against one small
interface, the *step function*::

    logits, cache = step_fn(tokens, step, cache)
    #   tokens int32 [N] (the token fed at this step), step int32 scalar, cache: any pytree
    #   -> logits float32 [N, vocab], the updated cache

An encoder-decoder model gives one with its per-layer parameters and cross-attention K/V closed
over (both prepared once per request, outside the loop, so the loop body only reads them)::

    layers = model.decoder.layer_modules()
    cross = model.precompute_cross_attention(encoded, encoder_tokens, layers)
    step_fn = lambda tok, i, cache: model.decode_step(tok, i, cache, cross, layers)

Conventions (the T5 ones): PAD = 0, EOS = 1, the decoder starts from token 0. Outputs are
`[B, max_decode_len]` int32 arrays holding the generated tokens, EOS included, and PAD after it.
Rows stop independently; the loop exits early once every row (or, for beam search, every batch
element's best K hypotheses) is final.

Worked example (greedy, max_decode_len=5, one row whose model emits 7, 9, EOS)::

    tokens = [[7, 9, 1, 0, 0]]        # step_fn was called 3 times, not 5
    scores = [log p(7) + log p(9|7) + log p(EOS|7 9)]

For a decoder-only model the prompt is prefilled first; its last logits are passed as
`initial_logits` and the first generated token is chosen from them (no step call). The token
generated at index j (j >= 1) is then fed to `step_fn` with `step = j - 1`, i.e. `step` counts
the generated tokens already fed. Without `initial_logits` (encoder-decoder), the start token is
fed with `step = 0` and generated token j is fed with `step = j + 1`.

Beam search keeps K hypotheses per batch element, alive and finished ones competing for the same
K slots (score = log-probability / ((5 + length) / 6) ** alpha, length counting EOS, as in GNMT /
T5X). At the last position, hypotheses cut off by `max_decode_len` count as finished (length =
max_decode_len), so there are always K results. It stops when all K hypotheses of every batch
element have finished; beam_size=1 is exactly greedy.
The cache must have batch N = B * K laid out beam-minor: row `b * K + k` is beam k of batch
element b. `tile_beams` builds that layout from a batch-B tree. What the step function closes
over may stay per batch element when the step function maps rows to it: t5lite's
`decode_step` lets the K beam rows of element b share its cross-attention K/V row b.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp

from t5lite.errors import ConfigError

PAD_ID = 0
EOS_ID = 1
NEG_INF = -1.0e10  # finite "minus infinity": keeps top_k ordering well defined under masking

PyTree = Any
BatchAxes = int | PyTree  # an int for every leaf, or a tree (prefix) of ints


class StepFn(Protocol):
    """One decoding step: feed `tokens` [N] at position `step`; get logits [N, V] and new cache."""

    def __call__(self, tokens: jax.Array, step: jax.Array,
                 cache: PyTree) -> tuple[jax.Array, PyTree]: ...


# ------------------------------------------------------------------------------------ configs
@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode. Hashable, so it can be a static argument of `jax.jit`.

    method: "greedy", "sample" or "beam".
    max_decode_len: number of tokens generated at most (EOS included).
    temperature: sampling temperature; 0 means greedy (argmax).
    top_k: keep only the k most likely tokens before sampling (0 = all).
    top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches p (1 = all).
    beam_size, alpha: beam search width and length-penalty exponent.
    num_samples: outputs per input (samples for "sample"; best hypotheses for "beam", <= beam_size;
      must be 1 for "greedy").
    """

    method: Literal["greedy", "sample", "beam"] = "greedy"
    max_decode_len: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beam_size: int = 4
    alpha: float = 0.6
    num_samples: int = 1
    eos_id: int = EOS_ID

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"DecodeConfig: {msg}")

        if self.method not in ("greedy", "sample", "beam"):
            fail(f"method={self.method!r} is unknown; use 'greedy', 'sample' or 'beam'.")
        if not isinstance(self.max_decode_len, int) or self.max_decode_len < 1:
            fail(f"max_decode_len={self.max_decode_len!r} must be a positive integer.")
        if self.temperature < 0:
            fail(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail(f"top_k={self.top_k!r} must be a non-negative integer (0 = no top-k filter).")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus filter).")
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            fail(f"beam_size={self.beam_size!r} must be a positive integer.")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            fail(f"num_samples={self.num_samples!r} must be a positive integer.")
        if self.method == "greedy" and self.num_samples != 1:
            fail(f"num_samples={self.num_samples} with greedy decoding would repeat the same "
                 "output; use method='sample' or 'beam'.")
        if self.method == "beam" and self.num_samples > self.beam_size:
            fail(f"num_samples={self.num_samples} > beam_size={self.beam_size}: beam search "
                 "returns at most beam_size hypotheses; raise beam_size.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutput:
    """Result of a decoding loop.

    tokens: int32 [B, L] (greedy / sample) or [B, K, L] (beam, best first); EOS included, PAD after.
    scores: float32 [B] sum of log-probabilities (greedy / sample, of the *unfiltered* model
      distribution at temperature 1) or [B, K] length-penalised beam scores.
    num_steps: int32 scalar, how many times the step function ran.
    """

    tokens: jax.Array
    scores: jax.Array
    num_steps: jax.Array


# ------------------------------------------------------------------------------------ helpers
def _axes_tree(tree: PyTree, batch_axes: BatchAxes) -> PyTree:
    if isinstance(batch_axes, int):
        return jax.tree.map(lambda _: batch_axes, tree)
    return jax.tree.map(lambda ax, sub: jax.tree.map(lambda _: ax, sub), batch_axes, tree,
                        is_leaf=lambda ax: ax is None)


def tile_beams(tree: PyTree, beam_size: int, batch_axes: BatchAxes = 0) -> PyTree:
    """Repeat every row `beam_size` times along its batch axis (row b -> rows b*K .. b*K+K-1).
    Leaves whose batch axis is None are left alone."""
    axes = _axes_tree(tree, batch_axes)
    return jax.tree.map(lambda x, ax: x if ax is None else jnp.repeat(x, beam_size, axis=ax),
                        tree, axes)


def gather_rows(tree: PyTree, rows: jax.Array, batch_axes: BatchAxes = 0) -> PyTree:
    """Select `rows` (int [N]) along each leaf's batch axis (beam reordering of a cache).
    Leaves whose batch axis is None are not reordered."""
    axes = _axes_tree(tree, batch_axes)
    return jax.tree.map(lambda x, ax: x if ax is None else jnp.take(x, rows, axis=ax),
                        tree, axes)


def process_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> jax.Array:
    """Sampling logits: divide by temperature, then mask (to NEG_INF) what top-k / top-p drop.

    Ties at the top-k / top-p boundary are kept (all tokens whose logit equals the k-th largest),
    so the result does not depend on the order of equal logits.

    Example: logits log([0.5, 0.3, 0.15, 0.05]) with top_p=0.7 keeps the first two tokens (0.5 <
    0.7 <= 0.8); with top_k=1 only the first.
    """
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        k = min(top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
        keep_sorted = mass_before < top_p  # the first token always stays
        # the smallest kept logit is the threshold
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1,
                            keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def first_argmax(logits: jax.Array, row_max: jax.Array | None = None) -> jax.Array:
    """`jnp.argmax(logits, -1)` as int32 (the first maximum; the first NaN if a row has one),
    from two plain reductions: the row max, then the smallest index that reaches it. XLA:CPU
    runs argmax's (value, index) reduction as a scalar loop; a greedy step over a 32128-token
    vocabulary at batch 8 spent ~0.4 ms in it. `row_max` [..., 1] may be passed when the
    caller has it.

    Example: [[1, 3, 3, 2]] -> [1] (first of the tied maxima)."""
    if row_max is None:
        row_max = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == row_max) | jnp.isnan(logits)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def token_log_prob(logits: jax.Array, token: jax.Array,
                   row_max: jax.Array | None = None) -> jax.Array:
    """log softmax(logits)[..., token] in float32 without the whole log-softmax array:
    logits[token] - logsumexp(logits). `row_max` as in `first_argmax`."""
    logits = logits.astype(jnp.float32)
    if row_max is None:
        row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = row_max.astype(jnp.float32)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    log_sum = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1)) + row_max[..., 0]
    return jnp.take_along_axis(logits, token[..., None], axis=-1)[..., 0] - log_sum


def _select(logits: jax.Array, config: DecodeConfig,
            rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The next token [N] and its log-probability under the model's distribution [N]."""
    if config.method == "greedy" or config.temperature == 0.0:
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        token = first_argmax(logits, row_max)
        return token, token_log_prob(logits, token, row_max)
    filtered = process_logits(logits, config.temperature, config.top_k, config.top_p)
    token = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    return token, token_log_prob(logits, token)


def length_penalty(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT / T5X length penalty ((5 + length) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ------------------------------------------------------------------------- greedy / sampling
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _SampleState:
    i: jax.Array  # number of tokens generated so far
    cur: jax.Array  # [N] the last token (fed at the next step)
    out: jax.Array  # [N, L]
    done: jax.Array  # [N] bool
    logp: jax.Array  # [N]
    cache: PyTree
    num_steps: jax.Array


def sample_decode(step_fn: StepFn, cache: PyTree, batch_size: int, config: DecodeConfig,
                  rng: jax.Array | None = None, initial_logits: jax.Array | None = None,
                  start_id: int = PAD_ID) -> DecodeOutput:
    """Greedy decoding (method "greedy" or temperature 0) or ancestral sampling.

    `batch_size` rows are decoded independently (for several samples per input, tile the inputs
    and the cache first). `rng` is required for sampling; sample j of the loop uses
    `fold_in(rng, j)`, so a fixed key reproduces the same outputs.
    """
    sampling = config.method == "sample" and config.temperature > 0.0
    if sampling and rng is None:
        raise ConfigError("sample_decode: sampling needs an rng key (pass rng=jax.random.key(s)).")
    n, length, eos = batch_size, config.max_decode_len, config.eos_id
    offset = 1 if initial_logits is not None else 0

    def choose(logits: jax.Array, i: jax.Array, state: _SampleState) -> _SampleState:
        key = jax.random.fold_in(rng, i) if sampling else None
        token, token_logp = _select(logits, config, key)
        token = jnp.where(state.done, PAD_ID, token)
        logp = state.logp + jnp.where(state.done, 0.0, token_logp)
        out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, i))
        return dataclasses.replace(state, i=i + 1, cur=token, out=out, logp=logp,
                                   done=state.done | (token == eos))

    state = _SampleState(i=jnp.int32(0), cur=jnp.full((n,), start_id, jnp.int32),
                         out=jnp.full((n, length), PAD_ID, jnp.int32),
                         done=jnp.zeros((n,), bool), logp=jnp.zeros((n,), jnp.float32),
                         cache=cache, num_steps=jnp.int32(0))
    if initial_logits is not None:
        state = choose(initial_logits, jnp.int32(0), state)

    def cond(s: _SampleState) -> jax.Array:
        return (s.i < length) & ~jnp.all(s.done)

    def body(s: _SampleState) -> _SampleState:
        logits, new_cache = step_fn(s.cur, s.i - offset, s.cache)
        s = dataclasses.replace(s, cache=new_cache, num_steps=s.num_steps + 1)
        return choose(logits, s.i, s)

    final = jax.lax.while_loop(cond, body, state)
    return DecodeOutput(tokens=final.out, scores=final.logp, num_steps=final.num_steps)


# ------------------------------------------------------------------------------- beam search
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _BeamState:
    i: jax.Array  # tokens generated so far
    seqs: jax.Array  # [B, K, L] the K hypotheses (alive and finished share the K slots)
    logp: jax.Array  # [B, K] log-probability of each hypothesis
    scores: jax.Array  # [B, K] length-penalised score (of finished hypotheses; else NEG_INF)
    finished: jax.Array  # [B, K] bool: ended with EOS, cut off at max length, or dead
    cache: PyTree  # batch B*K
    num_steps: jax.Array


def _beam_expand(state: _BeamState, logits: jax.Array, config: DecodeConfig,
                 batch_axes: BatchAxes, cache: PyTree) -> _BeamState:
    """One beam-search step from the K hypotheses' next-token logits [B*K, V].

    Candidates: every one-token extension of an alive hypothesis (scored with the length
    penalty at its new length) and every finished hypothesis carried over unchanged. The K best
    candidates become the new beam.
    """
    b, k, length = state.seqs.shape
    vocab = logits.shape[-1]
    eos, i = config.eos_id, state.i
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
    ext_logp = jnp.where(state.finished[:, :, None], NEG_INF,
                         state.logp[:, :, None] + logprobs).reshape(b, k * vocab)
    # Only the K best extensions can enter the beam (all extensions share one length).
    ext_logp, ext_idx = jax.lax.top_k(ext_logp, k)
    ext_beam, ext_tok = ext_idx // vocab, (ext_idx % vocab).astype(jnp.int32)
    ext_seqs = jnp.take_along_axis(state.seqs, ext_beam[:, :, None], axis=1)
    ext_seqs = jax.lax.dynamic_update_slice(ext_seqs, ext_tok[:, :, None], (0, 0, i))
    ext_dead = ext_logp <= NEG_INF / 2
    ext_scores = jnp.where(ext_dead, NEG_INF, ext_logp / length_penalty(i + 1, config.alpha))
    ext_finished = ext_dead | (ext_tok == eos) | (i == length - 1)

    # Carried candidates are the finished hypotheses; an alive slot's carry is a dead filler
    # (it can only be picked when there are fewer than K live candidates, and stays dead).
    carry_scores = jnp.where(state.finished, state.scores, NEG_INF)
    carry_logp = jnp.where(state.finished, state.logp, NEG_INF)
    all_scores = jnp.concatenate([carry_scores, ext_scores], axis=1)  # [B, 2K]
    # Ties go to the carried (older, shorter) hypothesis: top_k keeps the lower index first.
    new_scores, pick = jax.lax.top_k(all_scores, k)
    take = lambda x: jnp.take_along_axis(x, pick if x.ndim == 2 else pick[:, :, None], axis=1)  # noqa: E731
    seqs = take(jnp.concatenate([state.seqs, ext_seqs], axis=1))
    logp = take(jnp.concatenate([carry_logp, ext_logp], axis=1))
    finished = take(jnp.concatenate([jnp.ones_like(state.finished), ext_finished], axis=1))
    src_beam = take(jnp.concatenate([jnp.broadcast_to(jnp.arange(k), (b, k)), ext_beam], axis=1))
    rows = (jnp.arange(b)[:, None] * k + src_beam).reshape(-1)
    return dataclasses.replace(state, i=i + 1, seqs=seqs, logp=logp,
                               scores=jnp.where(finished, new_scores, NEG_INF),
                               finished=finished, cache=gather_rows(cache, rows, batch_axes))


def beam_search(step_fn: StepFn, cache: PyTree, batch_size: int, config: DecodeConfig,
                initial_logits: jax.Array | None = None, batch_axes: BatchAxes = 0,
                start_id: int = PAD_ID, early_stop: bool = True) -> DecodeOutput:
    """Beam search with the GNMT length penalty; returns K hypotheses per batch element, best
    first.

    The K beam slots hold alive and finished hypotheses together: at each step the candidates
    are the one-token extensions of the alive hypotheses (score log p / lp(new length)) and the
    finished hypotheses themselves; the K best stay. A batch element is done when all K of its
    hypotheses have finished; the loop stops when every batch element is done (or at
    `max_decode_len`, where the hypotheses still alive are cut off and count as finished). So
    beam_size=1 is exactly greedy decoding, and a beam wide enough to hold every hypothesis is
    an exhaustive search. (T5X instead keeps finished hypotheses in a separate pool and keeps K
    hypotheses alive; that explores more but is not greedy at K=1.)

    `cache` must already hold B*K rows (`tile_beams`, or a t5lite cache made with beams=K;
    cross-attention K/V closed over by a t5lite `decode_step` need no tiling); `batch_axes` says
    where each cache leaf keeps its batch dimension, so the cache can be reordered when the beams
    are re-ranked (None: a leaf that is not reordered, such as the K/V of a t5lite beam cache,
    `t5lite.models.cache.BEAM_AXES`). `initial_logits`
    [B, V] (decoder-only prefill) are tiled here. `early_stop=False` runs all `max_decode_len`
    steps (same result; for testing the stopping rule).

    Example (B=1, K=2, alpha=0): if p(a)=0.6, p(b)=0.4, p(EOS|a)=0.5, p(EOS|b)=0.9, step 2 ranks
    "b EOS" (log 0.36) before "a EOS" (log 0.30); both are finished, so the search stops.
    """
    b, k, length = batch_size, config.beam_size, config.max_decode_len
    first = jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32)  # the K start beams are equal
    state = _BeamState(i=jnp.int32(0), seqs=jnp.full((b, k, length), PAD_ID, jnp.int32),
                       logp=jnp.tile(first, (b, 1)),
                       scores=jnp.full((b, k), NEG_INF, jnp.float32),
                       finished=jnp.zeros((b, k), bool), cache=cache, num_steps=jnp.int32(0))
    offset = 0
    if initial_logits is not None:
        tiled = jnp.repeat(initial_logits, k, axis=0)
        state = _beam_expand(state, tiled, config, batch_axes, state.cache)
        offset = 1

    def cond(s: _BeamState) -> jax.Array:
        if not early_stop:
            return s.i < length
        return (s.i < length) & ~jnp.all(s.finished)

    def body(s: _BeamState) -> _BeamState:
        last = jax.lax.dynamic_index_in_dim(s.seqs, jnp.maximum(s.i - 1, 0), axis=2,
                                            keepdims=False)
        cur = jnp.where(s.i == 0, jnp.int32(start_id), last).reshape(b * k)
        logits, new_cache = step_fn(cur, s.i - offset, s.cache)
        s = dataclasses.replace(s, num_steps=s.num_steps + 1)
        return _beam_expand(s, logits, config, batch_axes, new_cache)

    final = jax.lax.while_loop(cond, body, state)
    return DecodeOutput(tokens=final.seqs, scores=final.scores, num_steps=final.num_steps)


# ---------------------------------------------------------------------------------- dispatch
def run_decoding(step_fn: StepFn, cache: PyTree, batch_size: int, config: DecodeConfig,
           rng: jax.Array | None = None, initial_logits: jax.Array | None = None,
           batch_axes: BatchAxes = 0) -> DecodeOutput:
    """Run the loop `config.method` names (see the module docstring for the conventions)."""
    if config.method == "beam":
        return beam_search(step_fn, cache, batch_size, config, initial_logits=initial_logits,
                           batch_axes=batch_axes)
    return sample_decode(step_fn, cache, batch_size, config, rng=rng,
                         initial_logits=initial_logits)


def trim_at_eos(ids: Any, eos_id: int = EOS_ID) -> list[int]:
    """Generated ids up to and excluding the first EOS (the `output_ids` of `t5lite infer`)."""
    out: list[int] = []
    for t in list(ids):
        t = int(t)
        if t == eos_id:
            break
        out.append(t)
    return out
