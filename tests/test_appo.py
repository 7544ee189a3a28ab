"""APPO with the VLA module (langreach-appo): the target policy, and training with the shared
inference actors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import EASY_LANGREACH
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import TARGET_NETWORK_ACTION_DIST_INPUTS

from vla_ray.algorithms import get_algorithm
from vla_ray.presets import get_preset
from vla_ray.train import build_algorithm_config, resolve, summarize


def test_appo_module_target_policy_starts_as_the_policy(langreach_spaces, langreach_obs_batch):
    appo = get_algorithm("appo")
    obs_space, act_space = langreach_spaces
    module = appo.module_class()(
        observation_space=obs_space,
        action_space=act_space,
        model_config=get_preset("langreach-appo").model,
    )
    module.make_target_networks()
    batch = {Columns.OBS: {k: torch.as_tensor(v) for k, v in langreach_obs_batch.items()}}
    with torch.no_grad():
        target = module.forward_target(batch)[TARGET_NETWORK_ACTION_DIST_INPUTS]
        policy = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(target, policy)
    (online, frozen) = module.get_target_network_pairs()[0]
    assert online is module.vla and not any(p.requires_grad for p in frozen.parameters())
    assert "_old_vla" in module.get_non_inference_attributes()


@pytest.mark.slow
def test_appo_trains_with_the_inference_service(ray_session):
    spec = resolve(
        "langreach-appo",
        {
            "env_config": EASY_LANGREACH,
            "training": {"train_batch_size_per_learner": 64},
            "env_runners": {
                "num_envs_per_env_runner": 2,
                "inference": {"actors": 1, "cpus_per_actor": 0, "max_batch": 4},
            },
        },
        num_env_runners=2,
    )
    cfg = build_algorithm_config(spec).reporting(min_time_s_per_iteration=2)
    algo = cfg.build_algo()
    rows = []
    deadline = time.time() + 300
    try:
        # asynchronous: the first iterations (2 s each) may end before the EnvRunners have
        # sampled a batch and a learner update has come back, and the EnvRunners pass updated
        # weights on to the actor on their next pull; how many iterations depends on the load
        while time.time() < deadline:
            rows.append(summarize(algo.train()))
            (stats,) = algo.env_runner.service.stats()
            if "total_loss" in rows[-1]["learner"] and stats["weights_seq_no"] > 0:
                break
    finally:
        settings = algo.env_runner.service.settings
        algo.stop()
    # the run's end closes the actors and the store once they are idle (the remote EnvRunners
    # stop after the local one: killing the actors under their last sample cost 60 s)
    names = [settings.store_name] + [settings.actor_name(i) for i in range(settings.actors)]
    deadline = time.time() + 30
    while time.time() < deadline and (alive := [n for n in names if _alive(n)]):
        time.sleep(0.5)
    assert not alive, alive
    assert rows[-1]["env_steps"] >= 64, rows
    assert np.isfinite(rows[-1]["learner"]["total_loss"]), rows
    # the EnvRunners pulled updated weights by reference and passed them on to the actor
    assert stats["rows"] > 0 and stats["weights_seq_no"] > 0


def _alive(actor_name: str) -> bool:
    import ray

    try:
        ray.get(ray.get_actor(actor_name).__ray_ready__.remote(), timeout=10)
    except (ValueError, ray.exceptions.RayActorError):  # no such name, or the actor ended
        return False
    return True
