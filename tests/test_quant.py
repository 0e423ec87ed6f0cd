"""int8 inference (t5lite.models.quant): quantized matmuls track float ones, the compiled
decoding function holds no float copy of any weight, quantized model dirs load without float
weights, bfloat16 cross K/V, and bad input is one clear error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_infer import TEXTS, make_model_dir, make_vocab, tiny_config
from t5lite import checkpoint
from t5lite.errors import UserError
from t5lite.inference import Generator
from t5lite.models import build_model
from t5lite.models.decoding import DecodeConfig
from t5lite.models.quant import (ACTIVATIONS, QTensor, QuantConfig, dense, quantize_model,
                                 quantize_rows)

# distinctive sizes: no activation of the test decode has as many elements as a weight
HLO_CFG = dict(vocab_size=400, d_model=48, num_heads=2, head_dim=24, d_ff=80)


@pytest.mark.parametrize("eqn,x_shape,w_shape,contracted", [
    ("btd,dnh->btnh", (2, 3, 16), (16, 2, 8), (0,)),
    ("btnh,nhd->btd", (2, 3, 2, 8), (2, 8, 16), (0, 1)),
    ("bsd,dkh->bksh", (2, 5, 16), (16, 2, 8), (0,)),
    ("...d,vd->...v", (2, 3, 16), (40, 16), (1,)),
])
@pytest.mark.parametrize("activations", ["int8x2", "int8", "float"])
def test_dense_tracks_float_einsum(eqn, x_shape, w_shape, contracted, activations):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape) * jnp.linspace(0.1, 3.0, w_shape[-1])  # uneven channels
    q, scale = quantize_rows(w, contracted)
    got = dense(eqn, x, QTensor(q, scale, activations, jnp.float32))
    want = jnp.einsum(eqn, x, w)
    assert got.shape == want.shape and got.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert err < {"int8": 0.03, "int8x2": 0.01, "float": 0.01}[activations], err
    assert err > 0  # really quantized


def _teacher_forced(model, enc, dec):
    return nnx.jit(lambda m, e, d: m(e, d)[0])(model, enc, dec)


@pytest.mark.parametrize("scan", [True, False])
def test_quantized_model_logits_close_and_weights_int8(scan):
    cfg = tiny_config(scan_layers=scan, tie_embeddings=not scan)
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(2, 500, (2, 12)), jnp.int32)
    dec = jnp.asarray(rng.integers(2, 500, (2, 6)), jnp.int32)
    ref = _teacher_forced(model, enc, dec)
    quantize_model(model, QuantConfig())  # the backend's default activations
    params = nnx.state(model, nnx.Param)
    flat = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(params)}
    emb = "embed/embedding"
    assert flat[emb].dtype == jnp.int8 and flat[emb + "_scale"].shape == (512, 1)
    big = [k for k, v in flat.items() if v.size >= 32 * 32 and "relpos" not in k]
    assert big and all(flat[k].dtype == jnp.int8 for k in big), big
    got = _teacher_forced(model, enc, dec)
    rel = float(jnp.sqrt(jnp.mean((got - ref) ** 2) / jnp.var(ref)))
    assert 0 < rel < 0.05, rel
    assert float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(ref, -1))) >= 0.9


def _float_buffers(hlo: str) -> list[tuple[str, int]]:
    out = []
    for dtype, dims in re.findall(r"\b(f32|bf16|f16|f64)\[([\d,]*)\]", hlo):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        out.append((f"{dtype}[{dims}]", size))
    return out


def _weight_sizes(cfg) -> set[int]:
    d, f, v, hd = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_heads * cfg.head_dim
    per_layer = {d * hd, d * f, v * d}
    return per_layer | {s * cfg.num_decoder_layers for s in per_layer}


@pytest.mark.parametrize("cross_attention", ["kv", "absorbed"])
@pytest.mark.parametrize("activations,expect_copies",
                         [("int8x2", False), ("int8", False), ("float", True)])
def test_compiled_decoding_has_no_float_copy_of_a_weight(vocab_path, activations,
                                                         expect_copies, cross_attention):
    """The optimized HLO of the whole jitted request (encoder + decoding loop) holds no float
    buffer as large as a weight when weights and activations are int8, with cross-attention
    K/V or absorbed (its k / v kernels are read as int8 too). On CPU the weight-only form
    (int8 converted to float before a float dot) does make such copies: the check sees them,
    so it is not vacuous."""
    cfg = tiny_config(**HLO_CFG)
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    quantize_model(model, QuantConfig(activations=activations))
    gen = Generator(model, None, max_input_len=16, batch_size=4, cross_attention=cross_attention)
    sizes = _weight_sizes(cfg)
    config = DecodeConfig(method="greedy", max_decode_len=8)
    tokens = jnp.ones((4, 16), jnp.int32)
    hlo = gen._jitted.lower(gen._state, tokens, jnp.full((4,), 16, jnp.int32),
                            jax.random.key(0), config=config).compile().as_text()
    assert "s8[" in hlo
    copies = sorted({name for name, size in _float_buffers(hlo) if size in sizes})
    if expect_copies:
        assert copies  # (CPU: XLA converts int8 weights to float for its dot library)
    else:
        assert not copies, f"float buffers the size of a weight: {copies}"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the float model on CPU")
def test_float_model_weights_are_float_buffers(vocab_path):
    """Control for the check above: the float model's weights are float buffers of exactly the
    sizes it looks for."""
    cfg = tiny_config(**HLO_CFG)
    gen = Generator(build_model(cfg, rngs=nnx.Rngs(params=0)), None, max_input_len=16,
                    batch_size=4)
    hlo = gen._jitted.lower(gen._state, jnp.ones((4, 16), jnp.int32),
                            jnp.full((4,), 16, jnp.int32), jax.random.key(0),
                            config=DecodeConfig(method="greedy", max_decode_len=8)
                            ).compile().as_text()
    assert {size for _, size in _float_buffers(hlo)} & _weight_sizes(cfg)


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory) -> str:
    return make_vocab(str(tmp_path_factory.mktemp("qvocab")))


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, vocab_path) -> str:
    d = str(tmp_path_factory.mktemp("float"))
    make_model_dir(d, tiny_config(), vocab_path)
    return d


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t5lite.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_quantize_verb_writes_an_int8_model_dir(float_dir, tmp_path):
    out = str(tmp_path / "int8")
    proc = run_cli("quantize", f"--model_dir={float_dir}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    assert "int8" in proc.stdout
    info = json.load(open(os.path.join(out, "quantization.json")))
    assert info["weights"] == "int8" and info["activations"] in ACTIVATIONS
    # the checkpoint holds int8 weights and no float copy of them
    with checkpoint._manager(checkpoint._resolve_dir(out)) as mngr:
        meta = mngr.item_metadata(checkpoint.latest_step(out))["params"]
    flat = checkpoint._flat(meta.tree if hasattr(meta, "tree") else meta)
    assert str(flat["embed/embedding"].dtype) == "int8"
    assert "embed/embedding_scale" in flat
    # loads on its own (vocabulary copied in), same outputs as quantizing after loading
    os.rename(float_dir, float_dir + ".moved")
    try:
        loaded = Generator.from_model_dir(out, batch_size=4).generate(TEXTS, max_decode_len=6)
    finally:
        os.rename(float_dir + ".moved", float_dir)
    direct = Generator.from_model_dir(float_dir, batch_size=4, quantize="int8",
                                      activations=info["activations"]
                                      ).generate(TEXTS, max_decode_len=6)
    assert [g.ids for g in loaded] == [g.ids for g in direct]
    # bfloat16 compute composes with a quantized dir: the same as quantizing on load in bf16
    bf_loaded = Generator.from_model_dir(out, batch_size=4, dtype="bfloat16")
    assert bf_loaded.config.dtype == "bfloat16"
    assert str(bf_loaded.model.embed.embedding[...].dtype) == "int8"
    bf_direct = Generator.from_model_dir(float_dir, batch_size=4, quantize="int8",
                                         activations=info["activations"], dtype="bfloat16")
    bf_ids = [g.ids for g in bf_loaded.generate(TEXTS, max_decode_len=6)]
    assert bf_ids == [g.ids for g in bf_direct.generate(TEXTS, max_decode_len=6)]
    # the infer verb reads it, and quantizes float dirs on the fly
    proc = run_cli("infer", f"--model_dir={out}", f"--input={TEXTS[0]}", "--max_decode_len=6",
                   "--cross_kv_dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1


@pytest.mark.parametrize("case", ["exists", "already_quantized", "same_dir", "no_output"])
def test_quantize_bad_input_is_one_clear_error(float_dir, tmp_path, case):
    args = ["quantize", f"--model_dir={float_dir}"]
    if case == "exists":
        args.append(f"--output={float_dir}_copy")
        make_model_dir(f"{float_dir}_copy", tiny_config(), "unused.model")
        want = "already holds a model"
    elif case == "already_quantized":
        q = tmp_path / "q"
        q.mkdir()
        (q / "quantization.json").write_text(json.dumps(
            {"format": 1, "weights": "int8", "activations": "int8"}))
        args = ["quantize", f"--model_dir={q}", f"--output={tmp_path / 'qq'}"]
        want = "already quantized"
    elif case == "same_dir":
        args.append(f"--output={float_dir}")
        want = "must differ"
    else:
        want = "--output are both required"
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and want in errors[0], proc.stderr


@pytest.mark.parametrize("cross_attention", ["kv", "absorbed"])
def test_bfloat16_cross_kv_and_generator_errors(float_dir, cross_attention):
    ref = Generator.from_model_dir(float_dir, batch_size=4, cross_attention=cross_attention)
    bf = Generator.from_model_dir(float_dir, batch_size=4, cross_kv_dtype="bfloat16",
                                  cross_attention=cross_attention)
    config = DecodeConfig(method="greedy", max_decode_len=6)
    rows = ref.tokenize(TEXTS)
    a, b = ref.generate_ids(rows, config)[1], bf.generate_ids(rows, config)[1]
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)  # summed log-probs
    with pytest.raises(UserError, match="cross_attention"):
        Generator.from_model_dir(float_dir, cross_attention="cached")
    with pytest.raises(UserError, match="cross_kv_dtype"):
        Generator.from_model_dir(float_dir, cross_kv_dtype="int4")
    with pytest.raises(UserError, match="quantize"):
        Generator.from_model_dir(float_dir, quantize="int4")
    with pytest.raises(UserError, match="activations"):
        Generator.from_model_dir(float_dir, quantize="int8", activations="fp8")
    with pytest.raises(UserError, match="dtype"):
        Generator.from_model_dir(float_dir, dtype="float16")


# the element types of a dot_general's two operands in lowered StableHLO text
_DOT = re.compile(r"dot_general.*:\s*\(tensor<(?:\d+x)*(\w+)>, tensor<(?:\d+x)*(\w+)>\)")


@pytest.mark.parametrize("opts,operands", [
    ({}, {"f32"}),
    ({"dtype": "bfloat16"}, {"bf16"}),
    ({"dtype": "bfloat16", "quantize": "int8"}, {"bf16", "i8"}),  # int8x2 on CPU: i8 x i8
    ({"dtype": "bfloat16", "quantize": "int8", "activations": "float"}, {"bf16"}),
    ({"dtype": "float32", "quantize": "int8", "activations": "float"}, {"f32"}),
])
def test_compute_dtype_sets_every_dot_operand(float_dir, opts, operands):
    """`dtype=` changes what the request's matmuls take (the model dir is float32), with float
    or int8 weights; the stored parameters keep their dtype."""
    gen = Generator.from_model_dir(float_dir, batch_size=4, **opts)
    assert gen.config.dtype == opts.get("dtype", "float32")
    stored = {str(p.dtype) for p in jax.tree.leaves(nnx.state(gen.model, nnx.Param))}
    assert stored == ({"float32", "int8"} if "quantize" in opts else {"float32"})
    text = gen._jitted.lower(gen._state, jnp.ones((4, 16), jnp.int32),
                             jnp.full((4,), 16, jnp.int32), jax.random.key(0),
                             config=DecodeConfig(method="greedy", max_decode_len=6)).as_text()
    dots = [m.groups() for line in text.splitlines() if (m := _DOT.search(line))]
    assert len(dots) >= 10, text[:2000]
    assert {t for pair in dots for t in pair} == operands, sorted(set(dots))


def test_int8_models_decode_in_both_cross_attention_forms(float_dir):
    """An int8 model's cross-attention kernels stay int8 in the absorbed form (its k scales
    move onto the query); greedy outputs and scores match the K/V form's closely. "auto"
    keeps K/V for int8 models (measured faster per step)."""
    config = DecodeConfig(method="greedy", max_decode_len=6)
    gens = {form: Generator.from_model_dir(float_dir, batch_size=4, quantize="int8",
                                           cross_attention=form) for form in ("kv", "absorbed")}
    assert Generator.from_model_dir(float_dir, quantize="int8").cross_attention_form() == "kv"
    assert Generator.from_model_dir(float_dir).cross_attention_form() == "absorbed"  # CPU
    rows = gens["kv"].tokenize(TEXTS)
    (tok_kv, score_kv), (tok_ab, score_ab) = (g.generate_ids(rows, config) for g in gens.values())
    np.testing.assert_array_equal(tok_kv, tok_ab)
    np.testing.assert_allclose(score_kv, score_ab, rtol=1e-3, atol=1e-3)
