"""`t5lite plan`: will this run fit, and how should it be sharded? Compiled, not guessed.

    t5lite plan --gin_file=gin/models/t5_1_1/xxl.gin --gin_file=gin/runs/pretrain.gin \\
        --topology=v5p-256 --partitioning=all
    t5lite plan ... --topology=v4-256 --partitioning=fsdp --search=batch_size
    t5lite plan ... --topology=v5e-16 --mode=decode --decode_batch=64
    t5lite plan ... --topology=cpu:8 --hbm_gib=80      # approximate (e.g. for GPUs)

The train step is the one `t5lite train` runs for these gin files (see t5lite/plan/train.py),
compiled by the TPU compiler (libtpu, `pip install 't5lite[plan]'`) for compile-only devices of
the named slice; nothing runs on a TPU. `--partitioning` unset: the recipe and MeshConfig from
gin; `--partitioning=RECIPE`: that recipe on its default mesh (t5lite/plan/meshes.py);
`all`: every recipe, one table sorted by fit then collective bytes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

from t5lite.commands import common, gin_setup
from t5lite.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "gin_file", "format")
_F = dict(flag_values=FLAGS)
flags.DEFINE_string("topology", None, "target: a TPU slice (v4-256, v5p-512, v5e-256, v6e-64), "
                    "a chip grid (v5e:16x16, v4:4x4x8) or cpu:N (approximate planner)", **_F)
flags.DEFINE_integer("num_slices", 1, "number of slices joined by the data-centre network "
                     "(the mesh's dcn axis)", **_F)
flags.DEFINE_string("partitioning", None, "sharding recipe (dp, fsdp, tp, dp_tp, fsdp_tp) on its "
                    "default mesh, or 'all' for a table of every recipe; unset: gin's "
                    "TrainConfig.partitioning and MeshConfig", **_F)
flags.DEFINE_string("search", None, "batch_size: the largest global batch that fits; remat: the "
                    "cheapest remat policy that fits (bisection over compiles)", **_F)
flags.DEFINE_string("mode", "train", "train: the train step; decode: the inference step", **_F)
flags.DEFINE_float("hbm_gib", None, "memory per device in GiB that the verdict compares "
                   "with (default: the HBM the TPU compiler makes available to a program on "
                   "the chip, e.g. v4 30.75 of 32 GiB; required for a verdict with cpu:N)", **_F)
flags.DEFINE_integer("decode_batch", 8, "--mode=decode: inputs per batch", **_F)
flags.DEFINE_integer("decode_input_len", None, "--mode=decode: input tokens (default: the gin "
                     "inputs length)", **_F)
flags.DEFINE_integer("decode_len", None, "--mode=decode: tokens to decode (default: the gin "
                     "targets length)", **_F)
flags.DEFINE_string("decode_method", "greedy", "--mode=decode: greedy | sample | beam", **_F)
flags.DEFINE_integer("decode_beams", 4, "--mode=decode --decode_method=beam: beam size", **_F)
flags.DEFINE_string("save_hlo", None, "also write each compiled module's HLO text to this "
                    "directory (TOPOLOGY_RECIPE_MESH_MODE.hlo.txt.gz)", **_F)

_PLACEHOLDER_TASK = 'MIXTURE_OR_TASK_NAME = "t5lite_plan"'


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"--{name}={value!r} is not one of {', '.join(map(str, allowed))}.")


def _configure(gin_files: list[str], bindings: list[str]):
    """(ModelConfig, TrainConfig, MeshConfig, model feature lengths) from gin, as `t5lite
    train` builds them (the task itself is not needed: only its feature lengths)."""
    gin_setup.parse_gin(gin_files, bindings)
    model_config = gin_setup.build("ModelConfig")
    train_config = gin_setup.build("TrainConfig")
    mesh_config = gin_setup.build("MeshConfig")
    try:
        data_config = gin_setup.build("DataConfig")
    except (TypeError, UserError) as e:
        raise UserError(f"the gin files configure no DataConfig ({str(e).splitlines()[0]}); "
                        "add a run config such as --gin_file=gin/runs/pretrain.gin (it sets "
                        "TASK_FEATURE_LENGTHS and BATCH_SIZE).") from None
    from t5lite.data.pipeline import model_feature_lengths

    return model_config, train_config, mesh_config, model_feature_lengths(data_config)


def main(gin_bindings: Sequence[str]) -> None:
    from t5lite.plan import topologies

    if not FLAGS.topology:
        raise UserError("--topology is required, e.g. --topology=v5p-256 (or cpu:8).")
    topo = topologies.parse_topology(FLAGS.topology, FLAGS.num_slices)
    fmt = FLAGS.format
    _choice("mode", FLAGS.mode, ("train", "decode"))
    if FLAGS.search is not None:
        _choice("search", FLAGS.search, ("batch_size", "remat"))
        if FLAGS.mode != "train":
            raise UserError("--search works with --mode=train only.")
    from t5lite.parallel.rules import RECIPES

    if FLAGS.partitioning is not None:
        _choice("partitioning", FLAGS.partitioning, tuple(sorted(RECIPES)) + ("all",))
        if FLAGS.partitioning == "all" and FLAGS.search:
            raise UserError("--search needs one recipe: pass --partitioning=RECIPE (or none).")
    if FLAGS.hbm_gib is not None and FLAGS.hbm_gib <= 0:
        raise UserError(f"--hbm_gib={FLAGS.hbm_gib} must be positive.")
    if topo.is_tpu and not topologies.libtpu_available():
        raise UserError(topologies.INSTALL_HINT)
    if not topo.is_tpu:
        topologies.prepare_cpu_devices(topo.num_devices)
    import jax

    # A persistent compilation cache (JAX_COMPILATION_CACHE_DIR set for the other verbs) cannot
    # serve the planner: JAX writes compile-only TPU executables but cannot load them without a
    # TPU client (a warning, then a full compile), so the planner neither reads nor fills it.
    jax.config.update("jax_enable_compilation_cache", False)
    if not FLAGS.gin_file:
        raise UserError("--gin_file is required: a model and a run config, e.g. "
                        "--gin_file=gin/models/t5_1_1/xxl.gin --gin_file=gin/runs/pretrain.gin")
    from t5lite.plan.runner import PlanRequest, run_plan

    model_config, train_config, mesh_config, feature_lengths = _configure(
        list(FLAGS.gin_file), [_PLACEHOLDER_TASK] + list(gin_bindings))
    request = PlanRequest(
        model_config=model_config, train_config=train_config, mesh_config=mesh_config,
        feature_lengths=feature_lengths, topology=topo, partitioning=FLAGS.partitioning,
        search=FLAGS.search, mode=FLAGS.mode, hlo_dir=FLAGS.save_hlo,
        hbm_gib=FLAGS.hbm_gib, decode_batch=FLAGS.decode_batch,
        decode_input_len=FLAGS.decode_input_len, decode_len=FLAGS.decode_len,
        decode_method=FLAGS.decode_method, decode_beams=FLAGS.decode_beams)
    text = run_plan(request, fmt)
    sys.stdout.write(text + "\n")
