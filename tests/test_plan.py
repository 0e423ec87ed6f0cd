"""`t5lite plan`: topologies, HLO collective accounting, searches, the CPU exactness check, a
real TPU compile (v5e:2x2, needs libtpu: the `test` extra installs it) and the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from t5lite.config import ModelConfig
from t5lite.errors import UserError
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.plan import hlo, search, topologies
from t5lite.plan.train import parse_hbm_oom, plan_train
from t5lite.train.config import TrainConfig
from t5lite.train.setup import make_setup

TINY = ModelConfig(d_model=64, num_heads=4, head_dim=16, d_ff=128, num_encoder_layers=2,
                   num_decoder_layers=2, vocab_size=512)
LENGTHS = {"encoder_input_tokens": 32, "decoder_target_tokens": 16, "decoder_input_tokens": 16,
           "decoder_loss_weights": 16, "encoder_segment_ids": 32, "decoder_segment_ids": 16,
           "encoder_positions": 32, "decoder_positions": 16}
TINY_GIN = """include "gin/runs/pretrain.gin"
ModelConfig.d_model = 64
ModelConfig.num_heads = 4
ModelConfig.head_dim = 16
ModelConfig.d_ff = 128
ModelConfig.num_encoder_layers = 2
ModelConfig.num_decoder_layers = 2
ModelConfig.vocab_size = 512
TASK_FEATURE_LENGTHS = {"inputs": 32, "targets": 16}
BATCH_SIZE = 16
"""
HAVE_LIBTPU = topologies.libtpu_available()
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU and not os.environ.get("CI"),
    reason="libtpu not installed (pip install -e '.[test]' brings it; required in CI)")


# ---------------------------------------------------------------- topologies
@pytest.mark.parametrize("name,gen,chips,grid", [
    ("v4-256", "v4", 128, "v4:4x4x8"), ("v5p-256", "v5p", 128, "v5p:4x4x8"),
    ("v5e-256", "v5e", 256, "v5e:16x16"), ("v6e-64", "v6e", 64, "v6e:8x8"),
    ("v5e:2x2", "v5e", 4, "v5e:2x2"), ("v4:4x4x8", "v4", 128, "v4:4x4x8"),
    ("cpu:8", "cpu", 8, "cpu:8")])
def test_parse_topology(name, gen, chips, grid):
    t = topologies.parse_topology(name)
    assert (t.generation, t.chips, t.topology_name) == (gen, chips, grid)
    gib = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32, "cpu": None}[gen]
    assert t.hbm_bytes == (None if gib is None else gib * 2**30)


@pytest.mark.parametrize("name", ["v7-8", "v4-3", "v5e-12", "tpu", "v5e:2x2x2", "cpu:0"])
def test_unknown_topology_lists_known(name):
    with pytest.raises(UserError, match="known: v4-"):
        topologies.parse_topology(name)


# ---------------------------------------------------------------- HLO accounting
HLO = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %ag = f32[32,4]{1,0} all-gather(f32[8,4]{1,0} %x), channel_id=1, dimensions={0}
  %rs = f32[8,4]{1,0} reduce-scatter(f32[32,4]{1,0} %ag), channel_id=2, dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(s32[] %i, f32[8,4]{1,0} %rs)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %a = f32[8,4]{1,0} parameter(0)
  %w = (s32[], f32[8,4]{1,0}) while((s32[], f32[8,4]{1,0}) %t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %ar = bf16[16]{0} all-reduce-start(bf16[16]{0} %y), channel_id=3, to_apply=%add
  %ard = bf16[16]{0} all-reduce-done(bf16[16]{0} %ar)
  ROOT %r = f32[8,4]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_counts_loop_trips_and_async_once():
    got = hlo.collective_bytes(HLO)
    assert got["all-gather"] == 6 * 32 * 4 * 4  # gathered result, 6 loop iterations
    assert got["reduce-scatter"] == 6 * 32 * 4 * 4  # full input
    assert got["all-reduce"] == 16 * 2  # -start counted, -done not
    assert got["all-to-all"] == 0


# The TPU compiler's forms: async collectives as start/done fusions holding copies of the op
# (same channel), reduce-scatter as an `all-reduce-scatter` fusion, loops without trip counts.
TPU_HLO = """HloModule m

%fused_start (param_0: bf16[64,256]) -> bf16[256,256] {
  %param_0 = bf16[64,256]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %all-gather.1 = bf16[256,256]{1,0:T(8,128)(2,1)} all-gather(%param_0), channel_id=7, dimensions={0}
}

%fused_done (param_0.1: bf16[64,256]) -> bf16[256,256] {
  %param_0.1 = bf16[64,256]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[256,256]{1,0} all-gather(%param_0.1), channel_id=7, dimensions={0}
}

%all-reduce-scatter.3.clone (input_0: f32[256,256]) -> f32[64,256] {
  %input_0 = f32[256,256]{1,0} parameter(0)
  %all-reduce.9 = (f32[256,256]{1,0:T(8,128)}) all-reduce(%input_0), channel_id=8, to_apply=%add
  ROOT %ds = f32[64,256]{1,0} dynamic-slice(%all-reduce.9, %c, %c), dynamic_slice_sizes={64,256}
}

%body (p: (s32[], bf16[64,256])) -> (s32[], bf16[64,256]) {
  %p = (s32[], bf16[64,256]) parameter(0)
  %async-collective-start = bf16[256,256]{1,0} fusion(%x), kind=kCustom, calls=%fused_start
  %async-collective-done = bf16[256,256]{1,0} fusion(%x), kind=kCustom, calls=%fused_done
  %fusion.4 = f32[64,256]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.3.clone
  ROOT %t = (s32[], bf16[64,256]) tuple(%i, %x)
}

%cond (p.1: (s32[], bf16[64,256])) -> pred[] {
  %constant.5 = s32[]{:T(128)} constant(24)
  %p.1 = (s32[], bf16[64,256]) parameter(0)
  %gte = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%gte, %constant.5), direction=LT
}

ENTRY %main.1_spmd (a: bf16[64,256]) -> bf16[64,256] {
  %a = bf16[64,256]{1,0} parameter(0)
  %w = (s32[], bf16[64,256]) while(%t0), condition=%cond, body=%body, metadata={op_name="while"}
  ROOT %r = bf16[64,256]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_tpu_forms():
    got = hlo.collective_bytes(TPU_HLO)
    assert got["all-gather"] == 24 * 256 * 256 * 2  # one channel, 24 iterations
    assert got["reduce-scatter"] == 24 * 256 * 256 * 4  # the fusion's full input
    assert got["all-reduce"] == 0  # the all-reduce inside the reduce-scatter is not extra


# The TPU compiler's all-gather by all-reduce: shards written into zero buffers
# (dynamic-update-slice, directly or as a fusion's root) and summed; a tuple all-reduce may mix
# such gathers with true reductions (here a gradient of f32[4096]).
GATHER_BY_ALL_REDUCE_HLO = """HloModule m

%fused_dus (param_0.1: f32[1,64,256], param_1.1: f32[1,8,256], param_2.1: u32[]) -> f32[1,64,256] {
  %param_0.1 = f32[1,64,256]{1,2,0:T(8,128)} parameter(0)
  %param_1.1 = f32[1,8,256]{1,2,0:T(8,128)} parameter(1)
  %constant.9 = u32[]{:T(128)} constant(0)
  %param_2.1 = u32[]{:T(128)S(6)} parameter(2)
  ROOT %dynamic-update-slice.3 = f32[1,64,256]{1,2,0:T(8,128)} dynamic-update-slice(%param_0.1, %param_1.1, %constant.9, %param_2.1, %constant.9)
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

ENTRY %main.2_spmd (w: f32[8,256], v: f32[1,8,256], g: f32[4096], i: u32[]) -> f32[64,256] {
  %w = f32[8,256]{1,0} parameter(0)
  %v = f32[1,8,256]{1,2,0} parameter(1)
  %g = f32[4096]{0:T(1024)} parameter(2)
  %i = u32[] parameter(3)
  %constant.1 = f32[]{:T(128)} constant(0)
  %broadcast.1 = f32[64,256]{1,0:T(8,128)S(3)} broadcast(%constant.1), dimensions={}
  %broadcast.2 = f32[1,64,256]{1,2,0:T(8,128)} broadcast(%constant.1), dimensions={}
  %dynamic-update-slice.1 = f32[64,256]{1,0:T(8,128)S(3)} dynamic-update-slice(%broadcast.1, %w, %i, %i)
  %fusion.7 = f32[1,64,256]{1,2,0:T(8,128)} fusion(%broadcast.2, %v, %i), kind=kLoop, calls=%fused_dus
  %all-reduce.1 = (bf16[64,256]{1,0:T(8,128)(2,1)}, f32[4096]{0:T(1024)}, f32[1,64,256]{1,2,0}) all-reduce(%dynamic-update-slice.1, %g, %fusion.7), channel_id=5, replica_groups=[1,8]<=[8], to_apply=%add
  %all-reduce.2 = f32[4096]{0:T(1024)} all-reduce(%g), channel_id=6, replica_groups=[1,8]<=[8], to_apply=%add
  ROOT %r = f32[64,256]{1,0} get-tuple-element(%all-reduce.1), index=0
}
"""


def test_collective_bytes_gathers_written_as_all_reduce():
    got = hlo.collective_bytes(GATHER_BY_ALL_REDUCE_HLO)
    assert got["all-gather"] == 64 * 256 * 2 + 64 * 256 * 4  # bf16 direct + f32 via fusion
    assert got["all-reduce"] == 4096 * 4 * 2  # the gradient in the tuple + the plain one


def test_parse_hbm_oom():
    got = parse_hbm_oom("Ran out of memory in memory space hbm. Used 45.20G of 31.25G hbm.")
    assert got == {"used": int(45.2 * 2**30), "capacity": int(31.25 * 2**30)}
    got = parse_hbm_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                        "for HLO temporaries (95.04G) exceeds available HBM (30.75G).")
    assert got == {"temp": int(95.04 * 2**30), "capacity": int(30.75 * 2**30)}
    assert parse_hbm_oom("some other error") is None


# ---------------------------------------------------------------- searches
@pytest.mark.parametrize("limit", [0, 8, 40, 1000, 5000])
def test_largest_fitting_batch(limit):
    best, compiles = search.largest_fitting_batch(lambda b: b <= limit, start=16, unit=8,
                                                  limit=4096)
    expected = min(limit, 4096) // 8 * 8 or None
    assert best == expected and compiles <= 2 * 10


@pytest.mark.parametrize("k", range(len(search.REMAT_ORDER) + 1))
def test_cheapest_fitting_remat(k):
    order = search.REMAT_ORDER
    best, compiles = search.cheapest_fitting_remat(lambda p: order.index(p) >= k)
    assert best == (order[k] if k < len(order) else None) and compiles <= 4


# ---------------------------------------------------------------- exactness on 8 CPU devices
def _device_bytes(tree, device) -> int:
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
               if s.device == device)


@pytest.mark.parametrize("recipe,mesh_config,optimizer", [
    ("fsdp", MeshConfig(data=1, fsdp=8), "adafactor"),
    ("fsdp_tp", MeshConfig(data=1, fsdp=4, tensor=2), "adamw"),
    pytest.param("dp", MeshConfig(data=8), "adafactor", marks=pytest.mark.slow),
])
def test_cpu_plan_bytes_equal_real_born_sharded_state(recipe, mesh_config, optimizer):
    from t5lite.train.optim import OptimizerConfig

    tc = TrainConfig(batch_size=16, partitioning=recipe,
                     optimizer=OptimizerConfig(name=optimizer))
    topo = topologies.parse_topology("cpu:8")
    devices = topologies.target_devices(topo)
    plan = plan_train(TINY, tc, mesh_config, LENGTHS, topo, devices, hbm_bytes=2**30)
    setup = make_setup(TINY, tc, make_mesh(mesh_config, devices=devices))
    state = setup.fresh_state()
    params = max(_device_bytes(state.params, d) for d in devices)
    opt = max(_device_bytes(state.opt_state, d) for d in devices)
    assert plan.per_device["params_bytes"] == params
    assert plan.per_device["optimizer_bytes"] == opt
    assert plan.approximate and plan.fits and plan.per_device["peak_bytes"] > params + opt
    if recipe != "dp":
        assert params < sum(x.nbytes for x in jax.tree.leaves(state.params))


def test_plan_skips_the_compile_when_the_state_alone_exceeds_hbm():
    tc = TrainConfig(batch_size=16, partitioning="fsdp")
    topo = topologies.parse_topology("cpu:8")
    devices = topologies.target_devices(topo)
    mesh_config = MeshConfig(data=1, fsdp=8)
    held_setup = make_setup(TINY, tc, make_mesh(mesh_config, devices=devices), compile_only=True)
    state = held_setup.abstract_state
    from t5lite.plan.train import sharded_bytes

    held = sharded_bytes(state.params) + sharded_bytes(state.opt_state)
    plan = plan_train(TINY, tc, mesh_config, LENGTHS, topo, devices, hbm_bytes=held,
                      skip_if_arguments_exceed_hbm=True)  # + the batch: over by its bytes
    assert plan.fits is False and plan.compile_seconds == 0 and "not compiled" in plan.note
    assert plan.per_device["peak_bytes"] == held + plan.per_device["batch_bytes"]
    assert plan.per_device["temp_bytes"] is None and plan.collective_bytes == {}


def test_verdict_uses_usable_hbm_not_nominal():
    """A state that fits the nominal HBM but not the usable part of it does not fit."""
    tc = TrainConfig(batch_size=16, partitioning="fsdp")
    topo = topologies.parse_topology("cpu:8")
    devices = topologies.target_devices(topo)
    mesh_config = MeshConfig(data=1, fsdp=8)
    state = make_setup(TINY, tc, make_mesh(mesh_config, devices=devices),
                       compile_only=True).abstract_state
    from t5lite.plan.train import sharded_bytes

    held = sharded_bytes(state.params) + sharded_bytes(state.opt_state)
    plan = plan_train(TINY, tc, mesh_config, LENGTHS, topo, devices, hbm_bytes=2 * held,
                      skip_if_arguments_exceed_hbm=True, usable_hbm_bytes=held,
                      usable_hbm_source="test")
    d = plan.per_device
    assert d["hbm_bytes"] == 2 * held and d["usable_hbm_bytes"] == held
    assert plan.fits is False and d["peak_bytes"] > held
    assert plan.headroom_bytes == held - d["peak_bytes"] < 0
    assert plan.usable_hbm_source == "test"


class _FakeDevice:
    platform, device_kind = "tpu", "TPU fake"


def test_usable_hbm_falls_back_to_measured_figures(monkeypatch):
    from t5lite.plan import hbm

    monkeypatch.setattr(hbm, "_PROBED", {})
    monkeypatch.setattr(hbm, "probe_message", lambda device: "INTERNAL: something else")
    usable, source = hbm.usable_hbm_bytes("v4", [_FakeDevice()])
    assert usable == int(30.75 * 2**30) and "probe failed here: INTERNAL" in source
    monkeypatch.setattr(hbm, "_PROBED", {})
    monkeypatch.setattr(hbm, "probe_message", lambda device: (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (512.00G) exceeds available HBM (15.50G)."))
    usable, source = hbm.usable_hbm_bytes("v5e", [_FakeDevice()])
    assert usable == int(15.5 * 2**30) and "probe compile" in source


@needs_libtpu
@pytest.mark.parametrize("grid,nominal_gib,usable_gib", [
    ("v4:2x2x1", 32, 30.75), ("v5e:2x2", 16, 15.75)])
def test_usable_hbm_probed_from_the_tpu_compiler(grid, nominal_gib, usable_gib):
    """The compiler's own refusal says how much of a chip one program may use (libtpu 0.0.42,
    which jax 0.10.2 pins: v4 30.75 of 32 GiB, v5e 15.75 of 16 GiB)."""
    from t5lite.plan import hbm

    topo = topologies.parse_topology(grid)
    devices = topologies.target_devices(topo)
    usable, source = hbm.usable_hbm_bytes(topo.generation, devices)
    assert "probe compile" in source and topo.hbm_bytes == nominal_gib * 2**30
    assert 0.9 * topo.hbm_bytes < usable < topo.hbm_bytes
    assert abs(usable - usable_gib * 2**30) < 0.01 * 2**30


# ---------------------------------------------------------------- the command
def _plan(repo_root, tmp_path, *args, env_extra=None, python_prefix=None):
    gin = tmp_path / "tiny.gin"
    gin.write_text(TINY_GIN)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-c", (python_prefix or "") +
           "import sys; from t5lite.cli import main; main(['t5lite', 'plan'] + sys.argv[1:])",
           f"--gin_file={gin}", *args]
    return subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=900)


def test_cli_cpu_json_and_decode(repo_root, tmp_path):
    out = _plan(repo_root, tmp_path, "--topology=cpu:4", "--partitioning=fsdp", "--format=json",
                "--hbm_gib=1", f"--save_hlo={tmp_path / 'hlo'}")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    import gzip

    saved = tmp_path / "hlo" / "cpu-4_fsdp_fsdp4_train.hlo.txt.gz"
    with gzip.open(saved, "rt") as f:  # the compiled module, from which the JSON's bytes came
        assert hlo.collective_bytes(f.read()) == row["collective_bytes"]
    for key in ("topology", "num_devices", "partitioning", "mesh", "per_device", "fits",
                "model_flops_per_step", "compile_seconds"):
        assert key in row
    for key in ("params_bytes", "optimizer_bytes", "argument_bytes", "output_bytes",
                "temp_bytes", "peak_bytes", "hbm_bytes"):
        assert key in row["per_device"]
    assert row["num_devices"] == 4 and row["mesh"]["fsdp"] == 4 and row["approximate"]
    assert row["fits"] is True and row["per_device"]["hbm_bytes"] == 2**30
    assert row["per_device"]["usable_hbm_bytes"] == 2**30
    assert row["usable_hbm_source"] == "--hbm_gib"
    out = _plan(repo_root, tmp_path, "--topology=cpu:2", "--mode=decode", "--decode_batch=4",
                "--partitioning=dp_tp")
    assert out.returncode == 0, out.stderr
    assert "decode step on cpu:2" in out.stdout and "decoding caches" in out.stdout
    assert "APPROXIMATE" in out.stdout and "pass --hbm_gib" in out.stdout


def test_cli_search_batch_size_cpu(repo_root, tmp_path):
    out = _plan(repo_root, tmp_path, "--topology=cpu:2", "--partitioning=dp",
                "--search=batch_size", "--hbm_gib=0.02")
    assert out.returncode == 0, out.stderr
    assert "search batch_size: largest global batch that fits:" in out.stdout
    assert "compiles)" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--topology=v9-8"], "unknown topology 'v9-8'"),
    (["--topology=cpu:8", "--gin.MeshConfig.tensor=3"], "does not divide 8 devices"),
    (["--topology=cpu:8", "--gin.BATCH_SIZE=12"], "not divisible"),
    (["--topology=cpu:2", "--partitioning=zero"], "--partitioning='zero' is not one of"),
    (["--topology=cpu:2", "--search=speed"], "--search='speed' is not one of"),
])
def test_cli_bad_input(repo_root, tmp_path, args, message):
    out = _plan(repo_root, tmp_path, *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], out.stderr
    assert "Traceback" not in out.stderr


_BLOCK_LIBTPU = (
    "import sys\n"
    "class _NoLibtpu:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'libtpu': raise ModuleNotFoundError(name)\n"
    "sys.meta_path.insert(0, _NoLibtpu())\n")


def test_cli_without_libtpu_says_how_to_install(repo_root, tmp_path):
    out = _plan(repo_root, tmp_path, "--topology=v5e:2x2", python_prefix=_BLOCK_LIBTPU,
                env_extra={"TPU_LIBRARY_PATH": ""})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: the TPU compiler (libtpu) is "
                                                          "not installed; install it with")


@needs_libtpu
def test_cli_real_tpu_topology_v5e_2x2(repo_root, tmp_path):
    # a compilation cache set for the other verbs: JAX could write compile-only TPU programs
    # there but not load them again (a warning each time), so the planner leaves it alone
    cache = tmp_path / "xla_cache"
    out = _plan(repo_root, tmp_path, "--topology=v5e:2x2", "--partitioning=fsdp",
                "--format=json", env_extra={"JAX_COMPILATION_CACHE_DIR": str(cache),
                                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    assert out.returncode == 0, out.stderr
    assert not cache.exists() or not os.listdir(cache)
    assert "persistent compilation cache" not in out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["device_kind"] == "TPU v5 lite" and row["num_devices"] == 4
    assert not row["approximate"] and row["fits"] is True
    assert row["per_device"]["hbm_bytes"] == 16 * 2**30
    usable = row["per_device"]["usable_hbm_bytes"]  # what the compiler says one program gets
    assert 0.9 * 16 * 2**30 < usable < 16 * 2**30 and "probe" in row["usable_hbm_source"]
    assert row["headroom_bytes"] == usable - row["per_device"]["peak_bytes"]
    assert row["per_device"]["temp_bytes"] > 0 and row["compiler_flops_per_device"] > 0
    # fsdp: parameters are gathered for use and gradients reduce-scattered
    assert row["collective_bytes"]["all-gather"] > 0
    assert "TPU_ACCELERATOR_TYPE" not in out.stderr and "TPU_WORKER_HOSTNAMES" not in out.stderr


@needs_libtpu
def test_libtpu_installed_keeps_other_verbs_off_tpu(repo_root):
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    code = "import t5lite, jax; print(jax.default_backend(), len(jax.devices()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "cpu"
    for word in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle"):
        assert word not in out.stderr
