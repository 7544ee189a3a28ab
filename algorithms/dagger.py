"""DAgger (Ross et al., 2011) as an RLlib algorithm with the VLA module.

Each iteration: roll out on the EnvRunners, where every step is taken by the expert with
probability ``beta`` (decaying by ``beta_decay`` per iteration) and by the current policy
otherwise; relabel every visited state with the expert's action (the env reports it as
``info["expert_action"]``); add the relabelled steps to the aggregate dataset (RLlib's
``EpisodeReplayBuffer``, oldest episodes evicted beyond ``max_dataset_steps``); take
``updates_per_iteration`` gradient steps, each on ``train_batch_size_per_learner`` steps drawn
uniformly from the whole aggregate, with the head's behaviour-cloning loss; sync the weights.

Expert demonstrations can seed the aggregate (``vla-ray train --preset langreach-dagger --data
DEMOS``, any format ``--data`` reads): the first iteration then trains on them before it rolls
out, so the first rollouts are the BC policy's (``pi_1`` of Ross et al.), and ``training.beta=0``
makes every later visited state the learner's own.

The expert (``training.expert``, ``vla-ray train --expert``) is the env's privileged scripted
expert (``"env"``, the default; ``vla_ray.envs.experts``), a checkpoint directory (a saved VLA or
an RLlib checkpoint, acting deterministically) or a Python callable ``"module:function"`` taking
one observation and returning an action. The env is wrapped in ``ExpertMixing`` through
``env_config["expert_beta"]`` and ``env_config["expert"]``, set by the algorithm.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
)
from ray.rllib.utils.replay_buffers.episode_replay_buffer import EpisodeReplayBuffer

from vla_ray.algorithm_spec import VLAAlgorithmConfig
from vla_ray.algorithms.bc import VLABCLearner
from vla_ray.config import ACTION_HEADS
from vla_ray.data.chunks import chunk_episode, with_chunk_actions
from vla_ray.env_factory import EXPERT_MIXING_WRAPPER, EnvWrapper
from vla_ray.envs.chunking import EXPERT_CHUNK_KEY, EXPERT_MASK_KEY

EXPERT_LABEL = "expert_action"


# -- config -------------------------------------------------------------------------------------
class DAggerConfig(VLAAlgorithmConfig, AlgorithmConfig):
    """DAgger settings: beta schedule, rollout size, updates per iteration, dataset cap, demos,
    expert; the caller adds env, module and runners."""

    NAME: ClassVar[str] = "dagger"
    HEADS: ClassVar[tuple[str, ...]] = ACTION_HEADS
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="gaussian", value="none")
    # Training episodes mix in the expert: success is measured on evaluation episodes instead.
    EVALUATES: ClassVar[bool] = True
    # ``--data`` is optional: expert demos that seed the aggregate dataset.
    ACCEPTS_DATA: ClassVar[bool] = True
    # ``model.chunk_size`` K > 1: demos are windowed (``vla_ray.data.chunks``); rollouts run
    # chunks through ``ExecuteChunk``, and a state's label is the expert's action at each state
    # the chunk visited (``expert_action_chunk``, masked past the episode's end or the executed
    # steps)
    ACTION_CHUNKS: ClassVar[bool] = True
    # ``env.expert_beta`` wraps the env in ExpertMixing (``env.expert`` names its expert)
    ENV_WRAPPERS: ClassVar[tuple[EnvWrapper, ...]] = (EXPERT_MIXING_WRAPPER,)

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or DAgger)
        # RLlib episode parquet files that seed the aggregate (``--data``; see ``use_data``)
        self.demos: list[str] | None = None
        # the EnvRunners' envs are wrapped in ExpertMixing (the algorithm sets its beta)
        self.env_config = {"expert_beta": 1.0}
        self.set_training_defaults(
            lr=1e-3,
            train_batch_size_per_learner=256,
            grad_clip=1.0,
            beta=1.0,
            beta_decay=0.5,
            rollout_steps=1000,
            updates_per_iteration=50,
            max_dataset_steps=200_000,
            # who labels (and, with probability beta, acts): see the module docstring
            expert="env",
        )

    def training(
        self,
        *,
        beta: float = NotProvided,
        beta_decay: float = NotProvided,
        rollout_steps: int = NotProvided,
        updates_per_iteration: int = NotProvided,
        max_dataset_steps: int = NotProvided,
        demos: list[str] | None = NotProvided,
        expert: str = NotProvided,
        **kwargs,
    ) -> DAggerConfig:
        super().training(**kwargs)
        if expert is not NotProvided:
            # the EnvRunners' ExpertMixing wrapper builds the expert from the env config
            self.env_config = {**self.env_config, "expert": expert}
        for name, value in dict(
            beta=beta,
            beta_decay=beta_decay,
            rollout_steps=rollout_steps,
            updates_per_iteration=updates_per_iteration,
            max_dataset_steps=max_dataset_steps,
            demos=demos,
            expert=expert,
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.beta <= 1.0:
            self._value_error(f"beta: must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.beta_decay <= 1.0:
            self._value_error(f"beta_decay: must be in [0, 1], got {self.beta_decay}")
        for name in ("rollout_steps", "updates_per_iteration", "max_dataset_steps"):
            if int(getattr(self, name)) < 1:
                self._value_error(f"{name}: must be >= 1, got {getattr(self, name)}")
        from vla_ray.envs.experts import check_expert_spec

        env_id = self.env if isinstance(self.env, str) else None
        check_expert_spec(self.expert, env_id)  # ExpertError naming the setting

    def get_default_learner_class(self):
        return VLABCLearner

    def use_data(self, data: str | None, val_fraction: float = 0.0) -> None:
        """``--data`` (optional): expert demos that seed the aggregate, in any format
        ``--data`` reads (converted once to RLlib episodes)."""
        if not data:
            return
        from vla_ray.data.convert import offline_input

        self.training(demos=offline_input(data, self.env, self.env_config))

    def evaluation_env_config(self, env_config: dict[str, Any]) -> dict[str, Any]:
        """Evaluation episodes are the policy's alone (no expert actions, no expert to load)."""
        return {**env_config, "expert_beta": 0.0, "expert": "env"}


# -- relabelling and the aggregate dataset --------------------------------------------------------
def relabel(episode: SingleAgentEpisode) -> SingleAgentEpisode:
    """The episode's visited states with the expert's actions as the actions (for BC); for
    chunks, the expert's labels along each executed chunk, with their masks."""
    n = len(episode)
    infos = episode.get_infos()  # n + 1: info of every observation
    if n and EXPERT_CHUNK_KEY in infos[1]:  # macro-steps of ExecuteChunk: labels of obs t at t+1
        labels = np.stack(
            [np.asarray(infos[t + 1][EXPERT_CHUNK_KEY], np.float32) for t in range(n)]
        )
        masks = np.stack([np.asarray(infos[t + 1][EXPERT_MASK_KEY], np.float32) for t in range(n)])
        return with_chunk_actions(episode, labels, masks)
    try:
        labels = np.stack([np.asarray(infos[t][EXPERT_LABEL], np.float32) for t in range(n)])
    except KeyError:
        raise ValueError(
            f"DAgger: the env must report info[{EXPERT_LABEL!r}] (the expert's action) at reset "
            "and every step"
        ) from None
    obs = episode.get_observations()  # n + 1 observations (dict of arrays for Dict spaces)
    if isinstance(obs, dict):
        observations = [{k: np.asarray(v[t]) for k, v in obs.items()} for t in range(n + 1)]
    else:
        observations = list(obs)
    out = SingleAgentEpisode(
        observations=observations,
        actions=list(labels),
        rewards=list(episode.get_rewards()),
        infos=[{} for _ in range(n + 1)],
        terminated=episode.is_terminated,
        truncated=episode.is_truncated,
        len_lookback_buffer=0,
        observation_space=episode.observation_space,
        action_space=episode.action_space,
    )
    return out.to_numpy()


def _single_step_space(space, size: int):
    """The env's own action space behind the chunk space of ``ExecuteChunk``."""
    if size == 1:
        return space
    import gymnasium as gym

    dim = space.shape[0] // size
    return gym.spaces.Box(space.low[:dim], space.high[:dim], dtype=space.dtype)


def beta_at(iteration: int, beta: float, decay: float) -> float:
    """The expert's share of the actions at ``iteration`` (0-based): ``beta * decay**i``."""
    return float(beta * decay**iteration)


# -- training step ------------------------------------------------------------------------------
class DAgger(Algorithm):
    """Dataset aggregation with an expert that labels every visited state."""

    @classmethod
    def get_default_config(cls) -> DAggerConfig:
        return DAggerConfig()

    def setup(self, config) -> None:
        super().setup(config)
        # the aggregate: every relabelled step, sampled uniformly by step
        self._dataset = EpisodeReplayBuffer(capacity=int(self.config.max_dataset_steps))
        self._dataset.rng = np.random.default_rng(self.config.seed)
        self._pretrain = False
        if self.config.demos:
            from vla_ray.data.rllib_format import check_episodes, read_episodes

            demos = [ep for f in self.config.demos for ep in read_episodes(f)]
            obs_space, act_space = self.spaces[DEFAULT_MODULE_ID]
            demos = [ep.to_numpy() if not ep.is_numpy else ep for ep in demos]
            # the demos' single actions against the module's chunks (ExecuteChunk's space)
            size = max(1, act_space.shape[0] // np.asarray(demos[0].get_actions()).shape[-1])
            check_episodes(demos, obs_space, _single_step_space(act_space, size))
            self._dataset.add([chunk_episode(ep, size) if size > 1 else ep for ep in demos])
            self._pretrain = True  # the first iteration trains on the demos before rolling out

    def _set_beta(self, beta: float) -> None:
        def set_beta(runner):
            if runner.env is not None:  # the local runner has no env when remote ones sample
                runner.env.env.set_attr("expert_beta", beta)

        self.env_runner_group.foreach_env_runner(set_beta, local_env_runner=True)

    def _train(self, updates: int) -> None:
        """``updates`` gradient steps, each on a batch of steps drawn from the aggregate."""
        batch_size = int(self.config.train_batch_size_per_learner)
        for _ in range(updates):
            batch = self._dataset.sample(
                num_items=batch_size, n_step=1, sample_episodes=True, to_numpy=True
            )
            results = self.learner_group.update(
                episodes=batch,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0
                    )
                },
                num_epochs=1,
                minibatch_size=batch_size,
            )
            self.metrics.aggregate(results, key=LEARNER_RESULTS)
        self.env_runner_group.sync_weights(
            from_worker_or_learner_group=self.learner_group, inference_only=True
        )

    def training_step(self) -> None:
        cfg = self.config
        if self._pretrain:  # pi_1: behaviour cloning of the demos (not again when resumed)
            self._pretrain = False
            if self.iteration == 0:
                self._train(int(cfg.updates_per_iteration))
        beta = beta_at(self.iteration, cfg.beta, cfg.beta_decay)
        self._set_beta(beta)
        episodes, runner_results = synchronous_parallel_sample(
            worker_set=self.env_runner_group,
            max_env_steps=cfg.rollout_steps,
            sample_timeout_s=cfg.sample_timeout_s,
            _uses_new_env_runners=True,
            _return_metrics=True,
        )
        if not episodes:
            return
        self.metrics.aggregate(runner_results, key=ENV_RUNNER_RESULTS)
        self.metrics.log_value("expert_beta", beta, window=1)
        self._dataset.add([relabel(ep) for ep in episodes if len(ep) > 0])
        self.metrics.log_value("dataset_steps", self._dataset.get_num_timesteps(), window=1)
        self._train(int(cfg.updates_per_iteration))
