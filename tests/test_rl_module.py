"""VLAModule as an RLlib RLModule: contract, errors, PPO with EnvRunners, checkpoint round-trip."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ppo_one_target_returns
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule

from vla_ray.config import ConfigError
from vla_ray.models.vla import VLA, ObservationError
from vla_ray.rl_module import VLAModule
from vla_ray.train import MODULE_SUBDIR, build_algorithm_config, resolve, train

# PPO settings small enough for CI: a few hundred steps per iteration.
SMALL_PPO = {
    "training": {"train_batch_size_per_learner": 256, "minibatch_size": 64, "num_epochs": 1},
    "env_runners": {"num_envs_per_env_runner": 2},
    "checkpoint_every": 1,
}


def make_module(spaces, **model_config) -> VLAModule:
    obs_space, act_space = spaces
    return VLAModule(observation_space=obs_space, action_space=act_space, model_config=model_config)


def to_batch(obs: dict[str, np.ndarray]) -> dict:
    return {Columns.OBS: {k: torch.as_tensor(v) for k, v in obs.items()}}


def test_forward_outputs_and_values(langreach_spaces, langreach_obs_batch):
    module = make_module(langreach_spaces)
    batch = to_batch(langreach_obs_batch)
    with torch.no_grad():
        inf = module.forward_inference(batch)
        exp = module.forward_exploration(batch)
    assert inf[Columns.ACTION_DIST_INPUTS].shape == (8, 4)  # mean + log_std of 2 dims
    assert exp[Columns.ACTION_DIST_INPUTS].shape == (8, 4)
    train_out = module.forward_train(batch)
    assert Columns.EMBEDDINGS in train_out
    values = module.compute_values(batch, train_out[Columns.EMBEDDINGS])
    assert values.shape == (8,)
    torch.testing.assert_close(values, module.compute_values(batch))
    dist = module.get_train_action_dist_cls().from_logits(train_out[Columns.ACTION_DIST_INPUTS])
    assert dist.sample().shape == (8, 2)


def test_keypoint_reconstruction_is_a_training_output_only_when_enabled(
    langreach_spaces, langreach_obs_batch
):
    from vla_ray.rl_module import AUX_LOSS

    batch = to_batch(langreach_obs_batch)
    assert AUX_LOSS not in make_module(langreach_spaces).forward_train(batch)
    module = make_module(
        langreach_spaces, vision_config={"tokens": "keypoints", "recon_coeff": 0.5}
    )
    aux = module.forward_train(batch)[AUX_LOSS]
    assert aux.shape == () and 0.0 < aux.item() < 5.0
    aux.backward()  # reaches the conv stack, not only the decoder
    assert module.vla.trunk.vision.net[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert AUX_LOSS not in module.forward_exploration(batch)


def test_inference_only_drops_value_function(langreach_spaces):
    full = make_module(langreach_spaces, value="separate")
    assert hasattr(full, "vf") and hasattr(full, "vf_trunk")
    obs_space, act_space = langreach_spaces
    light = VLAModule(
        observation_space=obs_space,
        action_space=act_space,
        model_config={"value": "separate"},
        inference_only=True,
    )
    assert not hasattr(light, "vf") and not hasattr(light, "vf_trunk")
    state = full.get_state(inference_only=True)
    assert state and not any(k.startswith(("vf.", "vf_trunk.")) for k in state)
    light.set_state(state)  # EnvRunner weight sync: accepted without missing keys


def test_value_none_and_deterministic_heads_fail_clearly(langreach_spaces, langreach_obs_batch):
    module = make_module(langreach_spaces, value="none")
    with pytest.raises(ConfigError, match="value='none'"):
        module.compute_values(to_batch(langreach_obs_batch))
    det = make_module(langreach_spaces, head="diffusion")
    with pytest.raises(ConfigError, match="deterministic.*gaussian"):
        det.get_train_action_dist_cls()
    with torch.no_grad():
        out = det.forward_inference(to_batch(langreach_obs_batch))
    assert out[Columns.ACTIONS].shape == (8, 2)


def test_bad_spaces_and_observations_raise(langreach_spaces, langreach_obs_batch):
    obs_space, act_space = langreach_spaces
    with pytest.raises(ConfigError, match="Dict space"):
        VLAModule(observation_space=obs_space["image"], action_space=act_space, model_config={})
    no_instr = gym.spaces.Dict({"image": obs_space["image"], "state": obs_space["state"]})
    with pytest.raises(
        ConfigError, match=r"missing key\(s\) \['instruction', 'instruction_mask'\]"
    ):
        VLAModule(observation_space=no_instr, action_space=act_space, model_config={})
    with pytest.raises(ConfigError, match="not a multiple of chunk_size=3"):
        make_module(langreach_spaces, chunk_size=3)
    with pytest.raises(ConfigError, match="derived from the env's spaces"):
        make_module(langreach_spaces, action_dim=7)
    module = make_module(langreach_spaces)
    bad = dict(langreach_obs_batch, image=langreach_obs_batch["image"][:, :, :, :1])
    with pytest.raises(ObservationError, match=r"'image'.*\(B, 64, 64, 3\).*\(8, 64, 64, 1\)"):
        module.forward_inference(to_batch(bad))


@pytest.mark.slow
def test_ppo_two_iterations_two_env_runners_and_checkpoint_roundtrip(
    ray_session, tmp_path, langreach_obs_batch
):
    spec = resolve("langreach-ppo", {**SMALL_PPO, "keep_checkpoints": True}, num_env_runners=2)
    summary = train(spec, tmp_path / "run", stop_iters=2, progress=False)
    assert summary["iteration"] == 2 and summary["env_steps"] >= 512
    assert (tmp_path / "run" / "config.json").is_file()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().strip().splitlines()
    assert len(rows) == 2

    ckpt = tmp_path / "run" / "checkpoints" / "last"
    module = RLModule.from_checkpoint(str(ckpt / MODULE_SUBDIR))
    again = RLModule.from_checkpoint(str(ckpt / MODULE_SUBDIR))
    batch = to_batch(langreach_obs_batch)
    with torch.no_grad():
        a1 = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        a2 = again.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    # the save_pretrained export in the checkpoint gives the same deterministic actions
    vla = VLA.from_pretrained(ckpt / "vla")
    mean = a1[:, :2]
    torch.testing.assert_close(vla.predict(langreach_obs_batch).flatten(1), mean, rtol=0, atol=0)
    # keep_checkpoints: every periodic checkpoint stays, the newest equals last
    kept = sorted(p.name for p in ckpt.parent.glob("iter_*"))
    assert kept == ["iter_000001", "iter_000002"]
    at = {
        n: VLA.from_pretrained(ckpt.parent / n / "vla").predict(langreach_obs_batch) for n in kept
    }
    torch.testing.assert_close(at["iter_000002"].flatten(1), mean, rtol=0, atol=0)
    assert not torch.equal(at["iter_000001"], at["iter_000002"])  # PPO moved the policy

    # a restored algorithm continues from the same weights
    algo = build_algorithm_config(spec).build_algo()
    try:
        algo.restore_from_path(str(ckpt.resolve()))
        with torch.no_grad():
            a3 = algo.get_module().forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        torch.testing.assert_close(a3, a1, rtol=0, atol=0)
    finally:
        algo.stop()


# after 8 iterations seeds 0-2 gained 2.29, 2.04, 1.97 (6: 1.90, 1.71, 1.59; 12: 2.18, 2.11,
# 2.54): kept checkpoints of 12-iteration runs, 32 episodes each, 2026-12-06
PPO_LEARNING_ITERS = 8


@pytest.mark.slow
def test_ppo_from_scratch_raises_the_return_on_one_target_langreach(ray_session, tmp_path):
    """The PPO learning check: one target (no colour to ground), small images, short episodes."""
    before, after = ppo_one_target_returns("langreach-ppo", tmp_path / "run", PPO_LEARNING_ITERS)
    print(f"PPO on one-target LangReach: eval return {before:.2f} -> {after:.2f}")
    assert after > before + 1.0
