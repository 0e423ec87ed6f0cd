"""One sharded train step equals the single-device step; accumulation equals one big batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5lite.errors import ConfigError
from t5lite.parallel.hosts import host_to_global
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.config import TrainConfig
from t5lite.train.optim import OptimizerConfig
from t5lite.train.schedules import ScheduleConfig
from t5lite.train.setup import make_setup
from train_fixtures import global_batch, tiny_model_config

BATCH = 8
MODEL = tiny_model_config(num_encoder_layers=1, num_decoder_layers=1, d_model=32, d_ff=128,
                          num_heads=4, head_dim=8)


def _train_config(partitioning: str, optimizer: str = "adafactor", batch: int = BATCH,
                  microbatches: int = 1) -> TrainConfig:
    schedule = ScheduleConfig(name="constant", base_learning_rate=1e-2, warmup_steps=0)
    return TrainConfig(train_steps=10, batch_size=batch, partitioning=partitioning,
                       microbatches=microbatches,
                       optimizer=OptimizerConfig(name=optimizer, schedule=schedule,
                                                 grad_clip_norm=1.0,
                                                 min_dim_size_to_factor=16))


def _one_step(partitioning: str, mesh_config: MeshConfig, devices=None, batch: int = BATCH,
              microbatches: int = 1, optimizer: str = "adafactor", data=None):
    mesh = make_mesh(mesh_config, devices)
    setup = make_setup(MODEL, _train_config(partitioning, optimizer, batch, microbatches), mesh)
    state = setup.fresh_state()
    data = global_batch(0, batch) if data is None else data
    state, metrics = setup.train_step(state, host_to_global(data, setup.batch_sharding, batch))
    return jax.device_get(state.params), jax.device_get(metrics), state


def _uneven_batch(batch: int, microbatches: int) -> dict[str, np.ndarray]:
    """A batch whose rows have 1..8 target tokens (the rest padding), arranged so that the
    microbatches (rows i, i+k, i+2k, ...) hold very different numbers of target tokens: a
    per-microbatch mean of the loss would weight their tokens differently from one big batch."""
    data = global_batch(0, batch)
    lengths = 1 + (np.arange(batch) % microbatches) * 7 // (microbatches - 1)
    for row, n in enumerate(lengths):
        data["decoder_target_tokens"][row, n:] = 0
        data["decoder_input_tokens"][row, n + 1:] = 0
        data["decoder_loss_weights"][row, n:] = 0
    return data


@pytest.fixture(scope="module")
def single_device_step():
    return _one_step("dp", MeshConfig(data=1), jax.devices()[:1])


@pytest.mark.parametrize("partitioning,mesh_config", [
    ("dp", MeshConfig(data=8)),
    ("fsdp", MeshConfig(data=2, fsdp=4)),
    ("tp", MeshConfig(data=1, tensor=8)),
    ("dp_tp", MeshConfig(data=4, tensor=2)),
])
def test_sharded_step_equals_single_device(single_device_step, partitioning, mesh_config):
    want_params, want_metrics, _ = single_device_step
    params, metrics, state = _one_step(partitioning, mesh_config)
    assert np.isclose(metrics["loss"], want_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
    if partitioning == "dp":
        assert all(x.sharding.spec == P() for x in jax.tree.leaves(state.params))
    elif partitioning == "fsdp":
        assert any("fsdp" in s for s in specs)
    else:
        assert any("tensor" in s for s in specs)


def test_accumulation_equals_one_big_batch():
    data = _uneven_batch(4 * BATCH, 4)
    tokens = [int(data["decoder_loss_weights"][i::4].sum()) for i in range(4)]
    assert tokens == [8, 24, 40, 64]  # microbatch i holds rows i, i+4, ...: uneven on purpose
    big_params, big_metrics, big_state = _one_step("dp", MeshConfig(data=8), batch=4 * BATCH,
                                                   optimizer="adamw", data=data)
    acc_params, acc_metrics, _ = _one_step("dp", MeshConfig(data=8), batch=4 * BATCH,
                                           microbatches=4, optimizer="adamw", data=data)
    assert float(big_metrics["target_tokens"]) == sum(tokens)
    # the test can tell the two normalisations apart: the mean of the microbatches' mean
    # losses is far from the loss of the whole batch (token-weighted)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    setup = make_setup(MODEL, _train_config("dp", "adamw", BATCH), mesh)
    fresh = setup.fresh_state().params
    sums = [jax.device_get(setup.eval_step(fresh, {k: v[i::4] for k, v in data.items()}))
            for i in range(4)]
    token_mean = sum(float(x["nll"]) for x in sums) / sum(tokens)
    mean_of_means = float(np.mean([float(x["nll"]) / float(x["weight"]) for x in sums]))
    assert abs(mean_of_means - token_mean) > 1e-3 * token_mean
    assert np.isclose(float(acc_metrics["cross_entropy"]), token_mean, rtol=1e-5)
    assert np.isclose(acc_metrics["loss"], big_metrics["loss"], rtol=1e-5)
    assert np.isclose(acc_metrics["grad_norm"], big_metrics["grad_norm"], rtol=1e-5)
    # AdamW's first step is ~lr * sign(g): where a gradient entry is ~1e-8 (Adam's eps) the
    # summation order moves it by up to ~0.5% of the 1e-2 step, hence atol 1e-4
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(big_params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-4)


def test_batch_that_does_not_split_over_the_mesh_is_refused():
    with pytest.raises(ConfigError, match="not divisible by the 8 data-parallel"):
        make_setup(MODEL, _train_config("dp", batch=12), make_mesh(MeshConfig(data=8)))


def test_eval_setup_matches_the_train_setup_without_an_optimizer():
    """`make_eval_setup` (what `t5lite eval` uses) shards parameters exactly like training and
    its eval step gives the same sums, without building an optimiser or a train state."""
    from t5lite.train.setup import TrainSetup, make_eval_setup

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    train_setup = make_setup(MODEL, _train_config("fsdp"), mesh)
    eval_setup = make_eval_setup(MODEL, mesh, "fsdp", BATCH)
    assert not isinstance(eval_setup, TrainSetup) and not hasattr(eval_setup, "tx")
    same = jax.tree.map(lambda a, b: a == b, eval_setup.param_shardings,
                        train_setup.state_shardings.params)
    assert all(jax.tree.leaves(same))
    params = train_setup.fresh_state().params
    batch = host_to_global(global_batch(0, BATCH), eval_setup.batch_sharding, BATCH)
    want = jax.device_get(train_setup.eval_step(params, batch))
    got = jax.device_get(eval_setup.eval_step(params, batch))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    with pytest.raises(ConfigError, match="not divisible"):
        make_eval_setup(MODEL, mesh, "fsdp", 12)
