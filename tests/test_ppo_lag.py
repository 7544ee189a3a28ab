"""PPO-Lagrangian's cost critic (``training.cost_critic``): cost GAE on a hand-computed batch
(a terminated and a truncated chunk), the combined advantage, the cost head's gradient, a short
run and its checkpoint (the multiplier and the cost head restored); the keep-out rule's
``count: inside``."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

GAMMA, LAMBDA = 0.5, 0.5


def _episode(costs, done=True):
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    n = len(costs)
    infos = [{"cost": 0.0, "episode_cost": 0.0}]
    for c in costs:
        infos.append({"cost": c, "episode_cost": infos[-1]["episode_cost"] + c})
    return SingleAgentEpisode(
        observations=[np.zeros(2, np.float32)] * (n + 1),
        actions=[np.zeros(2, np.float32)] * n,
        rewards=[1.0] * n,
        infos=infos,
        terminated=done,
        len_lookback_buffer=0,
    ).to_numpy()


class _FixedCostCritic:
    """A stand-in module whose cost value function returns given values."""

    def __init__(self, values):
        self.values = torch.tensor(values, dtype=torch.float32)

    def unwrapped(self):
        return self

    def is_stateful(self):
        return False

    def compute_cost_values(self, batch, embeddings=None):
        return self.values


def test_cost_gae_on_a_terminated_and_a_truncated_chunk():
    """Hand-computed, gamma = lambda = 0.5. Chunk A ends terminated after 3 steps (costs 1, 0, 1;
    V_c 0.4, 0.2, 0.6; its bootstrap row's 9.0 is not used); chunk B is cut (truncated) after 2
    steps (costs 0, 1; V_c 0.3, 0.5; bootstrap V_c(s_2) = 0.8). Each chunk carries PPO's extra
    bootstrap row (AddOneTsToEpisodesAndTruncate), masked out of the loss.

    A: delta_2 = 1 - 0.6 = 0.4; delta_1 = 0 + 0.5 * 0.6 - 0.2 = 0.1; delta_0 = 1 + 0.1 - 0.4 = 0.7
       A_c = 0.4, 0.1 + 0.25 * 0.4 = 0.2, 0.7 + 0.25 * 0.2 = 0.75
    B: delta_1 = 1 + 0.5 * 0.8 - 0.5 = 0.9 (bootstrapped, not propagated past the cut);
       delta_0 = 0 + 0.25 - 0.3 = -0.05; A_c = 0.9, -0.05 + 0.25 * 0.9 = 0.175
    """
    from ray.rllib.connectors.learner import AddOneTsToEpisodesAndTruncate
    from ray.rllib.core.columns import Columns
    from ray.rllib.evaluation.postprocessing import Postprocessing

    from vla_ray.algorithms.ppo_lag import (
        COST_ADVANTAGES,
        COST_VALUE_TARGETS,
        MULTIPLIER_KEY,
        CostAdvantages,
    )

    eps = [_episode([1.0, 0.0, 1.0], done=True), _episode([0.0, 1.0], done=False)]
    AddOneTsToEpisodesAndTruncate()(rl_module=None, batch={}, episodes=eps, shared_data={})
    assert [len(e) for e in eps] == [4, 3]
    values = [0.4, 0.2, 0.6, 9.0, 0.3, 0.5, 0.8]
    batch = {
        "default_policy": {
            Columns.TERMINATEDS: np.array([0, 0, 1, 0, 0, 0, 0], np.float32),
            Columns.TRUNCATEDS: np.array([0, 0, 0, 0, 0, 1, 0], np.float32),
            Columns.LOSS_MASK: np.array([1, 1, 1, 0, 1, 1, 0], bool),
            Postprocessing.ADVANTAGES: torch.ones(7),
        }
    }
    piece = CostAdvantages(gamma=GAMMA, lambda_=LAMBDA)
    out = piece(
        rl_module={"default_policy": _FixedCostCritic(values)},
        batch=batch,
        episodes=eps,
        shared_data={MULTIPLIER_KEY: 1.0},
    )["default_policy"]
    real = out[Columns.LOSS_MASK]
    raw = np.array([0.75, 0.2, 0.4, 0.175, 0.9])
    np.testing.assert_allclose(
        out[COST_VALUE_TARGETS].numpy()[real], raw + np.array([0.4, 0.2, 0.6, 0.3, 0.5]), atol=1e-6
    )
    centred = raw - raw.mean()  # centred over the real steps, not scaled
    np.testing.assert_allclose(out[COST_ADVANTAGES].numpy()[real], centred, atol=1e-6)
    # (A_r - lambda A_c) / (1 + lambda), lambda = 1, A_r = 1
    np.testing.assert_allclose(
        out[Postprocessing.ADVANTAGES].numpy()[real], (1.0 - centred) / 2.0, atol=1e-6
    )
    with pytest.raises(RuntimeError, match="multiplier from CostPenalty"):
        piece(rl_module={}, batch=batch, episodes=eps, shared_data={})


def test_penalised_advantage_formula():
    from vla_ray.algorithms.ppo_lag import penalised_advantages

    a_r, a_c = np.array([1.0, -0.5, 2.0]), np.array([0.0, 1.0, -1.0])
    np.testing.assert_allclose(penalised_advantages(a_r, a_c, 0.0), a_r)
    np.testing.assert_allclose(penalised_advantages(a_r, a_c, 3.0), [0.25, -0.875, 1.25])


def test_cost_penalty_without_folding_passes_the_multiplier_and_keeps_the_rewards():
    from vla_ray.algorithms.ppo_lag import MULTIPLIER_KEY, CostPenalty

    piece = CostPenalty(cost_limit=1.0, lagrangian_lr=0.5, lagrangian_init=0.0, fold=False)
    ep = _episode([1.0, 1.0, 1.0])
    shared: dict = {}
    piece(rl_module=None, batch={}, episodes=[ep], shared_data=shared)
    assert piece.multiplier == pytest.approx(1.0) and shared[MULTIPLIER_KEY] == pytest.approx(1.0)
    np.testing.assert_allclose(ep.get_rewards(), [1.0, 1.0, 1.0])  # not rewritten


@pytest.fixture(scope="module")
def state_spaces():
    import vla_ray.envs  # noqa: F401  (registers the envs)

    env = gym.make("vla_ray/LangReachState-v0")
    spaces = (env.observation_space, env.action_space)
    obs = [env.reset(seed=s)[0] for s in range(6)]
    env.close()
    batch = {k: torch.as_tensor(np.stack([o[k] for o in obs])) for k in obs[0]}
    return spaces, batch


def test_cost_head_trains_from_the_cost_value_loss_only(state_spaces):
    from ray.rllib.core.columns import Columns

    from vla_ray.config import ConfigError
    from vla_ray.rl_module import VLAModule

    (obs_space, act_space), obs = state_spaces
    mc = {"vision": "none", "head": "gaussian", "value": "shared", "cost_value": True}
    module = VLAModule(observation_space=obs_space, action_space=act_space, model_config=mc)
    batch = {Columns.OBS: obs}
    out = module.forward_train(batch)
    predicted = module.compute_cost_values(batch, embeddings=out[Columns.EMBEDDINGS])
    assert predicted.shape == (6,)
    loss = torch.mean((predicted - torch.ones(6)) ** 2)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.cvf.parameters())
    assert all(p.grad is None for p in module.vf.parameters())  # the reward critic: untouched
    assert "cvf" in module.get_non_inference_attributes()
    plain = VLAModule(
        observation_space=obs_space,
        action_space=act_space,
        model_config={**mc, "cost_value": False},
    )
    assert not hasattr(plain, "cvf")
    with pytest.raises(ConfigError, match="cost_value"):
        plain.compute_cost_values(batch)


def test_ppo_lag_cost_critic_switch(langreach_spaces):
    from vla_ray.algorithms.ppo_lag import CostPenalty, PPOLagConfig

    cfg = PPOLagConfig().training(cost_critic=True)
    assert cfg.model_config["cost_value"] is True
    assert "cost_value" not in PPOLagConfig().model_config  # the first form: no cost head
    piece = cfg.build_learner_connector(*langreach_spaces).connectors[0]
    assert isinstance(piece, CostPenalty) and piece.fold is False
    with pytest.raises(ValueError, match="cost_critic: expected true or false, got 'yes'"):
        PPOLagConfig().training(cost_critic="yes").validate()
    with pytest.raises(ValueError, match="cost_vf_loss_coeff: expected a number >= 0"):
        PPOLagConfig().training(cost_vf_loss_coeff=-1.0).validate()
    with pytest.raises(ValueError, match=r"cost_gamma: expected a number in \[0, 1\] or null"):
        PPOLagConfig().training(cost_gamma=1.5).validate()


def test_undiscounted_cost_gae_counts_a_later_violation_in_full():
    """cost_gamma = 1 (the constraint's undiscounted episode cost): with V_c = 0 and
    lambda = 1 the cost advantage of each step is the cost still to come, however late."""
    from vla_ray.algorithms.ppo_lag import cost_value_targets

    costs = np.array([0.0, 0.0, 0.0, 1.0, 0.0])  # 4 steps, terminated, + the bootstrap row
    term = np.array([0, 0, 0, 1, 0], np.float32)
    zeros = np.zeros(5, np.float32)
    _, undiscounted = cost_value_targets(zeros, costs, term, zeros, gamma=1.0, lambda_=1.0)
    np.testing.assert_allclose(undiscounted[:4], [1.0, 1.0, 1.0, 1.0])
    _, discounted = cost_value_targets(zeros, costs, term, zeros, gamma=0.9, lambda_=1.0)
    np.testing.assert_allclose(discounted[:4], [0.729, 0.81, 0.9, 1.0], rtol=1e-6)


# a monitor rule every step breaks: cost 1 per step
ALWAYS = {"rules": [{"id": "always", "kind": "speed_limit", "max": 1e-6, "mode": "monitor"}]}


def _train_with_a_rule_broken_every_step(out, extra_sets: dict) -> list[dict]:
    """``vla-ray train --preset langreach-state-ppo-lag --local --stop-iters 2`` with ALWAYS
    as the safety rules, 10-step episodes, cost_limit 0 and lagrangian_lr 0.1 (so lambda is
    1.0 after the first batch and 2.0 after the second); its metrics.jsonl rows."""
    from vla_ray.cli import main

    args = ["train", "--preset", "langreach-state-ppo-lag", "--local", "--stop-iters", "2"]
    sets = {
        "training.train_batch_size_per_learner": 128,
        "training.minibatch_size": 64,
        "training.num_epochs": 1,
        "training.cost_limit": 0.0,
        "training.lagrangian_lr": 0.1,
        "env_runners.num_envs_per_env_runner": 2,
        "env.max_episode_steps": 10,
        "env.safety": json.dumps(ALWAYS),
        **extra_sets,
    }
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert main([*args, "--output", str(out), "--quiet"]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ppo_lag_trains_with_the_safety_cost_and_raises_its_multiplier(ray_session, tmp_path):
    """Two local iterations of ``ppo_lag`` (the default penalty form) with a monitor rule that
    every step breaks (cost 1 per step, 10-step episodes) and cost_limit 0: the multiplier
    rises above 0 and metrics.jsonl reports the interventions per episode and the episode
    cost."""
    rows = _train_with_a_rule_broken_every_step(tmp_path / "run", {})
    assert len(rows) == 2
    for row in rows:
        assert row["safety"] == {"always": pytest.approx(10.0)}
        assert row["episode_cost"] == pytest.approx(10.0)
    # lambda = 0.1 * (10 - 0) after the first batch, 2.0 after the second
    assert rows[0]["learner"]["lagrange_multiplier"] == pytest.approx(1.0)
    assert rows[1]["learner"]["lagrange_multiplier"] == pytest.approx(2.0)


@pytest.mark.slow
def test_ppo_lag_with_cost_critic_trains_and_restores_multiplier_and_cost_head(
    ray_session, tmp_path
):
    """Two local iterations with a rule every step breaks (cost 10 per 10-step episode, limit
    0, lr 0.1: lambda 1 then 2); the checkpoint restores the multiplier and the cost head."""
    from ray.rllib.algorithms.algorithm import Algorithm
    from ray.rllib.core.rl_module.rl_module import RLModule

    from vla_ray.algorithms.ppo_lag import CostAdvantages, CostPenalty
    from vla_ray.checkpoint import MODULE_SUBDIR

    out = tmp_path / "run"
    rows = _train_with_a_rule_broken_every_step(
        out, {"training.cost_critic": "true", "training.cost_gamma": 1.0}
    )
    assert [r["learner"]["lagrange_multiplier"] for r in rows] == pytest.approx([1.0, 2.0])
    assert all(r["learner"]["cost_vf_loss"] > 0 for r in rows)
    algo = Algorithm.from_checkpoint(str(out / "checkpoints" / "last"))
    try:
        learner = algo.learner_group._learner
        pipeline = learner._learner_connector.connectors
        assert isinstance(pipeline[0], CostPenalty) and pipeline[0].multiplier == pytest.approx(2.0)
        assert isinstance(pipeline[-1], CostAdvantages)
        assert (pipeline[-1].gamma, pipeline[-1].lambda_) == (1.0, 0.8)  # cost_gamma; lambda_
        restored = learner.module["default_policy"].cvf.state_dict()
    finally:
        algo.stop()
    module = RLModule.from_checkpoint(out / "checkpoints" / "last" / MODULE_SUBDIR)
    for k, v in module.cvf.state_dict().items():
        torch.testing.assert_close(restored[k], v)


def test_keep_out_inside_counts_presence_whatever_the_direction():
    from vla_ray.safety import RuleSet, SafetyConfigError

    low, high = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    spec = {
        "id": "disc",
        "kind": "keep_out",
        "mode": "monitor",
        "state_indices": [0, 1],
        "center": [0.0, 0.0],
        "radius": 0.2,
        "margin": 0.05,
    }
    inward = RuleSet.from_dict({"rules": [spec]}, 2, low, high)
    inside = RuleSet.from_dict({"rules": [{**spec, "count": "inside"}]}, 2, low, high)
    for state, out_cmd, counts in [
        ([0.1, 0.0], [1.0, 0.0], (0, 1)),  # inside, moving out: only presence counts
        ([0.1, 0.0], [-1.0, 0.0], (1, 1)),  # inside, moving in: both
        ([0.3, 0.0], [-1.0, 0.0], (0, 0)),  # outside radius + margin: neither
    ]:
        a = np.array([out_cmd], np.float32)
        got = tuple(
            rs.apply(a, np.array(state, np.float32)).counts["disc"] for rs in (inward, inside)
        )
        assert got == counts, (state, out_cmd)
        np.testing.assert_array_equal(inside.apply(a, np.array(state)).actions, a)  # monitor
    assert inside.describe()[0]["count"] == "inside"
    with pytest.raises(SafetyConfigError, match="count: expected one of inward, inside"):
        RuleSet.from_dict({"rules": [{**spec, "count": "near"}]}, 2, low, high)
    # the bundled file: the expert's straight line through the disc
    bundled = RuleSet.from_config(
        "envs/safety/langreach_keepout_inside.yaml", gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    )
    assert bundled.describe()[0]["count"] == "inside"
