"""Smoke tests of the benchmark scripts' core functions on a tiny model (1 step each).

No timing is asserted: these check that the benchmarks build the real train step and decoding
paths, report consistent fields, and that gpu.sh is valid bash.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from t5lite import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from t5lite.config import ModelConfig  # noqa: E402

TINY = ModelConfig(vocab_size=128, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                   num_encoder_layers=1, num_decoder_layers=1)


def _single_mesh():
    from t5lite.parallel.mesh import single_device_mesh

    return single_device_mesh()


def test_synthetic_batch_packed_layout():
    from train_step import synthetic_batch

    b = synthetic_batch(2, 8, 6, 50, packed=True)
    assert b["encoder_segment_ids"][0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert b["decoder_positions"][0].tolist() == [0, 1, 2, 0, 1, 2]
    # every segment's decoder input starts with the start token 0, then the shifted targets
    assert b["decoder_input_tokens"][0, 0] == 0 and b["decoder_input_tokens"][0, 3] == 0
    assert b["decoder_input_tokens"][0, 1] == b["decoder_target_tokens"][0, 0]
    plain = synthetic_batch(2, 8, 6, 50)
    assert "encoder_segment_ids" not in plain and plain["encoder_input_tokens"].min() >= 2


def test_train_step_run_reports_consistent_numbers():
    from train_step import run

    result = run(TINY, batch_size=2, inputs_length=16, targets_length=8, steps=1, warmup=0,
                 measure_peak=False, packed=True, mesh=_single_mesh(), log=lambda *a: None)
    # counted by hand (matmuls only, 2 per multiply-add, training = 3 x forward):
    proj, ffn = 2 * 32 * 16 * (2 + 2) * 2, 2 * 32 * 64 * 3  # q,k,v,o of 2 heads; gated FFN
    encoder = 16 * (proj + 2 * 2 * 2 * 16 * 16 + ffn)  # 16 tokens attend to 16
    decoder = 8 * (proj + 2 * 2 * 2 * 16 * 8 + 2 * 32 * 16 * 4 + 2 * 2 * 2 * 16 * 16 + ffn)
    decoder += 16 * 2 * 32 * 16 * 4  # cross-attention k/v of the 16 encoder outputs
    logits = 8 * 2 * 32 * 128
    assert result["model_flops"] == 3 * 2 * (encoder + decoder + logits) == 4_276_224
    assert result["tokens_per_s"] == pytest.approx(2 * 24 / result["step_s"])
    assert math.isfinite(result["last_loss"]) and result["compile_s"] > 0
    assert result["xla_flops"] is None or result["xla_flops"] > 0
    assert result["mfu"] is None  # CPU without the measured peak


def test_matmul_peak_small():
    from matmul_peak import matmul_peak

    r = matmul_peak("float32", sizes=(32, 64), repeats=1)
    assert r["best_size"] in (32, 64) and r["flops_per_sec"] > 0


def test_vs_transformers_train_and_decode_one_step():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vs_transformers import compare_decode, compare_train

    quiet = lambda *a, **k: None  # noqa: E731
    train = compare_train(TINY, batch_size=2, inputs_length=16, targets_length=8, steps=1,
                          warmup=0, threads=1, mesh=_single_mesh(), log=quiet)
    assert train["ratio"] == pytest.approx(train["transformers_step_s"] / train["t5lite_step_s"])
    dec = compare_decode(TINY, batch_size=2, input_len=12, new_tokens=4, repeats=1, threads=1,
                         log=quiet)
    assert dec["new_tokens"] == [4, 4]  # EOS disabled on both sides
    # same weights, float32: greedy tokens agree (both cross-attention forms)
    assert dec["token_agreement"] == 1.0 and dec["cross_attention"] == "absorbed"  # CPU auto
    kv = compare_decode(TINY, batch_size=2, input_len=12, new_tokens=4, repeats=1, threads=1,
                        cross_attention="kv", log=quiet)
    assert kv["token_agreement"] == 1.0 and kv["cross_attention"] == "kv"
    assert len(dec["t5lite_encoder_times_s"]) == len(dec["transformers_encoder_times_s"]) == 5
    assert dec["t5lite_encoder_s"] > 0 and dec["transformers_encoder_s"] > 0
    both_bf16 = compare_decode(TINY.replace(dtype="bfloat16"), batch_size=2, input_len=12,
                               new_tokens=4, repeats=1, threads=1, transformers_dtype="bfloat16",
                               log=quiet)
    assert both_bf16["new_tokens"] == [4, 4]


def test_vs_transformers_train_with_transformers_in_its_own_process(monkeypatch):
    """--transformers_process=separate: transformers' steps run in a worker process, which gets
    the allocator environment the benchmark was started with, not t5lite's re-exec choice."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_reference import HFTrainStepProcess, random_batch
    from vs_transformers import compare_train

    from t5lite import host_malloc

    # as after a re-exec that added glibc's huge pages to an environment without the tunable
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    monkeypatch.setenv(host_malloc.CHOSEN, "hugepages")
    monkeypatch.setenv(host_malloc.STARTED_WITH, json.dumps(
        {"LD_PRELOAD": None, "GLIBC_TUNABLES": None, "MALLOC_CONF": None}))
    quiet = lambda *a, **k: None  # noqa: E731
    train = compare_train(TINY, batch_size=2, inputs_length=16, targets_length=8, steps=2,
                          warmup=1, threads=1, mesh=_single_mesh(), log=quiet,
                          transformers_process="separate")
    assert train["transformers_process"] == "separate"
    assert len(train["transformers_step_times_s"]) == 2
    assert all(t > 0 for t in train["transformers_step_times_s"])
    assert train["transformers_allocator_env"]["GLIBC_TUNABLES"] == ""
    assert train["transformers_params"] > 0

    worker = HFTrainStepProcess(TINY, random_batch(2, 16, 8, TINY.vocab_size), threads=1)
    try:
        assert worker.worker_pid != os.getpid()
        assert worker.worker_env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"  # env inherited
        assert len(worker.time(1)) == 1
    finally:
        worker.close()
    assert worker.proc.returncode == 0
    # a model transformers cannot build fails in the worker: one clear error here
    with pytest.raises(RuntimeError, match="worker exited"):
        HFTrainStepProcess(TINY.replace(position_scheme="rope"),
                           random_batch(2, 16, 8, TINY.vocab_size), threads=1)


def test_cross_attention_ab_times_both_forms():
    """The A/B bench decodes with both cross-attention forms; in float32 they agree."""
    from cross_attention_ab import compare_forms

    for decode in ("greedy", "beam"):
        res = compare_forms(TINY, batch_size=2, input_len=12, new_tokens=3, repeats=1,
                            decode=decode, beam_size=2, log=lambda *a: None)
        for n in (1, 3):
            entry = res[f"tokens_{n}"]
            assert entry["token_agreement"] == 1.0
            assert entry["speedup"] == pytest.approx(entry["kv_s"] / entry["absorbed_s"])
        assert set(res) >= {"kv_step_ms", "absorbed_step_ms"}
    int8 = compare_forms(TINY, batch_size=2, input_len=12, new_tokens=3, repeats=1,
                         quantize="int8", log=lambda *a: None)
    assert int8["quantize"] == "int8" and int8["tokens_3"]["token_agreement"] > 0


def test_decode_profile_splits_the_loop_by_op():
    """The traced loop's ops are grouped by what they compute; the output layer's dot and the
    token choice are in the loop, the encoder's ops are not."""
    pytest.importorskip("tensorflow.tsl.profiler.protobuf.xplane_pb2")
    from decode_profile import profile

    res = profile(TINY, batch_size=2, input_len=12, new_tokens=4, repeats=1, log=lambda *a: None)
    ops = {row["op"]: row for row in res["ops"]}
    assert res["op_events_per_step"] > 0 and res["traced_step_wall_ms"] > 0
    assert res["op_ms_per_step"] == pytest.approx(sum(r["ms_per_step"] for r in res["ops"]))
    assert any("dot_general f32[2,128]" in op for op in ops), sorted(ops)  # the logits
    # the encoder (12 positions x 2 rows) runs before the loop: none of its ops is counted
    assert not any("[2,12,32]" in op or "[24,32]" in op for op in ops), sorted(ops)
    assert set(res["request_s"]) == {"1", "4"}


def test_hlo_labels_name_what_each_instruction_computes(tmp_path):
    from profile_summary import hlo_labels

    hlo = """HloModule jit__run

%fused_computation.3 (param_0: bf16[8,512], param_1: bf16[512,64]) -> f32[8,64] {
  %param_0 = bf16[8,512]{1,0} parameter(0)
  %param_1 = bf16[512,64]{1,0} parameter(1)
  %convert.1 = f32[8,512]{1,0} convert(%param_0)
  ROOT %dot.2 = f32[8,64]{1,0} dot(%convert.1, %param_1), lhs_contracting_dims={1}
}

ENTRY %main.9 (p0: bf16[8,512], p1: bf16[512,64]) -> f32[8,64] {
  %p0 = bf16[8,512]{1,0} parameter(0)
  %p1 = bf16[512,64]{1,0} parameter(1)
  ROOT %ynn_fusion.3 = f32[8,64]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation.3, metadata={op_name="jit(_run)/while/body/closed_call/dot_general" stack_frame_id=3}
}
"""
    labels = hlo_labels(hlo)
    assert labels["ynn_fusion.3"] == "dot_general f32[8,64] [convert,dot]"
    assert labels["convert.1"] == "convert f32[8,512]"  # no metadata: the opcode

    # summarize --hlo: the program's ops by label, executor events left out
    xplane_pb2 = pytest.importorskip("tensorflow.tsl.profiler.protobuf.xplane_pb2")
    from profile_summary import main, summarize

    space = xplane_pb2.XSpace()
    host = space.planes.add(name="/host:CPU")
    host.event_metadata[1].name = "ynn_fusion.3"
    host.event_metadata[2].name = "ThunkExecutor::Execute"
    line = host.lines.add(name="tf_XLAEigen/1")
    line.events.add(metadata_id=1, duration_ps=2_000_000_000)
    line.events.add(metadata_id=2, duration_ps=5_000_000_000)
    trace = tmp_path / "vm.xplane.pb"
    trace.write_bytes(space.SerializeToString())
    text = summarize(str(trace), steps=1, top=5, hlo_text=hlo)
    section = text.split("-- what the ops compute")[1]
    assert "2.000  100.0%      1.0  dot_general f32[8,64] [convert,dot]" in section
    assert "ThunkExecutor" not in section
    with pytest.raises(SystemExit, match="--hlo=.* is not a file"):
        main([str(trace), f"--hlo={tmp_path / 'missing.txt'}"])


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu.sh")], check=True)


def test_profile_summary_reads_a_real_trace(tmp_path):
    """A jax.profiler trace of the tiny train step is summarised per line kind and op."""
    pytest.importorskip("tensorflow.tsl.profiler.protobuf.xplane_pb2")
    from profile_summary import kernel_family, summarize
    from train_step import run

    run(TINY, batch_size=2, inputs_length=16, targets_length=8, steps=1, warmup=0,
        measure_peak=False, mesh=_single_mesh(), profile_dir=str(tmp_path), log=lambda *a: None)
    text = summarize(str(tmp_path), steps=2, top=5)
    assert "== /host:CPU: busy time per line kind" in text
    assert "-- top ops on" in text and "-- kernel families on" in text
    assert kernel_family("loop_add_fusion_12") == "loop_add_fusion"
    assert kernel_family("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT") == "gemm (library)"
    assert kernel_family("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == \
        "cudnn flash attention"
    with pytest.raises(SystemExit, match="no \\*.xplane.pb"):
        summarize(str(tmp_path / "empty"))


def test_profile_summary_skips_empty_device_planes(tmp_path):
    """With libtpu loaded, a CPU trace also holds an empty `/device:CUSTOM:Megascale Trace` plane;
    the summary must still read the host plane (the empty plane once hid it)."""
    xplane_pb2 = pytest.importorskip("tensorflow.tsl.profiler.protobuf.xplane_pb2")
    from profile_summary import planes_to_summarize, summarize

    space = xplane_pb2.XSpace()
    space.planes.add(name="/host:metadata")
    space.planes.add(name="/device:CUSTOM:Megascale Trace")
    host = space.planes.add(name="/host:CPU")
    host.event_metadata[1].name = "dot_fusion"
    line = host.lines.add(name="tf_XLAEigen/123")
    line.events.add(metadata_id=1, duration_ps=3_000_000_000)
    path = tmp_path / "vm.xplane.pb"
    path.write_bytes(space.SerializeToString())
    assert [p.name for p in planes_to_summarize(space)] == ["/host:CPU"]
    text = summarize(str(path), steps=1, top=5)
    assert "== /host:CPU: busy time per line kind" in text
    assert "3.000  100.0%      1.0  dot_fusion" in text
    # a device plane with events wins over the host plane
    device = space.planes.add(name="/device:GPU:0")
    device.event_metadata[1].name = "gemm"
    device.lines.add(name="Stream #13").events.add(metadata_id=1, duration_ps=10)
    assert [p.name for p in planes_to_summarize(space)] == ["/device:GPU:0"]
    # nothing recorded anywhere: said, not silently blank
    empty = xplane_pb2.XSpace()
    empty.planes.add(name="/device:CUSTOM:Megascale Trace")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "vm.xplane.pb").write_bytes(empty.SerializeToString())
    assert "no plane in this trace recorded any event" in summarize(str(tmp_path / "e"))


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """DRY_RUN=1 runs the whole script (smoke test, train, decode) on CPU with tiny models."""
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none"),
           "RUNS": "train:gin/models/t5_1_1/tiny.gin:2:einsum:none:adamw "
                   "train:gin/models/t5_1_1/tiny.gin:2:einsum:save_projections:"
                   "sharedbias,castonce,vocabchunk,unroll2 "
                   "decode:gin/models/t5_1_1/tiny.gin:2"}
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "train_t5_1_1_tiny_b2_einsum_remat-none_adamw: step " in summary
    assert ("train_t5_1_1_tiny_b2_einsum_remat-save_projections_sharedbias_castonce_"
            "vocabchunk_unroll2: step ") in summary
    assert "decode_t5_1_1_tiny_b2: decode t5lite" in summary
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3
    options = records[1]["model"]
    assert (options["remat_policy"], options["scan_unroll"], options["shared_relative_bias"],
            options["cast_params_once"], records[1]["loss_vocab_chunk"]) == (
        "save_projections", 2, True, True, 4096)


def test_gpu_gin_gives_bf16_cudnn_config():
    from train_step import model_config_from_gin

    cfg = model_config_from_gin(["gin/models/t5_1_1/large.gin", "gin/runs/gpu.gin"])
    assert (cfg.dtype, cfg.attention_impl, cfg.d_model) == ("bfloat16", "cudnn", 1024)


def test_plain_jax_t5_matches_t5lite_size_and_trains():
    """The plain reference model has exactly t5lite's parameter count and its step learns."""
    import jax
    import jax.numpy as jnp
    from plain_jax_t5 import init_params, make_plain_step
    from train_step import synthetic_batch

    from t5lite.models import param_count

    cfg = TINY.replace(num_encoder_layers=2, num_decoder_layers=2)
    params = init_params(cfg, jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == param_count(cfg)
    host = synthetic_batch(2, 16, 8, cfg.vocab_size)
    batch = [jnp.asarray(host[k]) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                            "decoder_target_tokens")]
    step = make_plain_step(cfg, learning_rate=0.5)
    losses = []
    for _ in range(5):
        params, loss = step(params, *batch)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_step_hlo_bytes_sees_each_option_in_the_compiled_step(tmp_path):
    """benchmarks/step_hlo_bytes.py on the tiny model: each cumulative option shrinks the
    buffers it is about (bias, stacked kernels, logits, stacked residuals)."""
    from step_hlo_bytes import main

    out = tmp_path / "hlo.json"
    rows = main(["--gin_file=gin/models/t5_1_1/tiny.gin", "--batch_size=4",
                 "--inputs_length=32", "--targets_length=8", f"--out={out}"])
    base, shared, cast, chunk, proj = rows
    assert [r["variant"] for r in rows] == ["baseline", "shared_bias", "cast_once",
                                            "vocab_chunk", "save_projections"]
    assert 0 < shared["bias_largest_bytes"] * 4 == base["bias_largest_bytes"]  # [1,...] vs [4,...]
    assert cast["layer_param_bytes"] < shared["layer_param_bytes"]
    assert base["logits_bytes"] >= 4 * 8 * 32128 * 4 and chunk["logits_bytes"] == 0
    assert 0 < proj["residual_bytes"] < chunk["residual_bytes"]
    assert json.loads(out.read_text())["rows"][0]["temp_bytes"] == base["temp_bytes"] > 0


def test_allocator_ab_environment_and_bad_input(tmp_path):
    from allocator_ab import allocator_env

    jemalloc = allocator_env("/opt/lib/libjemalloc.so.2", "dirty_decay_ms:-1")
    assert jemalloc["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2"
    assert jemalloc["MALLOC_CONF"] == "dirty_decay_ms:-1"
    tcmalloc = allocator_env("/opt/lib/libtcmalloc.so.4", "dirty_decay_ms:-1")
    assert "MALLOC_CONF" not in tcmalloc or tcmalloc["MALLOC_CONF"] == os.environ.get(
        "MALLOC_CONF")
    assert "LD_PRELOAD" not in allocator_env(None, "")
    for env in (jemalloc, allocator_env(None, "")):  # neither re-execs with huge pages
        assert env["T5LITE_MALLOC"] == "system" and "GLIBC_TUNABLES" not in env
    hugepages = allocator_env(None, "", tunables={"glibc.malloc.hugetlb": "1"})
    assert hugepages["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "LD_PRELOAD" not in hugepages
    retain = allocator_env(None, "", tunables={"glibc.malloc.mmap_max": "0",
                                               "glibc.malloc.arena_max": "1"})
    assert retain["GLIBC_TUNABLES"] == "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1"
    script = os.path.join(ROOT, "benchmarks", "allocator_ab.py")
    for bad in (["--preload", str(tmp_path / "missing.so")], ["--rounds=0"]):
        proc = subprocess.run([sys.executable, script, *bad, "--out", str(tmp_path / "o.json")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o.json").exists()


def test_allocator_ab_runs_train_step_per_allocator(tmp_path):
    """The plumbing for real, with the C library itself as the 'preloaded allocator' (present
    everywhere): two tiny train_step processes, each with its own resource use."""
    from allocator_ab import main

    libc = next((p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/libc.so.6",
                             "/lib64/libc.so.6") if os.path.isfile(p)), None)
    if libc is None:
        pytest.skip("no libc.so.6 at a known path")
    out = tmp_path / "ab.json"
    result = main([f"--preload={libc}", "--rounds=1", f"--out={out}",
                   f"--step_args=--gin_file={ROOT}/gin/models/t5_1_1/small.gin --batch_size=8 "
                   "--inputs_length=16 --targets_length=8 --steps=1 --warmup=0 "
                   "--gin=ModelConfig.num_encoder_layers=1 --gin=ModelConfig.num_decoder_layers=1"])
    assert json.loads(out.read_text())["speedup"] == pytest.approx(result["speedup"])
    names = {"default", "hugepages", "retain", "preloaded"}
    if native.c_compiler() is not None:  # t5lite's block cache builds here
        names.add("blockcache")
    assert set(result["speedup"]) == names
    for name in names:
        run = result["runs"][name][0]
        assert run["step_s"] > 0 and run["minor_faults"] > 0 and run["max_rss_mib"] > 10


def test_attention_benchmark_names_unknown_cores():
    from attention_impl import main

    with pytest.raises(SystemExit, match="unknown core\\(s\\) flash; use some of blocked, "
                                         "einsum, xla"):
        main(["--cores=blocked,flash"])


def test_attention_benchmark_times_the_torch_reference(tmp_path):
    pytest.importorskip("torch")
    from attention_impl import main

    out = tmp_path / "attention.json"
    main(["--cores=torch_sdpa", "--repeats=1", f"--out={out}"])
    rows = json.loads(out.read_text())["results"]
    assert [(r["dtype"], r["core"]) for r in rows] == [("float32", "torch_sdpa"),
                                                       ("bfloat16", "torch_sdpa")]
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > r["forward_s"] for r in rows)


def test_compile_cache_benchmark_compiles_cold_and_loads_warm(tmp_path, monkeypatch):
    import compile_cache as bench

    assert bench.variant_bindings("unrolled") == ["ModelConfig.scan_layers=False"]
    assert bench.variant_bindings("unroll3") == ["ModelConfig.scan_unroll=3"]
    with pytest.raises(ValueError, match="unknown variant"):
        bench.variant_bindings("unrolld")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    out = tmp_path / "cc.json"
    result = bench.main(["--model=t5_1_1_tiny", "--variants=unrolled", "--batch_size=8",
                         "--inputs_length=16", "--targets_length=8", "--steps=1",
                         f"--out={out}"])
    cold, warm = result["rows"]["unrolled"]["cold"], result["rows"]["unrolled"]["warm"]
    assert cold["loaded"] == 0 and cold["compiled"] >= 1
    assert warm["loaded"] >= 1 and warm["compiled"] == 0
    assert cold["loss"] == warm["loss"] and math.isfinite(cold["loss"])
    assert json.loads(out.read_text())["machine"]["cpu_model"]


def test_attention_module_ab_compares_against_a_git_revision():
    """The 'before' module comes from git (HEAD here) and computes the same attention."""
    from attention_module_ab import compare, module_at

    from t5lite.models.blocked_attention import blocked_attention_core

    old = module_at("HEAD").blocked_attention_core
    for backward in (False, True):
        result = compare(old, blocked_attention_core, batch=2, length=8, heads=2, head_dim=4,
                         repeats=2, backward=backward)
        for name in ("float32", "bfloat16"):
            r = result[name]
            assert len(r["before_times_s"]) == len(r["after_times_s"]) == 2
            assert r["before_s"] > 0 and r["after_s"] > 0
            assert r["max_abs_diff"] < (1e-5 if name == "float32" else 5e-2)


def test_cpu_description_names_family_model_and_best_matmul_isa():
    """A masked VM model name still says which CPU kind and matmul instructions a figure had."""
    from cpu_info import cpu_model, describe_cpu

    amd = ("processor : 0\nmodel name : AMD EPYC\ncpu family : 26\nmodel : 2\n"
           "flags : fpu avx2 avx512f avx512_bf16\n\nprocessor : 1\nmodel name : other\n")
    assert describe_cpu(amd) == "AMD EPYC (family 26, model 2; avx512_bf16)"
    intel = ("model name : Intel(R) Xeon(R) Platinum\ncpu family : 6\nmodel : 143\n"
             "flags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert describe_cpu(intel) == "Intel(R) Xeon(R) Platinum (family 6, model 143; amx_bf16)"
    assert describe_cpu("model name : Some CPU\nflags : sse2\n") == "Some CPU"
    assert describe_cpu("flags : avx2\n") == ""
    assert cpu_model()  # this machine's, whatever it is
