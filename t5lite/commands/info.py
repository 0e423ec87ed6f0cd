"""`t5lite info`: parameter shapes, logical axes and counts of a model config.

Examples::

    t5lite info --gin_file=gin/models/t5_1_1/small.gin
    t5lite info --gin_file=gin/models/modern/base.gin --gin.ModelConfig.num_experts=8
    t5lite info --model_dir=runs/demo                 # the config saved with a run
    t5lite info --gin_file=gin/models/t5_1_1/base.gin --sharding=fsdp_tp \
        --gin.MeshConfig.fsdp=-1 --gin.MeshConfig.tensor=1  # + mesh axes on this host's devices

Nothing is allocated: the model is built abstractly (shapes only).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from t5lite.commands import common, gin_setup

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "gin_file", "model_dir",
                        model_dir="read its model_config.json instead of gin files")
flags.DEFINE_string("sharding", None, "also show mesh axes under this recipe (dp, fsdp, tp, "
                    "dp_tp, fsdp_tp) on a mesh from MeshConfig and this host's devices",
                    flag_values=FLAGS)


def load_config(model_dir: str | None, gin_files: list[str], gin_bindings: Sequence[str]):
    """ModelConfig from `model_dir` when given, else from the gin files and bindings."""
    from t5lite.config import ModelConfig

    if model_dir:
        from t5lite.model_dir import read_model_config

        return read_model_config(model_dir)
    gin_setup.parse_gin(gin_files, gin_bindings)
    config = gin_setup.build("ModelConfig")
    assert isinstance(config, ModelConfig)
    return config


def main(gin_bindings: Sequence[str]) -> None:
    from t5lite.models import model_info

    config = load_config(FLAGS.model_dir, FLAGS.gin_file, gin_bindings)
    mesh = rules = None
    if FLAGS.sharding:
        from t5lite.parallel.mesh import make_mesh
        from t5lite.parallel.rules import get_rules

        rules = get_rules(FLAGS.sharding)
        mesh = make_mesh(gin_setup.build("MeshConfig"))
    print(model_info(config, mesh=mesh, rules=rules))
