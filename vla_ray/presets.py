"""Named training presets: algorithm + env + model + runner settings that are known to work."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from vla_ray.env_factory import SAFETY_KEY

# The tiny VLA used for CPU RL: CoordConv CNN with spatial-softmax keypoint tokens ->
# instruction-conditioned attention pooling -> 2-layer Qwen2-style LM (hidden 64).
TINY_VLA: dict[str, Any] = dict(
    vision="cnn",
    vision_config={"tokens": "keypoints"},
    projector="attention",
    projector_tokens=8,
)


# PPO on LangReach (langreach-ppo and the VLM-trunk preset). The shaped reward scores each
# step's progress: a short credit horizon (gamma 0.9, lambda 0.8) keeps advantage noise low. A
# KL penalty (adaptive, target 0.02 per iteration) and a small value-loss weight on the shared
# trunk keep each update from undoing the colour grounding of the last one (docs/benchmarks.md).
LANGREACH_PPO_TRAINING: dict[str, Any] = dict(
    lr=5e-4,
    gamma=0.9,
    lambda_=0.8,
    train_batch_size_per_learner=2048,
    minibatch_size=256,
    num_epochs=4,
    entropy_coeff=0.0,
    vf_loss_coeff=0.01,
    kl_coeff=0.5,
    kl_target=0.02,
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
    # keywords of RLlib's AlgorithmConfig.fault_tolerance over vla_ray.scale's defaults
    fault_tolerance: dict[str, Any] = field(default_factory=dict)

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
                fault_tolerance=self.fault_tolerance,
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
            # A small keypoint-reconstruction loss keeps every target decodable from the CNN's
            # keypoints; without it PPO lets one colour drop out of them and plateaus at ~0.70
            # (docs/benchmarks.md, "Keeping every colour in the keypoints").
            model=dict(
                TINY_VLA,
                vision_config={"tokens": "keypoints", "recon_coeff": 0.05},
                vision_skip=True,
                head="gaussian",
                head_config={"init_log_std": -1.0},
                value="shared",
            ),
            training=dict(LANGREACH_PPO_TRAINING),
            env_runners=dict(num_env_runners=2, num_envs_per_env_runner=8),
            stop=dict(timesteps=1_000_000),
        ),
        Preset(
            name="langreach-appo",
            algorithm="appo",
            env="vla_ray/LangReach-v0",
            description=(
                "APPO (asynchronous sampling, V-trace) on LangReach with langreach-ppo's model; "
                "not tuned for learning yet"
            ),
            model=dict(
                TINY_VLA,
                vision_config={"tokens": "keypoints", "recon_coeff": 0.05},
                vision_skip=True,
                head="gaussian",
                head_config={"init_log_std": -1.0},
                value="shared",
            ),
            training=dict(lr=5e-4, gamma=0.9, vf_loss_coeff=0.01, train_batch_size_per_learner=512),
            env_runners=dict(num_env_runners=2, num_envs_per_env_runner=8),
            stop=dict(timesteps=1_000_000),
        ),
        Preset(
            name="langreach-smolvlm-ppo",
            algorithm="ppo",
            env="vla_ray/LangReach-v0",
            description=(
                "PPO on LangReach with an integrated VLM trunk (SmolVLM architecture; a small "
                "config here, --set model.vlm_path=DIR for a real checkpoint)"
            ),
            model=dict(
                backbone="vlm",
                vlm_family="smolvlm",
                head="gaussian",
                head_config={"init_log_std": -1.0},
                value="shared",
            ),
            training=dict(LANGREACH_PPO_TRAINING),
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
            name="langreach-bc-multicam",
            algorithm="bc",
            env="vla_ray/LangReach-v0",
            description=(
                "behaviour cloning on two cameras (top-down and side view; LeRobot multi-camera "
                "data): each camera through the shared CNN, its tokens tagged by camera"
            ),
            env_config=dict(num_cameras=2),
            model=dict(TINY_VLA, vision_skip=True, head="gaussian", value="none", num_cameras=2),
            training=dict(lr=1e-3, train_batch_size_per_learner=256),
            env_runners=dict(num_env_runners=0, num_envs_per_env_runner=4),
            stop=dict(iters=500),
            eval_episodes=20,
        ),
        Preset(
            name="langreach-bc-chunk",
            algorithm="bc",
            env="vla_ray/LangReach-v0",
            description=(
                "behaviour cloning of LangReach demos with chunks of 8 actions (executed open "
                "loop; vla-ray eval --temporal-ensemble for ACT's ensembling)"
            ),
            model=dict(TINY_VLA, vision_skip=True, head="gaussian", value="none", chunk_size=8),
            training=dict(lr=1e-3, train_batch_size_per_learner=256),
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
        Preset(
            name="langreach-grpo",
            algorithm="grpo",
            env="vla_ray/LangReach-v0",
            description="GRPO (groups of episodes per reset seed, KL to the start policy); "
            "start from a BC/PPO run with --set model.pretrained_path=RUN_DIR",
            model=dict(
                TINY_VLA,
                vision_skip=True,
                head="gaussian",
                head_config={"init_log_std": -1.0},
                value="none",
            ),
            # Per-step credit (process advantage on the shaped reward) and PPO's penalty on
            # each iteration's step: with the paper's outcome advantage and no step penalty,
            # GRPO did not improve LangReach from any start (docs/benchmarks.md).
            training=dict(
                lr=1e-4,
                group_size=8,
                groups_per_iteration=8,
                reward_kind="return",
                advantage="process",
                step_kl_coeff=0.5,
                clip_param=0.2,
                kl_coeff=0.04,
                num_epochs=4,
                minibatch_size=256,
            ),
            env_runners=dict(num_env_runners=2, num_envs_per_env_runner=8),
            stop=dict(iters=100),
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
            # Diffusion Policy's setting: chunks of 8 actions, executed open loop
            Preset(
                name="pusht-diffusion",
                algorithm="bc",
                env="vla_ray/PushT-v0",
                description="diffusion-policy BC of PushT demos, chunks of 8 actions",
                model=dict(
                    TINY_VLA, vision_skip=True, head="diffusion", value="none", chunk_size=8
                ),
                training=dict(lr=1e-3, train_batch_size_per_learner=256),
                env_runners=dict(num_env_runners=0, num_envs_per_env_runner=4),
                stop=dict(iters=2000),
                eval_episodes=20,
            ),
        ]
    }
)


# -- SAC family (SAC online; CQL, IQL offline) with the VLA policy and VLA-trunk critics ---------
# State-only envs build the VLA with vision="none" (instruction + proprioceptive state).
SAC_PRESETS = [
    Preset(
        name="pendulum-sac",
        algorithm="sac",
        env="vla_ray/Pendulum-v1",
        description="SAC on Pendulum from state + instruction (small and quick to try)",
        model=dict(head="tanh_gaussian", q_hidden=128),
        training=dict(
            actor_lr=1e-3,
            critic_lr=1e-3,
            alpha_lr=1e-3,
            train_batch_size_per_learner=128,
            num_steps_sampled_before_learning_starts=500,
        ),
        env_runners=dict(num_env_runners=0, num_envs_per_env_runner=1),
        stop=dict(timesteps=10_000),
        eval_episodes=10,
    ),
    Preset(
        name="halfcheetah-sac",
        algorithm="sac",
        env="vla_ray/HalfCheetah-v5",
        description="SAC on HalfCheetah-v5 from state + instruction (SB3-zoo settings)",
        model=dict(head="tanh_gaussian", q_hidden=256),
        training=dict(num_steps_sampled_before_learning_starts=10_000),
        env_runners=dict(num_env_runners=0, num_envs_per_env_runner=1),
        stop=dict(timesteps=1_000_000),
        eval_episodes=10,
    ),
    Preset(
        name="langreach-sac",
        algorithm="sac",
        env="vla_ray/LangReach-v0",
        description="SAC on LangReach from 64x64 pixels + instruction (tiny CNN/Qwen2 VLA)",
        model=dict(TINY_VLA, vision_skip=True, head="tanh_gaussian", q_hidden=256),
        training=dict(gamma=0.9, num_steps_sampled_before_learning_starts=2000),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=4),
        stop=dict(timesteps=200_000),
    ),
    Preset(
        name="hopper-iql",
        algorithm="iql",
        env="vla_ray/Hopper-v5",
        description="IQL on Hopper data (vla-ray collect --env vla_ray/Hopper-v5 ...; --data)",
        model=dict(head="tanh_gaussian", q_hidden=256),
        env_runners=dict(num_env_runners=0, num_envs_per_env_runner=1),
        stop=dict(iters=2000),
        eval_episodes=10,
    ),
    Preset(
        name="hopper-cql",
        algorithm="cql",
        env="vla_ray/Hopper-v5",
        description="CQL on Hopper data (vla-ray collect --env vla_ray/Hopper-v5 ...; --data)",
        model=dict(head="tanh_gaussian", q_hidden=256),
        env_runners=dict(num_env_runners=0, num_envs_per_env_runner=1),
        stop=dict(iters=2000),
        eval_episodes=10,
    ),
]
PRESETS.update({p.name: p for p in SAC_PRESETS})

# A SAC task small enough to learn in about a minute on 2 CPUs (the SAC learning test): one-target
# LangReach from state (the target's position is in the state), short episodes, a 1-layer
# hidden-32 Qwen2-style LM; the shaped reward scores each step's progress, so a short credit
# horizon (gamma 0.8) suffices.
TINY_STATE_LM: dict[str, Any] = dict(
    num_hidden_layers=1,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
)
PRESETS["langreach-state-sac"] = Preset(
    name="langreach-state-sac",
    algorithm="sac",
    env="vla_ray/LangReachState-v0",
    description="SAC on one-target LangReach from state + instruction (learns in ~1 min on CPU)",
    env_config=dict(num_targets=1, max_episode_steps=20),
    model=dict(STATE_VLA, head="tanh_gaussian", q_hidden=64, llm_config=TINY_STATE_LM),
    training=dict(
        actor_lr=3e-3,
        critic_lr=3e-3,
        alpha_lr=3e-3,
        gamma=0.8,
        initial_alpha=0.2,
        train_batch_size_per_learner=64,
        num_steps_sampled_before_learning_starts=100,
    ),
    env_runners=dict(num_env_runners=0, num_envs_per_env_runner=1),
    stop=dict(timesteps=1000),
    eval_episodes=20,
)


# The pi0-style flow-matching head on the same PushT setting as pusht-diffusion.
PRESETS["pusht-flow"] = replace(
    PRESETS["pusht-diffusion"],
    name="pusht-flow",
    description="flow-matching BC (pi0-style head) of PushT demos, chunks of 8",
    model={**PRESETS["pusht-diffusion"].model, "head": "flow_matching"},
    training=copy.deepcopy(PRESETS["pusht-diffusion"].training),
    env_runners=copy.deepcopy(PRESETS["pusht-diffusion"].env_runners),
    stop=copy.deepcopy(PRESETS["pusht-diffusion"].stop),
)


# GRPO fine-tuning with LoRA (issue 25): adapters (r=8) on the language model's attention and MLP
# projections; the CNN, projector, state projection, action query and head train fully. The KL
# reference is the same module with adapters off (no second copy of the model). The loss is the
# recipe that raised a weak 64-px BC start by 43-78 points on three seeds (docs/benchmarks.md,
# "GRPO with LoRA ... fifth attempt"): per-step return-to-go advantages discounted by 0.5 (the
# shaped reward scores each step's progress), groups of 2 episodes x 32 reset seeds, lr 3e-4.
# Until 2026-12-07 the preset froze the CNN and used langreach-grpo's loss (lr 1e-4, `process`,
# 8 x 8 groups): the earlier attempts' sections say how to rerun them.
LORA_GRPO_RECIPE: dict[str, Any] = dict(
    lr=3e-4,
    advantage="return_to_go",
    advantage_gamma=0.5,
    group_size=2,
    groups_per_iteration=32,
)
PRESETS["langreach-lora-grpo"] = replace(
    PRESETS["langreach-grpo"],
    name="langreach-lora-grpo",
    description="GRPO with LoRA adapters on the LM; start from a BC/PPO run "
    "with --set model.pretrained_path=RUN_DIR",
    model={**copy.deepcopy(PRESETS["langreach-grpo"].model), "lora": {"r": 8}},
    training=dict(copy.deepcopy(PRESETS["langreach-grpo"].training), **LORA_GRPO_RECIPE),
)


# The language half of LangReach alone: the target positions are in the state, so PPO only has
# to ground the colour word (the pixel preset's diagnostic; learns in about a minute on CPU).
_STATE_GAUSSIAN = dict(STATE_VLA, head="gaussian", head_config={"init_log_std": -1.0})
PRESETS["langreach-state-ppo"] = Preset(
    name="langreach-state-ppo",
    algorithm="ppo",
    env="vla_ray/LangReachState-v0",
    description="PPO on three-target LangReach from state + instruction (no pixels; ~1 min)",
    model=dict(_STATE_GAUSSIAN, value="shared"),
    training=copy.deepcopy(PRESETS["langreach-ppo"].training),
    env_runners=dict(num_env_runners=2, num_envs_per_env_runner=8),
    stop=dict(timesteps=200_000),
)


# LoRA RL on the same language half (issue 25): with the targets' positions in the state,
# reaching the instructed target is grounding the colour word, which is what the LM (and so its
# LoRA adapters) carries. A weak start is a short BC run on noisy demos (langreach-state-bc);
# GRPO then trains the adapters, projector, state projection, query tokens and head.
PRESETS["langreach-state-bc"] = replace(
    PRESETS["langreach-bc"],
    name="langreach-state-bc",
    env="vla_ray/LangReachState-v0",
    description="behaviour cloning of three-target LangReach demos from state + instruction",
    model=dict(_STATE_GAUSSIAN, value="none"),
)
PRESETS["langreach-state-lora-grpo"] = replace(
    PRESETS["langreach-lora-grpo"],
    name="langreach-state-lora-grpo",
    env="vla_ray/LangReachState-v0",
    description="GRPO with LoRA adapters on the LM, three-target LangReach from state + "
    "instruction; start from a BC run with --set model.pretrained_path=RUN_DIR",
    model=dict(_STATE_GAUSSIAN, value="none", lora={"r": 8}),
    # the recipe was found here first: docs/benchmarks.md, "GRPO with LoRA ... state"
    training=copy.deepcopy(PRESETS["langreach-lora-grpo"].training),
)


def lagrangian_variant(base: str, rules: str, description: str, cost_limit: float = 1.0) -> Preset:
    """Preset ``BASE-lag``: ``base`` (a PPO preset) as PPO-Lagrangian, the ``rules`` file's
    interventions as the safety cost kept under ``cost_limit`` per episode."""
    p = PRESETS[base]
    return replace(
        p,
        name=f"{base}-lag",
        algorithm="ppo_lag",
        description=description,
        env_config={**copy.deepcopy(p.env_config), SAFETY_KEY: rules},
        training=dict(copy.deepcopy(p.training), cost_limit=cost_limit),
    )


# The same with a keep-out disc at the arena's centre counted as a safety cost (monitor mode:
# actions unchanged) and PPO-Lagrangian keeping the cost per episode under cost_limit.
PRESETS["langreach-state-ppo-lag"] = lagrangian_variant(
    "langreach-state-ppo",
    "envs/safety/langreach_keepout.yaml",
    "PPO-Lagrangian on state LangReach with a keep-out disc (safety cost)",
)

# Model-based RL (issue 27): DreamerV3-style world model whose encoder is the VLA trunk (the
# langreach-ppo model's vision/projector/LM), imagination actor-critic; 32x32 pixels keep the
# image decoder cheap on CPU. Not yet tuned for learning (docs/benchmarks.md).
PRESETS["langreach-dreamer"] = Preset(
    name="langreach-dreamer",
    algorithm="dreamer",
    env="vla_ray/LangReach-v0",
    description="VLA-Dreamer on LangReach: RSSM world model over the VLA trunk + imagination",
    env_config={"image_size": 32},
    model=dict(
        TINY_VLA,
        world_model=dict(deter=128, stoch=16, classes=16, hidden=128, horizon=15),
    ),
    training=dict(
        lr=3e-4,
        actor_lr=3e-5,
        critic_lr=3e-5,
        batch_size_B=16,
        batch_length_T=16,
        train_batch_size_per_learner=64,
        updates_per_iteration=4,
    ),
    env_runners=dict(num_env_runners=2, num_envs_per_env_runner=4),
    stop=dict(timesteps=100_000),
)
# the two locomotion Dreamer presets' learning settings (DreamerV3's learning rates; not tuned)
DREAMER_LOCOMOTION_TRAINING = dict(
    lr=3e-4,
    actor_lr=3e-5,
    critic_lr=3e-5,
    batch_size_B=16,
    batch_length_T=32,
    train_batch_size_per_learner=64,
    updates_per_iteration=2,
)
DREAMER_LOCOMOTION_WORLD_MODEL = dict(deter=128, stoch=16, classes=16, hidden=128, horizon=15)
# Locomotion from pixels alone (the DMC-vision setting of DreamerV3): 64x64 renders of
# HalfCheetah, no proprioception in the observation, so the world model decodes only the image.
PRESETS["halfcheetah-pixels-dreamer"] = Preset(
    name="halfcheetah-pixels-dreamer",
    algorithm="dreamer",
    env="vla_ray/HalfCheetahPixels-v5",
    description="VLA-Dreamer on HalfCheetah from 64x64 pixels only (image decoder; not tuned)",
    env_config={"image_size": [64, 64], "include_state": False},
    model=dict(
        TINY_VLA,
        world_model=dict(DREAMER_LOCOMOTION_WORLD_MODEL, decode=["image"]),
    ),
    training=dict(DREAMER_LOCOMOTION_TRAINING),
    env_runners=dict(num_env_runners=1, num_envs_per_env_runner=4),
    stop=dict(timesteps=500_000),
    eval_episodes=10,
)
# The state-only variant: Hopper from proprioception + instruction (vision="none" is automatic
# for a state-only env); the world model decodes the state (symlog MSE) and predicts Hopper's
# terminations with its continuation head.
PRESETS["hopper-dreamer"] = Preset(
    name="hopper-dreamer",
    algorithm="dreamer",
    env="vla_ray/Hopper-v5",
    description="VLA-Dreamer on Hopper-v5 from state + instruction (state decoder; not tuned)",
    model=dict(world_model=dict(DREAMER_LOCOMOTION_WORLD_MODEL, decode=["state"])),
    training=dict(DREAMER_LOCOMOTION_TRAINING),
    env_runners=dict(num_env_runners=1, num_envs_per_env_runner=4),
    stop=dict(timesteps=500_000),
    eval_episodes=10,
)


# --- environments at scale (issue 3): MuJoCo state-only PPO, PushT, highway-env, CARLA ----------
# RLlib's restart options, stated in every preset below (vla_ray.scale applies the same defaults
# to every run): a dead EnvRunner is restarted by Ray and training goes on with the others; a
# sub-environment that raises is recreated and its episode dropped.
FAULT_TOLERANT: dict[str, Any] = dict(
    restart_failed_env_runners=True,
    restart_failed_sub_environments=True,
    max_num_env_runner_restarts=1000,
)
# PPO for MuJoCo locomotion from proprioception (the usual SB3/CleanRL settings). The VLA has no
# vision (vision="none", automatic for state-only envs): instruction + state -> LM -> Gaussian.
# No observation normalisation: RLlib's MeanStdFilter would also rescale the instruction token
# ids of the Dict observation, and its statistics live in the connector, not in the exported VLA.
MUJOCO_PPO: dict[str, Any] = dict(
    lr=3e-4,
    gamma=0.99,
    lambda_=0.95,
    clip_param=0.2,
    num_epochs=10,
    entropy_coeff=0.0,
    # returns reach the thousands: do not clip the value loss at 10
    vf_clip_param=1e4,
    grad_clip=0.5,
)
STATE_VLA: dict[str, Any] = dict(
    vision="none", head="gaussian", head_config={"init_log_std": -0.5}, value="separate"
)
_SCALE_PRESETS = [
    Preset(
        name="hopper-ppo",
        algorithm="ppo",
        env="vla_ray/Hopper-v5",
        description="PPO on Hopper-v5 from proprioception + instruction (state-only VLA)",
        model=dict(STATE_VLA),
        training=dict(MUJOCO_PPO, train_batch_size_per_learner=2048, minibatch_size=64),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=4),
        stop=dict(timesteps=1_000_000),
        fault_tolerance=dict(FAULT_TOLERANT),
        eval_episodes=10,
    ),
    Preset(
        name="halfcheetah-ppo",
        algorithm="ppo",
        env="vla_ray/HalfCheetah-v5",
        description="PPO on HalfCheetah-v5 from proprioception + instruction (state-only VLA)",
        model=dict(STATE_VLA),
        training=dict(MUJOCO_PPO, train_batch_size_per_learner=2048, minibatch_size=64),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=4),
        stop=dict(timesteps=1_000_000),
        fault_tolerance=dict(FAULT_TOLERANT),
        eval_episodes=10,
    ),
    Preset(
        name="humanoid-ppo",
        algorithm="ppo",
        env="vla_ray/Humanoid-v5",
        description="PPO on Humanoid-v5 from proprioception + instruction (state-only VLA)",
        model=dict(STATE_VLA),
        training=dict(MUJOCO_PPO, train_batch_size_per_learner=4096, minibatch_size=256),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=8),
        stop=dict(timesteps=10_000_000),
        fault_tolerance=dict(FAULT_TOLERANT),
        eval_episodes=10,
    ),
    Preset(
        name="pusht-ppo",
        algorithm="ppo",
        env="vla_ray/PushT-v0",
        description="PPO on PushT (gym-pusht) from 96x96 pixels + agent position (tiny VLA)",
        env_config=dict(image_size=96),
        model=dict(TINY_VLA, vision_skip=True, head="gaussian", head_config={"init_log_std": -1.0}),
        training=dict(
            lr=3e-4,
            gamma=0.99,
            lambda_=0.95,
            train_batch_size_per_learner=4096,
            minibatch_size=256,
            num_epochs=4,
            entropy_coeff=0.0,
        ),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=8),
        stop=dict(timesteps=2_000_000),
        fault_tolerance=dict(FAULT_TOLERANT),
        eval_episodes=20,
    ),
    Preset(
        name="highway-ppo",
        algorithm="ppo",
        env="vla_ray/Highway-v0",
        description="PPO driving on highway-env: RGB camera + kinematics, continuous control",
        model=dict(TINY_VLA, vision_skip=True, head="gaussian", head_config={"init_log_std": -1.0}),
        training=dict(
            lr=3e-4,
            gamma=0.99,
            lambda_=0.95,
            train_batch_size_per_learner=2048,
            minibatch_size=256,
            num_epochs=5,
            entropy_coeff=0.0,
        ),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=4),
        stop=dict(timesteps=1_000_000),
        fault_tolerance=dict(FAULT_TOLERANT),
        eval_episodes=20,
    ),
    Preset(
        name="highway-sac",
        algorithm="sac",
        # kinematics state (no camera): SAC's replay buffer then holds small observations
        env="vla_ray/HighwayState-v0",
        description="SAC driving on highway-env from kinematics + instruction (state-only VLA)",
        model=dict(vision="none", head="tanh_gaussian"),
        training=dict(
            gamma=0.99,
            actor_lr=3e-4,
            critic_lr=3e-4,
            alpha_lr=3e-4,
            train_batch_size_per_learner=256,
            num_steps_sampled_before_learning_starts=2000,
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": 200_000},
        ),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=1),
        stop=dict(timesteps=500_000),
        fault_tolerance=dict(FAULT_TOLERANT),
        eval_episodes=20,
    ),
    Preset(
        name="carla-ppo",
        algorithm="ppo",
        env="vla_ray/Carla-v0",
        description="PPO driving in CARLA (server at $CARLA_HOST:$CARLA_PORT): camera + route",
        model=dict(TINY_VLA, vision_skip=True, head="gaussian", head_config={"init_log_std": -1.0}),
        training=dict(
            lr=3e-4,
            gamma=0.99,
            lambda_=0.95,
            train_batch_size_per_learner=2048,
            minibatch_size=128,
            num_epochs=4,
            entropy_coeff=0.0,
        ),
        # one synchronous CARLA world can be ticked by one client: one env on one EnvRunner
        env_runners=dict(num_env_runners=1, num_envs_per_env_runner=1, sample_timeout_s=600.0),
        stop=dict(timesteps=1_000_000),
        # a CARLA server that stalls or crashes takes its EnvRunner with it: restart it
        fault_tolerance=dict(FAULT_TOLERANT, env_runner_health_probe_timeout_s=120.0),
        eval_episodes=10,
    ),
]
PRESETS.update({p.name: p for p in _SCALE_PRESETS})

# Constrained driving (issue 29): highway-env from kinematics + instruction, near misses (time to
# collision under 1.5 s with the nearest car) counted as a safety cost; plain PPO and
# PPO-Lagrangian keeping the near misses per episode under cost_limit.
PRESETS["highway-state-ppo"] = replace(
    PRESETS["highway-ppo"],
    name="highway-state-ppo",
    env="vla_ray/HighwayState-v0",
    description="PPO driving on highway-env from kinematics + instruction (state-only VLA)",
    model=dict(vision="none", head="gaussian", head_config={"init_log_std": -1.0}),
    training=copy.deepcopy(PRESETS["highway-ppo"].training),
    env_runners=copy.deepcopy(PRESETS["highway-ppo"].env_runners),
    stop=dict(timesteps=100_000),
)
PRESETS["highway-state-ppo-lag"] = lagrangian_variant(
    "highway-state-ppo",
    "envs/safety/highway_cost.yaml",
    "PPO-Lagrangian on highway-env (kinematics): near misses as the safety cost",
)


# --- language-routed driving (issue 26): LangDrive, waypoint actions, fused sensors -----------
# The env acts in waypoint space: 4 ego-frame (x, y) waypoints + a target speed, turned into
# throttle/steer by the env's pure-pursuit/PID controller. The `gaussian` head over those
# 2 K + 1 numbers is the waypoint head (RLlib clips to the [-1, 1] box).
LANGDRIVE_ENV: dict[str, Any] = dict(action="waypoints", waypoints=4, waypoint_speed=True)
# camera (tiny CNN) + 2-D LiDAR (PointNet) + IMU window + ego signals, fused by learned per-sensor
# gates with sensor dropout (a failed sensor degrades the policy rather than breaking it)
LANGDRIVE_SENSORS: dict[str, Any] = dict(
    sensors={"lidar": {"encoder": "pointnet"}, "imu": {"encoder": "mlp"}, "ego": {}},
    fusion="gated",
    fusion_config={"sensor_dropout": 0.1},
)
LANGDRIVE_VLA: dict[str, Any] = dict(TINY_VLA, vision_skip=True, **LANGDRIVE_SENSORS)
_LANGDRIVE_PRESETS = [
    Preset(
        name="langdrive-bc",
        algorithm="bc",
        env="vla_ray/LangDrive-v0",
        description="behaviour cloning of LangDrive expert demos (vla-ray collect) in waypoint "
        "space; camera + LiDAR + IMU + ego, gated fusion",
        env_config=dict(LANGDRIVE_ENV),
        model=dict(LANGDRIVE_VLA, head="gaussian", value="none"),
        training=dict(lr=1e-3, train_batch_size_per_learner=256),
        env_runners=dict(num_env_runners=0, num_envs_per_env_runner=4),
        stop=dict(iters=500),
        eval_episodes=20,
    ),
    Preset(
        name="langdrive-dagger",
        algorithm="dagger",
        env="vla_ray/LangDrive-v0",
        description="DAgger on LangDrive with the scripted expert relabelling every visited state",
        env_config=dict(LANGDRIVE_ENV, expert_beta=1.0),
        model=dict(LANGDRIVE_VLA, head="gaussian", value="none"),
        training=dict(lr=1e-3, rollout_steps=1000, updates_per_iteration=50),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=4),
        stop=dict(iters=30),
        eval_episodes=20,
    ),
    Preset(
        name="langdrive-ppo",
        algorithm="ppo",
        env="vla_ray/LangDrive-v0",
        description="PPO on LangDrive in waypoint space (fused sensors); start from a BC/DAgger "
        "run with --set model.pretrained_path=RUN_DIR",
        env_config=dict(LANGDRIVE_ENV),
        model=dict(
            LANGDRIVE_VLA, head="gaussian", head_config={"init_log_std": -1.0}, value="shared"
        ),
        training=dict(
            lr=3e-4,
            gamma=0.95,
            lambda_=0.9,
            train_batch_size_per_learner=2048,
            minibatch_size=256,
            num_epochs=4,
            entropy_coeff=0.0,
            vf_loss_coeff=0.01,
        ),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=4),
        stop=dict(timesteps=500_000),
        fault_tolerance=dict(FAULT_TOLERANT),
        eval_episodes=30,
    ),
    Preset(
        name="langdrive-sac",
        algorithm="sac",
        # no camera: SAC's replay buffer then holds small observations (LiDAR, IMU, ego, state)
        env="vla_ray/LangDriveState-v0",
        description="SAC on LangDrive without the camera (LiDAR + IMU + ego + state, gated "
        "fusion) in waypoint space",
        env_config=dict(LANGDRIVE_ENV),
        model=dict(vision="none", head="tanh_gaussian", q_hidden=256, **LANGDRIVE_SENSORS),
        training=dict(
            gamma=0.95,
            actor_lr=3e-4,
            critic_lr=3e-4,
            alpha_lr=3e-4,
            train_batch_size_per_learner=256,
            num_steps_sampled_before_learning_starts=2000,
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": 200_000},
        ),
        env_runners=dict(num_env_runners=2, num_envs_per_env_runner=1),
        stop=dict(timesteps=300_000),
        fault_tolerance=dict(FAULT_TOLERANT),
        eval_episodes=30,
    ),
]
PRESETS.update({p.name: p for p in _LANGDRIVE_PRESETS})


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; valid names are {', '.join(PRESETS)}")
    return PRESETS[name]
