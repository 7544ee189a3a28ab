"""Named training presets: algorithm + env + model + runner settings that are known to work."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

# The tiny VLA used for CPU RL: CoordConv CNN with spatial-softmax keypoint tokens ->
# instruction-conditioned attention pooling -> 2-layer Qwen2-style LM (hidden 64).
TINY_VLA: dict[str, Any] = dict(
    vision="cnn",
    vision_config={"tokens": "keypoints"},
    projector="attention",
    projector_tokens=8,
)


@dataclass(frozen=True)
class Preset:
    """A runnable training recipe; every section can be overridden with ``--set section.key=v``."""

    name: str
    algorithm: str
    env: str
    description: str
    env_config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    env_runners: dict[str, Any] = field(default_factory=dict)
    learners: dict[str, Any] = field(default_factory=dict)
    stop: dict[str, Any] = field(default_factory=dict)
    eval_episodes: int = 50

    def sections(self) -> dict[str, Any]:
        """A deep copy of the overridable settings as one nested dict."""
        return copy.deepcopy(
            dict(
                env_config=self.env_config,
                model=self.model,
                training=self.training,
                env_runners=self.env_runners,
                learners=self.learners,
                stop=self.stop,
            )
        )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="langreach-ppo",
            algorithm="ppo",
            env="vla_ray/LangReach-v0",
            description="PPO from 64x64 pixels + instruction on LangReach (tiny CNN/Qwen2 VLA)",
            model=dict(
                TINY_VLA,
                vision_skip=True,
                head="gaussian",
                head_config={"init_log_std": -1.0},
                value="shared",
            ),
            # The shaped reward scores each step's progress: a short credit horizon
            # (gamma 0.9, lambda 0.8) keeps advantage noise low.
            training=dict(
                lr=5e-4,
                gamma=0.9,
                lambda_=0.8,
                train_batch_size_per_learner=2048,
                minibatch_size=256,
                num_epochs=4,
                entropy_coeff=0.0,
            ),
            env_runners=dict(num_env_runners=2, num_envs_per_env_runner=8),
            stop=dict(timesteps=1_000_000),
        ),
        Preset(
            name="langreach-bc",
            algorithm="bc",
            env="vla_ray/LangReach-v0",
            description="behaviour cloning of LangReach demos (vla-ray collect) with the tiny VLA",
            model=dict(TINY_VLA, vision_skip=True, head="gaussian", value="none"),
            training=dict(lr=1e-3, train_batch_size_per_learner=256),
            # the driver's EnvRunner evaluates (every 25 updates, 20 episodes); no remote runners
            # so that Ray Data's readers get the CPUs
            env_runners=dict(num_env_runners=0, num_envs_per_env_runner=4),
            stop=dict(iters=500),
            eval_episodes=20,
        ),
        Preset(
            name="langreach-dagger",
            algorithm="dagger",
            env="vla_ray/LangReach-v0",
            description="DAgger with the scripted expert relabelling every visited state",
            env_config=dict(expert_beta=1.0),
            model=dict(TINY_VLA, vision_skip=True, head="gaussian", value="none"),
            training=dict(lr=1e-3, rollout_steps=1000, updates_per_iteration=50),
            env_runners=dict(num_env_runners=2, num_envs_per_env_runner=4),
            stop=dict(iters=30),
            eval_episodes=20,
        ),
    ]
}

# -- offline RL and imitation (issue 4: MARWIL, TD3+BC, Decision Transformer, GAIL, PushT BC) ----
# State-only VLA for MuJoCo locomotion: no vision, the tiny Qwen2-style LM over the fixed
# instruction, the state as one token + a skip connection to the head.
STATE_VLA: dict[str, Any] = dict(vision="none")
_OFFLINE_EVAL = dict(num_env_runners=0, num_envs_per_env_runner=1)
PRESETS.update(
    {
        p.name: p
        for p in [
            Preset(
                name="hopper-bc",
                algorithm="bc",
                env="vla_ray/Hopper-v5",
                description="behaviour cloning on a Hopper dataset (vla-ray collect), state-only VLA",
                model=dict(STATE_VLA, head="mlp", value="none"),
                training=dict(lr=3e-4, train_batch_size_per_learner=256),
                env_runners=_OFFLINE_EVAL,
                stop=dict(iters=20_000),
                eval_episodes=5,
            ),
            Preset(
                name="hopper-marwil",
                algorithm="marwil",
                env="vla_ray/Hopper-v5",
                description="RLlib's MARWIL (advantage-weighted BC) on a Hopper dataset",
                model=dict(STATE_VLA, head="gaussian", value="shared"),
                training=dict(lr=3e-4, beta=1.0, train_batch_size_per_learner=256),
                env_runners=_OFFLINE_EVAL,
                stop=dict(iters=20_000),
                eval_episodes=5,
            ),
            Preset(
                name="hopper-td3bc",
                algorithm="td3bc",
                env="vla_ray/Hopper-v5",
                description="TD3+BC (alpha 2.5, normalised states) on a Hopper dataset",
                model=dict(STATE_VLA, head="mlp", value="none"),
                training=dict(train_batch_size_per_learner=256),
                env_runners=_OFFLINE_EVAL,
                stop=dict(iters=20_000),
                eval_episodes=5,
            ),
            Preset(
                name="hopper-dt",
                algorithm="dt",
                env="vla_ray/Hopper-v5",
                description="Decision Transformer (K=20, target return 3600) on a Hopper dataset",
                model=dict(STATE_VLA, head="mlp", value="none"),
                training=dict(
                    lr=1e-4,
                    train_batch_size_per_learner=64,
                    context_length=20,
                    target_return=3600.0,
                    return_scale=1000.0,
                ),
                env_runners=_OFFLINE_EVAL,
                stop=dict(iters=20_000),
                eval_episodes=5,
            ),
            Preset(
                name="langreach-gail",
                algorithm="gail",
                env="vla_ray/LangReach-v0",
                description="GAIL: PPO on a discriminator reward against LangReach expert demos",
                model=dict(
                    TINY_VLA,
                    vision_skip=True,
                    head="gaussian",
                    head_config={"init_log_std": -1.0},
                    value="shared",
                ),
                training=dict(
                    lr=5e-4,
                    gamma=0.9,
                    lambda_=0.8,
                    train_batch_size_per_learner=2048,
                    minibatch_size=256,
                    num_epochs=4,
                    entropy_coeff=0.0,
                ),
                env_runners=dict(num_env_runners=2, num_envs_per_env_runner=8),
                stop=dict(timesteps=1_000_000),
            ),
            Preset(
                name="pusht-bc",
                algorithm="bc",
                env="vla_ray/PushT-v0",
                description="diffusion-policy behaviour cloning of PushT demos with the tiny VLA",
                model=dict(TINY_VLA, vision_skip=True, head="diffusion", value="none"),
                training=dict(lr=1e-3, train_batch_size_per_learner=256),
                env_runners=dict(num_env_runners=0, num_envs_per_env_runner=4),
                stop=dict(iters=2000),
                eval_episodes=20,
            ),
        ]
    }
)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; valid names are {', '.join(PRESETS)}")
    return PRESETS[name]
