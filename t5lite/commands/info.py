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

from absl import flags

from t5lite.commands import gin_setup

FLAGS = flags.FLAGS
gin_setup.define_common_flags()
flags.DEFINE_string("model_dir", None, "read model_config.json from this model dir instead of gin")
flags.DEFINE_string("sharding", None, "also show mesh axes under this recipe (dp, fsdp, tp, "
                    "dp_tp, fsdp_tp) on a mesh from MeshConfig and this host's devices")


def load_config():
    """ModelConfig from --model_dir or from the gin files and --gin bindings."""
    from t5lite.config import ModelConfig

    if FLAGS.model_dir:
        from t5lite.model_dir import read_model_config

        return read_model_config(FLAGS.model_dir)
    gin_setup.parse_gin(FLAGS.gin_file, gin_setup.COMMAND_LINE_BINDINGS)
    config = gin_setup.build("ModelConfig")
    assert isinstance(config, ModelConfig)
    return config


def main(argv: list[str]) -> None:
    del argv
    from t5lite.models import model_info

    config = load_config()
    mesh = rules = None
    if FLAGS.sharding:
        from t5lite.parallel.mesh import make_mesh
        from t5lite.parallel.rules import get_rules

        rules = get_rules(FLAGS.sharding)
        mesh = make_mesh(gin_setup.build("MeshConfig"))
    print(model_info(config, mesh=mesh, rules=rules))
