"""Shared batched inference for EnvRunners (``env_runners.inference``): settings validation,
PPO with 2 EnvRunners served by the actors, parity with the local module, a killed actor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EASY_LANGREACH
from ray.rllib.core.columns import Columns

from vla_ray.config import ConfigError
from vla_ray.inference import InferenceClientModule, InferenceSettings
from vla_ray.train import build_algorithm_config, resolve

TINY_PPO = {
    "env_config": EASY_LANGREACH,
    "training": {"train_batch_size_per_learner": 128, "minibatch_size": 64, "num_epochs": 1},
    "env_runners": {
        "num_envs_per_env_runner": 2,
        # the session's Ray has 2 CPUs, one per EnvRunner: the actor takes none
        "inference": {"actors": 1, "cpus_per_actor": 0, "max_batch": 8, "wait_ms": 5},
    },
}


@pytest.mark.parametrize(
    "given, field",
    [
        ({"actors": 0}, "env_runners.inference.actors: expected an integer >= 1, got 0"),
        ({"max_batch": 2.5}, "env_runners.inference.max_batch: expected an integer >= 1"),
        ({"wait_ms": -1}, "env_runners.inference.wait_ms: expected a number >= 0, got -1"),
        ({"gpus": 1}, "env_runners.inference: unknown key(s) ['gpus']; valid keys are"),
        ([2], "env_runners.inference: expected a dict"),
    ],
)
def test_settings_errors_name_the_field(given, field):
    with pytest.raises(ConfigError) as err:
        InferenceSettings.from_dict(given)
    assert field in str(err.value)


def test_settings_defaults_and_unique_names():
    a, b = InferenceSettings.from_dict({}), InferenceSettings.from_dict({"actors": 3})
    assert (a.actors, a.max_batch, a.max_restarts, b.actors) == (1, 64, -1, 3)
    assert a.name != b.name and a.actor_name(2).startswith(a.name)


def test_service_needs_remote_env_runners():
    spec = resolve("langreach-ppo", TINY_PPO, local=True)
    with pytest.raises(ConfigError, match="num_env_runners >= 1, got 0"):
        build_algorithm_config(spec)


@pytest.fixture(scope="module")
def served_ppo(ray_session):
    """PPO on LangReach with 2 EnvRunners and one inference actor, after 2 iterations."""
    spec = resolve("langreach-ppo", TINY_PPO, num_env_runners=2)
    algo = build_algorithm_config(spec).build_algo()
    results = [algo.train() for _ in range(2)]
    yield algo, results
    algo.stop()


@pytest.mark.slow
def test_ppo_trains_with_the_service(served_ppo, ray_session):
    algo, results = served_ppo
    steps = [r["env_runners"]["num_env_steps_sampled_lifetime"] for r in results]
    assert steps[0] >= 128 and steps[1] >= 2 * 128
    assert np.isfinite(results[-1]["learners"]["default_policy"]["policy_loss"])
    # remote EnvRunners hold no weights; the driver's EnvRunner has the full module
    remote = algo.env_runner_group.foreach_env_runner(
        lambda r: (type(r.module).__name__, sum(p.numel() for p in r.module.parameters())),
        local_env_runner=False,
    )
    assert remote == [("InferenceClientModule", 0)] * 2
    assert sum(p.numel() for p in algo.env_runner.module.parameters()) > 10_000
    (stats,) = algo.env_runner.service.stats()
    # both EnvRunners' 2-env batches went through the actor, some of them together
    assert stats["rows"] >= 2 * 128 and stats["max_batch"] <= 8
    # the actor holds the learner's latest weights
    assert stats["weights_seq_no"] == algo.env_runner._weights_seq_no > 0


@pytest.mark.slow
def test_served_actions_match_the_local_module(served_ppo, ray_session):
    algo, _ = served_ppo

    def episode(runner):
        (ep,) = runner.sample(num_episodes=1, explore=False)
        n = len(ep)
        obs = ep.get_observations(slice(0, n))
        return (
            obs,
            ep.get_actions(slice(0, n)),
            ep.get_extra_model_outputs(Columns.ACTION_DIST_INPUTS, slice(0, n)),
        )

    (obs, actions, dist_inputs), _ = algo.env_runner_group.foreach_env_runner(
        episode, local_env_runner=False
    )
    module = algo.env_runner.module
    batch = {Columns.OBS: {k: torch.as_tensor(np.array(v)) for k, v in obs.items()}}
    with torch.no_grad():
        local = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS].numpy()
    assert local.shape == dist_inputs.shape and local.shape[0] == len(actions) > 1
    np.testing.assert_allclose(dist_inputs, local, rtol=1e-4, atol=1e-5)
    # explore=False: the action is the distribution's mean
    np.testing.assert_allclose(actions, local[:, : actions.shape[1]], rtol=1e-4, atol=1e-5)
    assert isinstance(
        algo.env_runner_group.foreach_env_runner(lambda r: r.module, local_env_runner=False)[0],
        InferenceClientModule,
    )


@pytest.mark.slow
def test_a_killed_actor_is_restarted_with_the_latest_weights(served_ppo, ray_session):
    algo, _ = served_ppo
    service = algo.env_runner.service
    (before,) = service.stats()
    ray_session.kill(service.actors[0], no_restart=False)
    result = algo.train()  # samples through the restarted actor
    (after,) = service.stats()
    assert after["pid"] != before["pid"]
    assert result["env_runners"]["num_env_steps_sampled_lifetime"] >= 3 * 128
    assert after["rows"] >= 128  # the new incarnation served this iteration
    assert after["weights_seq_no"] == algo.env_runner._weights_seq_no > before["weights_seq_no"]


def test_actor_batches_concurrent_requests(ray_session, langreach_spaces, langreach_obs_batch):
    """Requests that arrive within wait_ms run as one forward pass; each caller gets its rows."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from vla_ray.inference import InferenceService
    from vla_ray.presets import get_preset
    from vla_ray.rl_module import VLAModule

    obs_space, act_space = langreach_spaces
    spec = RLModuleSpec(
        module_class=VLAModule,
        observation_space=obs_space,
        action_space=act_space,
        model_config=get_preset("langreach-ppo").model,
        inference_only=True,
    )
    # a long wait: the 2 + 3 + 1 rows fill max_batch=6 and run together however slowly they
    # arrive (a loaded machine); a request larger than max_batch runs whole, at once
    settings = InferenceSettings.from_dict({"cpus_per_actor": 0, "max_batch": 6, "wait_ms": 60_000})
    service = InferenceService.create(settings, spec)
    try:
        (actor,) = service.actors
        obs = {Columns.OBS: langreach_obs_batch}  # 8 rows
        parts = [
            {Columns.OBS: {k: v[a:b] for k, v in langreach_obs_batch.items()}}
            for a, b in ((0, 2), (2, 5), (5, 6))
        ]
        outs = ray_session.get([actor.infer.remote("inference", p) for p in parts])
        whole = ray_session.get(actor.infer.remote("inference", obs))
        stats = ray_session.get(actor.stats.remote())
    finally:
        service.stop()
    key = Columns.ACTION_DIST_INPUTS
    np.testing.assert_allclose(
        np.concatenate([o[key] for o in outs]), whole[key][:6], rtol=1e-5, atol=1e-6
    )
    assert stats["batch_sizes"] == {"6": 1, "8": 1}
