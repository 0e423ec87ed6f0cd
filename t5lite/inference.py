"""Python inference API: load a model dir once, then `generate(texts)`.

Example::

    >>> gen = Generator.from_model_dir("runs/demo")
    >>> [g.output for g in gen.generate(["The <extra_id_0> sat on the mat."])]
    ['<extra_id_0> cat <extra_id_1>']
    >>> gen.generate(["..."], decode="beam", beam_size=4, num_samples=2)[0].outputs  # 2 best
    >>> gen.generate(["..."], decode="sample", top_p=0.9, num_samples=3, seed=1)[0].outputs

What happens per batch of texts:
  * on the host: texts are tokenised with the model's SentencePiece vocabulary (sentinels such
    as `<extra_id_0>` map to their ids), EOS is appended, and the batch is padded to a fixed
    number of rows and a length bucket (a power of two, at most the model's input length), so a
    handful of compiled shapes serve every request;
  * then, inside one jitted function:
    - encoder-decoder: the encoder runs once and what the decoder's cross-attention reads is
      prepared once (`precompute_cross_attention`): every layer's K/V, or with absorbed
      cross-attention (`cross_attention`, the CPU default) just the encoder output, which
      every layer reads through its own k / v kernels; then the decoding loop
      (`t5lite.models.decoding.run_decoding`) runs `decode_step` against it; beams and
      samples are rows of the self-attention cache, while the cross-attention values stay
      one per input (shared by its beams/samples, never copied or recomputed per step);
    - decoder-only: the prompt (inputs + EOS) is prefilled in one pass, then decoded step by
      step;
    - beam search keeps the beams of an input in one shared cache row (`t5lite.models.cache`),
      so re-ranking beams never copies keys/values.

Sharding: pass a `mesh` (and a rules recipe): parameters are laid out by their logical axes,
the batch goes over the data axes, and the model's activation constraints apply.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from t5lite.config import ModelConfig
from t5lite.errors import ConfigError, UserError
from t5lite.models import decoding
from t5lite.models.decoding import EOS_ID, PAD_ID, DecodeConfig, DecodeOutput
from t5lite.models.target import target_backend
from t5lite.parallel.rules import (DEFAULT_INFERENCE_RECIPE, Rules, axes_to_pure, get_rules,
                                   logical_to_sharding, partitioned, tree_shardings)

log = logging.getLogger(__name__)

_MIN_BUCKET = 16
# how decoding steps read the encoder (encoder-decoder models): "kv": every layer's cross K/V,
# computed once per request; "absorbed": the encoder output itself, with the k / v kernels
# moved to the query and output sides (`t5lite.models.attention.absorbed_decode_attention`);
# "auto": absorbed on CPU (where a step is bound by memory traffic, not FLOPs) for float
# weights, kv elsewhere and for int8 weights (absorbed int8 dots cost more per step than they
# save; int8 kernels stay int8 in both forms)
CROSS_ATTENTION_FORMS = ("auto", "kv", "absorbed")
# compute dtypes a model can be run in (`Generator.from_model_dir(dtype=...)`, `t5lite infer
# --dtype`); parameters keep their stored dtype
COMPUTE_DTYPES = ("bfloat16", "float32")


def with_compute_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
    """`cfg` computing in `dtype` ("bfloat16" | "float32"; None: unchanged). Parameters keep
    their dtype; the new config is validated again (e.g. cuDNN attention needs bfloat16)."""
    if dtype is None:
        return cfg
    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"dtype={dtype!r} must be one of {', '.join(COMPUTE_DTYPES)} (or None: "
                        "the model's own).")
    return cfg.replace(dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` returns for one input text.

    outputs / output_ids: `num_samples` results (best first for beam search); `output` and
    `ids` are the first of them. output_ids exclude the start token and stop before EOS.
    scores: sum of token log-probabilities (greedy / sample) or the length-penalised beam score.
    """

    input: str
    outputs: list[str]
    output_ids: list[list[int]]
    scores: list[float]

    @property
    def output(self) -> str:
        return self.outputs[0]

    @property
    def ids(self) -> list[int]:
        return self.output_ids[0]


def _bucket(length: int, max_len: int) -> int:
    """Smallest power of two >= length (at least _MIN_BUCKET), capped at max_len."""
    return min(max_len, max(_MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(length, 1))))))


def load_model(model_dir: str, *, step: int | None = None, mesh: Mesh | None = None,
               rules: str | Rules = DEFAULT_INFERENCE_RECIPE, config: ModelConfig | None = None):
    """(model, step) restored from `model_dir`'s checkpoint (latest unless `step`).

    Parameters are created abstractly and restored straight into their final sharding (on
    `mesh` by their logical axes, else on the first device); dropout is switched off. A
    quantized model dir (`t5lite quantize`, `quantization.json`) restores its int8 weights
    and scales directly (no float weights are read or built).
    """
    from t5lite import checkpoint
    from t5lite.model_dir import read_model_config
    from t5lite.models import build_model as build_float, param_logical_axes
    from t5lite.models.quant import quantize_model, read_quant_info

    quant = read_quant_info(model_dir)
    if quant is None:
        build_model = build_float
    else:
        def build_model(c, rngs):
            return quantize_model(build_float(c, rngs=rngs), quant)

    cfg = read_model_config(model_dir) if config is None else config
    cfg = cfg.replace(dropout_rate=0.0)
    found = checkpoint.latest_step(model_dir)
    if found is None:
        raise UserError(f"{model_dir} has no checkpoint (no {os.path.join(model_dir, 'checkpoints')}"
                        "/<step>); train one with `t5lite train` or bring one in with "
                        "`t5lite import`.")
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    shardings = None
    if mesh is not None:
        shardings = tree_shardings(axes_to_pure(param_logical_axes(abstract_params)),
                                   nnx.to_pure_dict(abstract_params), mesh, get_rules(rules))
    # without `step`: the newest intact checkpoint (broken ones are set aside with a warning)
    params, used = checkpoint.restore_params_and_step(model_dir, abstract_params, shardings,
                                                      step=step)
    rest = abstract_rest
    if jax.tree.leaves(abstract_rest):  # non-parameter state (e.g. RNG counters): build for real
        rest = jax.jit(lambda: nnx.split(build_model(cfg, rngs=nnx.Rngs(params=0)),
                                         nnx.Param, ...)[2])()
    return nnx.merge(graphdef, params, rest), used


def _int8_cross_attention(model: nnx.Module) -> bool:
    """Whether an encoder-decoder's cross-attention kernels are int8 (`t5lite.models.quant`)."""
    return any("cross_attention" in map(str, path) and str(path[-1]).endswith("_scale")
               for path, _ in nnx.to_flat_state(nnx.state(model)))


def _decode_cache(model, inputs: int, max_len: int, config: DecodeConfig, rows: int):
    """(cache, batch axes) for decoding `inputs` inputs into `rows` rows each. Beam search
    uses a cache whose beams share each input's cache row (re-ranking beams reorders only its
    small owner table); greedy / sampling rows are plain independent rows."""
    from t5lite.models.cache import BATCH_AXIS, BEAM_AXES

    if config.method == "beam":
        return model.init_decode_cache(inputs, max_len, beams=rows), BEAM_AXES
    cache = model.init_decode_cache(inputs * rows, max_len)
    return cache, {k: BATCH_AXIS[k] for k in cache}


class Generator:
    """Text in, text out, for an `EncoderDecoder` or `DecoderOnly` model (see module doc)."""

    def __init__(self, model: nnx.Module, vocabulary: Any, *, max_input_len: int,
                 default_decode_len: int = 64, batch_size: int = 8, mesh: Mesh | None = None,
                 rules: str | Rules = DEFAULT_INFERENCE_RECIPE, cross_kv_dtype: str = "float",
                 cross_attention: str = "auto"):
        from t5lite.models.quant import CROSS_KV_DTYPES

        if cross_kv_dtype not in CROSS_KV_DTYPES:
            raise UserError(f"cross_kv_dtype={cross_kv_dtype!r} must be one of "
                            f"{', '.join(CROSS_KV_DTYPES)}.")
        if cross_attention not in CROSS_ATTENTION_FORMS:
            raise UserError(f"cross_attention={cross_attention!r} must be one of "
                            f"{', '.join(CROSS_ATTENTION_FORMS)}.")
        self.cross_kv_dtype = cross_kv_dtype
        self.cross_attention = cross_attention
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be a positive integer.")
        self.model = model
        self.config: ModelConfig = model.config
        self.vocab = vocabulary
        self.max_input_len = int(max_input_len)
        self.default_decode_len = int(default_decode_len)
        self.batch_size = int(batch_size)
        self.mesh = mesh
        self.rules = get_rules(rules)
        self.decoder_only = self.config.architecture == "decoder_only"
        self._graphdef, self._state = nnx.split(model)
        # one jitted function per Generator: its traces depend on this mesh and rules
        self._jitted = jax.jit(self._run, static_argnames=("config",))

    def set_model(self, model: nnx.Module) -> None:
        """Use new weights (e.g. the train loop's latest); the compiled decoding function is
        reused when the model's structure is unchanged."""
        graphdef, state = nnx.split(model)
        if graphdef != self._graphdef:
            self._jitted = jax.jit(self._run, static_argnames=("config",))
        self.model, self._graphdef, self._state = model, graphdef, state

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model_dir(cls, model_dir: str, *, step: int | None = None, batch_size: int = 8,
                       mesh: Mesh | None = None, rules: str | Rules = DEFAULT_INFERENCE_RECIPE,
                       vocabulary_path: str | None = None, quantize: str | None = None,
                       activations: str | None = None, cross_kv_dtype: str = "float",
                       dtype: str | None = None, cross_attention: str = "auto") -> "Generator":
        """Load config, vocabulary and the latest (or `step`) checkpoint of `model_dir`.

        quantize="int8": quantize the weights after loading (`t5lite.models.quant`; a model
        dir written by `t5lite quantize` is int8 already). activations: "int8x2" | "int8" |
        "float" (default: int8x2 on CPU, float elsewhere). cross_kv_dtype="bfloat16": keep
        the cross-attention K/V (or, absorbed, the encoder output) in bfloat16. dtype: the
        compute dtype ("bfloat16" | "float32"; default: the model dir's own
        `ModelConfig.dtype`); the parameters stay as stored, only the activations and matmuls
        change dtype. cross_attention: "auto" | "kv" | "absorbed" (`CROSS_ATTENTION_FORMS`)."""
        from t5lite.models.quant import QuantConfig, quantize_model

        if quantize not in (None, "none", "int8"):
            raise UserError(f"quantize={quantize!r} must be 'int8' or None.")
        if activations is not None and quantize in (None, "none"):
            raise UserError("activations= applies to quantized weights; pass quantize='int8'.")
        try:
            quant = QuantConfig(activations=activations) if quantize == "int8" else None
        except ConfigError as e:
            raise UserError(str(e)) from None
        from t5lite.data.vocab import load_vocabulary
        from t5lite.model_dir import read_model_config, read_run_info

        from t5lite import storage

        if not storage.isdir(model_dir):
            raise UserError(f"--model_dir {model_dir!r} does not exist.")
        cfg = with_compute_dtype(read_model_config(model_dir), dtype)
        info = read_run_info(model_dir)
        vocab = load_vocabulary(vocabulary_path or info.vocabulary, extra_ids=info.extra_ids)
        if vocab.vocab_size > cfg.vocab_size:
            raise UserError(f"vocabulary {info.vocabulary} has {vocab.vocab_size} ids but the "
                            f"model's embedding has {cfg.vocab_size} rows; this vocabulary does "
                            "not belong to this model.")
        model, _ = load_model(model_dir, step=step, mesh=mesh, rules=rules, config=cfg)
        if quant is not None:
            model = quantize_model(model, quant)  # no-op on an already quantized model dir
        lengths = info.task_feature_lengths
        max_in = lengths.get("inputs") or 512
        return cls(model, vocab, max_input_len=max_in,
                   default_decode_len=lengths.get("targets") or 64, batch_size=batch_size,
                   mesh=mesh, rules=rules, cross_kv_dtype=cross_kv_dtype,
                   cross_attention=cross_attention)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: Sequence[str], truncate: bool = False) -> list[list[int]]:
        """Token ids of each text + EOS; too-long inputs are an error unless `truncate`."""
        out = []
        for n, text in enumerate(texts):
            ids = list(self.vocab.encode(text)) + [EOS_ID]
            if len(ids) > self.max_input_len:
                if not truncate:
                    raise UserError(
                        f"input {n + 1} has {len(ids)} tokens (with EOS) but the model takes at "
                        f"most {self.max_input_len}; shorten it or pass --truncate to keep the "
                        f"first {self.max_input_len - 1} tokens.")
                ids = ids[: self.max_input_len - 1] + [EOS_ID]
            out.append(ids)
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.vocab.decode([int(i) for i in ids])

    # ------------------------------------------------------------------ decoding core
    def _run(self, state, tokens: jax.Array, lengths: jax.Array, rng: jax.Array,
             config: DecodeConfig) -> DecodeOutput:
        """The jitted core: [B, S] padded inputs -> DecodeOutput with B * num_samples rows."""
        model = nnx.merge(self._graphdef, state)
        batch = tokens.shape[0]
        repeat = config.num_samples if config.method == "sample" else 1
        rows = config.beam_size if config.method == "beam" else repeat
        if self.decoder_only:
            return self._run_decoder_only(model, tokens, lengths, rng, config, repeat, rows)
        encoded = model.encode(tokens)
        # Once per request, outside the decoding loop: the decoder's per-layer parameters
        # (static slices of a scanned stack) and what cross-attention reads (every layer's
        # K/V, or the encoder output when absorbed). Those stay per input: the `rows` beams /
        # samples of an input share them in `decode_step`.
        layers = model.decoder.layer_modules()
        absorbed = self.cross_attention_form(model) == "absorbed"
        cross = model.precompute_cross_attention(encoded, tokens, layers, absorbed=absorbed)
        if self.cross_kv_dtype != "float":
            from t5lite.models.quant import cast_cross_kv

            cross = cast_cross_kv(cross, self.cross_kv_dtype)
        cache, axes = _decode_cache(model, batch, config.max_decode_len, config, rows)

        def step_fn(tok, i, c):
            return model.decode_step(tok, i, c, cross, layers)

        return decoding.run_decoding(step_fn, cache, batch * repeat, config, rng=rng, batch_axes=axes)

    def cross_attention_form(self, model: nnx.Module | None = None) -> str:
        """"kv" or "absorbed": the form `cross_attention` ("auto" resolved) takes for `model`
        (default: this Generator's) on the backend being traced for."""
        if self.cross_attention != "auto":
            return self.cross_attention
        model = self.model if model is None else model
        cpu = target_backend() == "cpu"
        return "absorbed" if cpu and not _int8_cross_attention(model) else "kv"

    def _run_decoder_only(self, model, tokens, lengths, rng, config, repeat, rows):
        """Prompt rows are [0, input ids..., EOS] (SeqIO prefix-LM layout: the start token, then
        the inputs); `lengths` counts them all, so it is also the bidirectional prefix length and
        the position of the first generated token."""
        if repeat > 1:  # several samples per prompt: each is its own row from the start
            tokens = jnp.repeat(tokens, repeat, axis=0)
            lengths = jnp.repeat(lengths, repeat, axis=0)
        n, prompt_len = tokens.shape
        per_prompt = rows if config.method == "beam" else 1  # samples were repeated above
        cache, axes = _decode_cache(model, n, prompt_len + config.max_decode_len, config,
                                    per_prompt)
        logits, cache = model.prefill(tokens, lengths, cache)  # beams share the prompt's K/V
        if config.method == "beam":
            lengths = jnp.repeat(lengths, rows, axis=0)
        layers = model.decoder.layer_modules()  # sliced once, outside the loop

        def step_fn(tok, i, c):
            # generated token i sits right after the prompt of its row
            return model.decode_step(tok, lengths + i, c, layers)

        return decoding.run_decoding(step_fn, cache, n, config, rng=rng, initial_logits=logits,
                               batch_axes=axes)

    def generate_ids(self, token_rows: Sequence[Sequence[int]], config: DecodeConfig,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Decode pre-tokenised inputs (each ending with EOS). Returns numpy (tokens, scores):
        tokens [N, num_samples, max_decode_len], scores [N, num_samples]."""
        all_tokens, all_scores = [], []
        for start in range(0, len(token_rows), self.batch_size):
            chunk = list(token_rows[start: start + self.batch_size])
            out = self._decode_batch(chunk, config, jax.random.fold_in(jax.random.key(seed),
                                                                       start))
            all_tokens.append(out[0][: len(chunk)])
            all_scores.append(out[1][: len(chunk)])
        if not all_tokens:
            return (np.zeros((0, config.num_samples, config.max_decode_len), np.int32),
                    np.zeros((0, config.num_samples), np.float32))
        return np.concatenate(all_tokens), np.concatenate(all_scores)

    def _decode_batch(self, chunk: list[list[int]], config: DecodeConfig, rng: jax.Array):
        if self.decoder_only:
            chunk = [[PAD_ID] + list(ids) for ids in chunk]  # decoder start token, then inputs
        cap = self.max_input_len + (1 if self.decoder_only else 0)
        width = _bucket(max(len(r) for r in chunk), cap)
        tokens = np.full((self.batch_size, width), PAD_ID, np.int32)
        lengths = np.ones((self.batch_size,), np.int32)
        for r, ids in enumerate(chunk):
            tokens[r, : len(ids)] = ids
            lengths[r] = len(ids)
        tokens_j, lengths_j = self._place(tokens), self._place(lengths)
        with partitioned(self.mesh, self.rules):
            out = self._jitted(self._state, tokens_j, lengths_j, rng, config=config)
        toks = np.asarray(jax.device_get(out.tokens))
        scores = np.asarray(jax.device_get(out.scores))
        b = self.batch_size
        if config.method == "beam":
            toks, scores = toks[:, : config.num_samples], scores[:, : config.num_samples]
        else:
            toks = toks.reshape(b, config.num_samples, -1)
            scores = scores.reshape(b, config.num_samples)
        return toks, scores

    def _place(self, array: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        sharding = logical_to_sharding(("batch",) + (None,) * (array.ndim - 1), self.mesh,
                                       self.rules, array.shape)
        return jax.device_put(array, sharding)

    # ------------------------------------------------------------------ text API
    def make_config(self, decode: str = "greedy", *, max_decode_len: int | None = None,
                    beam_size: int = 4, alpha: float = 0.6, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, num_samples: int = 1) -> DecodeConfig:
        return DecodeConfig(method=decode,
                            max_decode_len=max_decode_len or self.default_decode_len,
                            beam_size=beam_size if decode == "beam" else 1, alpha=alpha,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            num_samples=num_samples)

    def generate(self, texts: Sequence[str], decode: str = "greedy", *,
                 max_decode_len: int | None = None, beam_size: int = 4, alpha: float = 0.6,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 num_samples: int = 1, seed: int = 0, truncate: bool = False
                 ) -> list[Generation]:
        """Decode each text; one `Generation` per text, in order (see module docstring)."""
        config = self.make_config(decode, max_decode_len=max_decode_len, beam_size=beam_size,
                                  alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p,
                                  num_samples=num_samples)
        texts = list(texts)
        token_rows = self.tokenize(texts, truncate=truncate)
        tokens, scores = self.generate_ids(token_rows, config, seed=seed)
        results = []
        for text, row_tokens, row_scores in zip(texts, tokens, scores):
            ids = [decoding.trim_at_eos(t) for t in row_tokens]
            results.append(Generation(input=text, outputs=[self.detokenize(i) for i in ids],
                                      output_ids=ids, scores=[float(s) for s in row_scores]))
        return results


__all__ = ["COMPUTE_DTYPES", "Generation", "Generator", "load_model", "with_compute_dtype"]
