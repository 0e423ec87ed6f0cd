"""Inference on real (tiny, random) models: cached decoding vs the uncached model, sampling and
beam equivalences, cross K/V computed once, sharded == single device, bad inputs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5lite import checkpoint
from t5lite.config import ModelConfig
from t5lite.errors import UserError
from t5lite.inference import Generator
from t5lite.model_dir import RunInfo, write_model_config, write_run_info
from t5lite.models import build_model
from t5lite.models.decoding import EOS_ID, trim_at_eos

WORDS = ("the cat dog sat on a mat and ran to house tree big small red blue green bird "
         "sings quickly slowly every morning evening river mountain city people walk talk "
         "read books write letters under over near far home garden").split()

TEXTS = ["the cat sat on the mat", "a big red <extra_id_0> ran to the house",
         "every morning the bird sings", "<extra_id_0> river <extra_id_1> far"]


def make_vocab(directory: str) -> str:
    from t5lite.data.vocab import train_vocabulary

    rng = np.random.default_rng(0)
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w") as f:
        for _ in range(400):
            f.write(" ".join(rng.choice(WORDS, size=12)) + ".\n")
    return train_vocabulary([corpus], 320, os.path.join(directory, "spm"))


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=512, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                num_encoder_layers=2, num_decoder_layers=2)
    base.update(kw)
    return ModelConfig(**base)


def make_model_dir(directory: str, cfg: ModelConfig, vocab_path: str, seed: int = 0,
                   inputs_len: int = 48, targets_len: int = 8) -> nnx.Module:
    model = build_model(cfg, rngs=nnx.Rngs(params=seed))
    checkpoint.save_params(directory, nnx.state(model, nnx.Param), step=0)
    write_model_config(directory, cfg)
    write_run_info(directory, RunInfo(task=None, vocabulary=vocab_path,
                                      task_feature_lengths={"inputs": inputs_len,
                                                            "targets": targets_len},
                                      feature_converter=("prefix_lm" if cfg.architecture ==
                                                         "decoder_only" else "enc_dec")))
    return model


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory) -> str:
    return make_vocab(str(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="module")
def encdec(tmp_path_factory, vocab_path):
    d = str(tmp_path_factory.mktemp("encdec"))
    make_model_dir(d, tiny_config(), vocab_path)
    return d, Generator.from_model_dir(d, batch_size=4)


_encdec_forward = nnx.jit(lambda m, e, d: m(e, d)[0])


def uncached_greedy_encdec(model, enc_ids: list[int], length: int) -> list[int]:
    """Reference: rerun the full teacher-forced model on the growing prefix (no cache), argmax
    at the last position each step. Inputs are padded to fixed shapes so that one compiled
    forward serves every step (causal attention: the padding after the prefix is never seen)."""
    enc = np.zeros((1, 48), np.int32)
    enc[0, : len(enc_ids)] = enc_ids
    dec = [0]
    out = []
    for _ in range(length):
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(dec)] = dec
        logits = _encdec_forward(model, jnp.asarray(enc), jnp.asarray(padded))
        tok = int(jnp.argmax(logits[0, len(dec) - 1]))
        out.append(tok)
        if tok == EOS_ID:
            break
        dec.append(tok)
    return out


def test_sentinels_are_understood(encdec):
    _, gen = encdec
    ids = gen.tokenize(["a <extra_id_0> b <extra_id_1>"])[0]
    size = gen.vocab.vocab_size
    assert size - 1 in ids and size - 2 in ids
    assert ids[-1] == EOS_ID


@pytest.mark.parametrize("cross_attention", ["kv", "absorbed"])
@pytest.mark.parametrize("kind", ["scanned_relative", "unrolled_rope_gqa"])
def test_cached_greedy_equals_uncached_reference(tmp_path, vocab_path, kind, cross_attention):
    cfg = tiny_config() if kind == "scanned_relative" else tiny_config(
        scan_layers=False, position_scheme="rope", num_heads=4, num_kv_heads=2,
        num_encoder_layers=3)
    model = make_model_dir(str(tmp_path), cfg, vocab_path, seed=3)
    gen = Generator.from_model_dir(str(tmp_path), batch_size=4, cross_attention=cross_attention)
    results = gen.generate(TEXTS, max_decode_len=8)
    for text, res in zip(TEXTS, results):
        enc_ids = gen.tokenize([text])[0]
        want = uncached_greedy_encdec(model, enc_ids, 8)
        assert res.ids == trim_at_eos(want), text
        assert len(want) >= 2  # the check compares real multi-token paths


def test_decoder_only_cached_greedy_equals_uncached(tmp_path, vocab_path):
    cfg = tiny_config(architecture="decoder_only", num_encoder_layers=0, num_decoder_layers=2)
    model = make_model_dir(str(tmp_path), cfg, vocab_path, seed=5)
    gen = Generator.from_model_dir(str(tmp_path), batch_size=4)
    results = gen.generate(TEXTS, max_decode_len=6)
    forward = nnx.jit(lambda m, t, c: m(t, decoder_causal_attention=c)[0])
    for text, res in zip(TEXTS, results):
        prompt = [0] + gen.tokenize([text])[0]
        seq, out = list(prompt), []
        for _ in range(6):
            tokens = np.zeros((1, 64), np.int32)
            tokens[0, : len(seq)] = seq
            causal = np.zeros((1, 64), np.int32)
            causal[0, : len(prompt)] = 1
            logits = forward(model, jnp.asarray(tokens), jnp.asarray(causal))
            tok = int(jnp.argmax(logits[0, len(seq) - 1]))
            out.append(tok)
            if tok == EOS_ID:
                break
            seq.append(tok)
        assert res.ids == trim_at_eos(out), text
    beam1 = gen.generate(TEXTS, decode="beam", beam_size=1, max_decode_len=6)
    assert [r.ids for r in beam1] == [r.ids for r in results]


def test_beam1_topk1_temperature0_equal_greedy(encdec):
    _, gen = encdec
    greedy = [r.output_ids for r in gen.generate(TEXTS)]
    assert [r.output_ids for r in gen.generate(TEXTS, decode="beam", beam_size=1)] == greedy
    assert [r.output_ids for r in gen.generate(TEXTS, decode="sample", top_k=1, seed=4)] == greedy
    assert [r.output_ids for r in gen.generate(TEXTS, decode="sample", temperature=0.0)] == greedy
    assert [r.output_ids for r in gen.generate(TEXTS, decode="sample", temperature=1e-5,
                                               seed=9)] == greedy


def test_sampling_reproducible_and_num_samples(encdec):
    _, gen = encdec
    a = gen.generate(TEXTS[:2], decode="sample", num_samples=3, seed=7)
    b = gen.generate(TEXTS[:2], decode="sample", num_samples=3, seed=7)
    c = gen.generate(TEXTS[:2], decode="sample", num_samples=3, seed=8)
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    assert [r.output_ids for r in a] != [r.output_ids for r in c]
    assert all(len(r.outputs) == 3 for r in a)
    assert len({tuple(x) for x in a[0].output_ids}) > 1  # samples differ from each other


def test_beam_returns_sorted_hypotheses(encdec):
    _, gen = encdec
    res = gen.generate(TEXTS, decode="beam", beam_size=3, num_samples=3, alpha=0.6)
    for r in res:
        assert r.scores == sorted(r.scores, reverse=True)
        assert len({tuple(x) for x in r.output_ids}) == 3


def test_batching_and_padding_do_not_change_outputs(encdec):
    d, gen = encdec
    together = [r.output_ids for r in gen.generate(TEXTS)]
    alone = [gen.generate([t])[0].output_ids for t in TEXTS]
    assert together == alone
    small = Generator.from_model_dir(d, batch_size=3)
    assert [r.output_ids for r in small.generate(TEXTS)] == together


# ------------------------------------------------------------------ cross K/V computed once
def _dot_generals(jaxpr, in_loop: bool = False, found=None):
    """(in_while_body, lhs_shape, rhs_shape, contracting dims) of every dot_general, recursively."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), _ = eqn.params["dimension_numbers"]
            found.append((in_loop, tuple(eqn.invars[0].aval.shape),
                          tuple(eqn.invars[1].aval.shape), tuple(lc), tuple(rc)))
        for name, sub in eqn.params.items():
            subs = sub if isinstance(sub, (list, tuple)) else [sub]
            for j in subs:
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    _dot_generals(inner, in_loop or (eqn.primitive.name == "while"
                                                     and name == "body_jaxpr"), found)
    return found


def _encoder_kv_projections(dots, src_len: int, d_model: int):
    """dot_generals that read encoder-length activations and contract d_model: the encoder's
    own projections and the cross-attention K/V projections."""
    return [d for d in dots
            if src_len in d[1] and any(d[1][i] == d_model for i in d[3])]


@pytest.mark.parametrize("cross_attention", ["kv", "absorbed"])
def test_cross_attention_kv_computed_once_per_request(encdec, cross_attention):
    """Inspect the traced generate function: no projection of the encoder output (length S,
    contracting d_model) happens inside the decoding while-loop, for greedy and beam search,
    with cross K/V or absorbed cross-attention (which projects the encoder output nowhere).
    A deliberately wrong step function (recomputing cross K/V per step) is caught."""
    gen = Generator.from_model_dir(encdec[0], batch_size=4, cross_attention=cross_attention)
    src_len, d_model = 16, gen.config.d_model
    tokens = jnp.asarray(np.full((4, src_len), 5, np.int32))
    lengths = jnp.full((4,), src_len, jnp.int32)

    def projections(generator, cfg):
        jaxpr = jax.make_jaxpr(lambda s, t, n, r: generator._run(s, t, n, r, cfg))(
            generator._state, tokens, lengths, jax.random.key(0)).jaxpr
        dots = _dot_generals(jaxpr)
        assert any(d[0] for d in dots), "expected a decoding while-loop with matmuls"
        return (_encoder_kv_projections([d for d in dots if not d[0]], src_len, d_model),
                _encoder_kv_projections([d for d in dots if d[0]], src_len, d_model))

    for cfg in (gen.make_config("greedy", max_decode_len=8),
                gen.make_config("beam", beam_size=3, max_decode_len=8)):
        outside, inside = projections(gen, cfg)
        # the encoder (2 layers x q,k,v + ffn...) and the decoder's cross K/V, all outside
        assert len(outside) >= 2 * gen.config.num_decoder_layers
        assert inside == [], inside
        if cross_attention == "absorbed":  # no cross K/V at all: 2 projections per layer fewer
            kv_gen = Generator.from_model_dir(encdec[0], batch_size=4, cross_attention="kv")
            assert len(outside) == (len(projections(kv_gen, cfg)[0])
                                    - 2 * gen.config.num_decoder_layers)

    # control: a step function that projects the encoder output every step is detected
    model = gen.model

    def bad_run(tok_in):
        encoded = model.encode(tok_in)
        from t5lite.models import decoding

        def step_fn(tok, i, cache):
            cross = model.precompute_cross_attention(encoded, tok_in)
            return model.decode_step(tok, i, cache, cross)

        return decoding.run_decoding(step_fn, model.init_decode_cache(4, 8), 4,
                               gen.make_config("greedy", max_decode_len=8))

    dots = _dot_generals(jax.make_jaxpr(bad_run)(tokens).jaxpr)
    assert _encoder_kv_projections([d for d in dots if d[0]], src_len, d_model)


# ------------------------------------------------------------------ sharded == single device
def test_sharded_decode_equals_single_device(encdec):
    from t5lite.parallel.mesh import MeshConfig, make_mesh

    d, single = encdec
    assert len(jax.devices()) == 8
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    sharded = Generator.from_model_dir(d, batch_size=4, mesh=mesh, rules="dp_tp")
    # parameters really are laid out over the mesh
    q = jax.tree.leaves(nnx.state(sharded.model, nnx.Param))
    assert any(len(x.sharding.device_set) == 8 for x in q)
    for kw in (dict(), dict(decode="beam", beam_size=2, num_samples=2)):
        a = single.generate(TEXTS, **kw)
        b = sharded.generate(TEXTS, **kw)
        assert [r.output_ids for r in a] == [r.output_ids for r in b], kw
        np.testing.assert_allclose([r.scores for r in a], [r.scores for r in b], rtol=1e-4,
                                   atol=1e-4)


# ------------------------------------------------------------------ bad input
def test_input_too_long_is_an_error_or_truncated(encdec):
    _, gen = encdec
    long_text = " ".join(["the cat sat on the mat"] * 20)
    with pytest.raises(UserError, match="--truncate"):
        gen.generate([long_text])
    out = gen.generate([long_text], truncate=True)
    assert len(out) == 1


def test_model_dir_without_checkpoint(tmp_path, vocab_path):
    write_model_config(str(tmp_path), tiny_config())
    write_run_info(str(tmp_path), RunInfo(task=None, vocabulary=vocab_path,
                                          task_feature_lengths={"inputs": 24, "targets": 8}))
    with pytest.raises(UserError, match="no checkpoint"):
        Generator.from_model_dir(str(tmp_path))


def test_missing_model_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Generator.from_model_dir(str(tmp_path / "nope"))
