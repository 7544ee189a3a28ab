"""GRPO (Group Relative Policy Optimization, Shao et al. 2024) as an RLlib algorithm.

RLlib ships no GRPO; this file is one: config, group seeding, advantages, loss, training step.

Each iteration
  1. draws ``groups_per_iteration`` reset seeds and schedules ``group_size`` episodes for each;
  2. samples exactly those episodes on the EnvRunners (every episode of a group starts from the
     same reset seed, hence the same layout, goal and instruction);
  3. scores each episode (``reward_kind="return"``: its undiscounted return; ``"success"``: 1.0
     when the env's final ``info["is_success"]`` is true, else 0.0) and normalises the scores
     within each group: ``A = (score - mean_group) / (std_group + 1e-6)`` (population std; a
     group whose scores are all equal gets A = 0). Every step of an episode gets its A
     (``advantage="outcome"``, the default). With ``advantage="process"`` (DeepSeekMath's
     process supervision, section 4.1.3; needs ``reward_kind="return"``) every step reward is
     normalised by the mean and std of all step rewards of its group, and a step's advantage is
     the sum of the normalised rewards from that step to the episode's end: per-step credit for
     envs with dense rewards, still without a value function. ``advantage="return_to_go"``
     (also needs ``reward_kind="return"``): a step's return-to-go minus the mean return-to-go
     of its group's episodes still running at the same step index (a per-step baseline, as
     RLOO's per-prompt one), scaled by the group's std of these differences: the process
     advantage's sum carries a term ``-(T - t) * mean`` shared by every episode of the group,
     which adds variance and no signal. ``advantage_gamma`` < 1 discounts both per-step sums
     (``sum_k gamma^(k-t) ...``; default 1, undiscounted): a shorter credit horizon for a step's
     action, as PPO's ``gamma`` on a shaped reward;
  4. minimises ``-mean(min(r A, clip(r, 1 - clip_param, 1 + clip_param) A)) + kl_coeff * KL``
     over ``num_epochs`` passes of minibatches, with ``r = pi(a|s) / pi_old(a|s)`` and KL the
     divergence of the policy from a frozen reference policy. No value function (the module is
     built with ``value="none"``), no GAE. ``step_kl_coeff > 0`` (default 0: the paper's loss)
     adds ``step_kl_coeff * KL(pi_old || pi)``, PPO's penalty on the divergence from the
     policy that sampled the batch: it bounds each iteration's step, where the reference KL
     only bounds the distance from the start;
  5. syncs the new weights to the EnvRunners.

Reference policy: the module's initial weights, kept inside the learner when it is built: a
frozen copy of the module, or, with LoRA adapters on the language model (``model.lora``), the
same module with its adapters disabled (peft's ``disable_adapter``, applied to every injected
adapter) and its other trainable tensors (head, state projection, action query, projector and
vision encoder unless frozen) swapped for frozen copies of their initial values: no second copy
of the language model is held. Fresh adapters start at zero (LoRA's B = 0), so adapters-off is
the start policy; a start whose adapters were already trained (e.g. BC with LoRA) has its
adapters folded into the base weights first (``fold_adapters``), so the reference is that start.
When the run starts from another algorithm's policy (``model.pretrained_path``: a
``VLA.save_pretrained`` dir, a vla-ray checkpoint with its ``vla/`` export, or a vla-ray run dir,
whose ``checkpoints/best`` (else ``last``) is used), that policy is both the starting point and
the reference. The reference is part of the learner's checkpoint state, so a resumed run keeps
it.

KL estimator (``kl_estimator``): ``"analytic"`` (default) is the exact KL(pi || pi_ref) of the
two diagonal Gaussians at each visited state: no sampling noise, available because VLA heads are
Gaussian. ``"k3"`` is DeepSeekMath's estimator on the sampled action,
``pi_ref/pi - log(pi_ref/pi) - 1`` (unbiased, always >= 0), for parity with the paper.

Group seeding, and why it is robust with several EnvRunners and vectorised envs: each sub-env is
wrapped in :class:`GroupSeeding` (the algorithm adds ``group_seeding=True`` to the env config;
vla-ray's env creator applies the wrapper). Per iteration the driver deals the scheduled
episodes ``(seed, group)`` round-robin over the healthy EnvRunners and, inside each runner, over
its sub-envs, and hands every sub-env its own queue through ``VectorEnv.set_attr`` (works for
sync and async vectorisation: no state is shared between sub-envs). A runner then calls its own
``sample(num_episodes=n)`` with ``n`` its scheduled count; ``sample`` force-resets all sub-envs,
and every reset pops the sub-env's next ``(seed, group)`` and resets the inner env with that
seed. A sub-env whose queue is empty starts a *padding* episode that never ends (the wrapper
hides its ``terminated``/``truncated``), so the ``n`` completed episodes that ``sample`` returns
are exactly the scheduled ones; the padding episode is discarded by the next forced reset. Every
scheduled episode carries ``info["grpo_group"]``/``info["grpo_seed"]`` from its reset, and the
driver groups by that, so a runner that dies mid-iteration only shrinks or drops its groups
(a group of one member has advantage 0). The env must end its episodes (e.g. a time limit).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import AddColumnsFromEpisodesToTrainBatch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
)

from vla_ray.algorithm_spec import VLAAlgorithmConfig
from vla_ray.env_factory import GROUP_SEEDING_WRAPPER, EnvWrapper
from vla_ray.learner import TrainableParametersMixin
from vla_ray.models.lora import (
    adapters_disabled,
    fold_adapters,
    has_lora,
    is_adapter_param,
    parameters_replaced,
)

REWARD_KINDS = ("return", "success")
ADVANTAGES = ("outcome", "process", "return_to_go")
KL_ESTIMATORS = ("analytic", "k3")
GROUP_SEEDING = GROUP_SEEDING_WRAPPER.keys[0]  # env_config flag: wrap each sub-env in GroupSeeding
GROUP_KEY = "grpo_group"  # reset info: the episode's group id (-1: padding)
SEED_KEY = "grpo_seed"  # reset info: the episode's reset seed
ADVANTAGE_KEY = "grpo_advantage"  # episode.custom_data: the episode's group advantage
SEED_LOW, SEED_HIGH = 1_000_000, 2**31 - 1  # group seeds; evaluation uses 100_000 + i


# -- group seeding ------------------------------------------------------------------------------
def group_seeding(env: gym.Env, group_seeding: bool) -> gym.Env:
    """``env`` in :class:`GroupSeeding` when ``group_seeding`` (the env config flag)."""
    return GroupSeeding(env) if group_seeding else env


class GroupSeeding(gym.Wrapper):
    """Resets from a queue of ``(seed, group)`` set by the algorithm (``group_schedule``).

    With the queue empty, a reset starts a padding episode (group -1) that never terminates or
    truncates; see the module docstring for why.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.group_schedule: list[tuple[int, int]] = []
        self._padding = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        group = -1
        if self.group_schedule:
            seed, group = self.group_schedule.pop(0)
        self._padding = group < 0
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, {**info, GROUP_KEY: int(group), SEED_KEY: -1 if seed is None else int(seed)}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._padding:
            terminated = truncated = False
        return obs, reward, terminated, truncated, info


def group_seeds(seed: int | None, iteration: int, num_groups: int) -> list[int]:
    """The iteration's reset seeds, one per group: distinct, deterministic in (seed, iteration)."""
    rng = np.random.default_rng([int(seed or 0), int(iteration)])
    return [int(s) for s in rng.choice(SEED_HIGH - SEED_LOW, num_groups, replace=False) + SEED_LOW]


def deal_schedule(
    seeds: list[int], group_size: int, runner_ids: list[int], num_envs: int
) -> dict[int, list[list[tuple[int, int]]]]:
    """``runner id -> [queue of (seed, group) per sub-env]`` for ``group_size`` episodes per seed.

    Episodes are dealt round-robin over runners, then over each runner's sub-envs.
    """
    episodes = [(s, g) for g, s in enumerate(seeds) for _ in range(group_size)]
    out = {r: [[] for _ in range(num_envs)] for r in runner_ids}
    for i, ep in enumerate(episodes):
        r = runner_ids[i % len(runner_ids)]
        out[r][(i // len(runner_ids)) % num_envs].append(ep)
    return out


def _sample_scheduled(runner, schedules: dict[int, list[list[tuple[int, int]]]]):
    """On an EnvRunner: hand each sub-env its queue, sample exactly the scheduled episodes."""
    queues = schedules.get(runner.worker_index)
    n = sum(len(q) for q in queues) if queues else 0
    if n == 0 or runner.env is None:
        return [], runner.get_metrics()
    runner.env.env.set_attr("group_schedule", [list(q) for q in queues])
    episodes = runner.sample(num_episodes=n, explore=True)
    return episodes, runner.get_metrics()


# -- scores and advantages ----------------------------------------------------------------------
def episode_score(episode: SingleAgentEpisode, reward_kind: str) -> float:
    """An episode's score: its return, or 1.0/0.0 from the final ``info["is_success"]``."""
    if reward_kind == "return":
        return float(episode.get_return())
    if reward_kind == "success":
        info = episode.get_infos(-1)
        if not isinstance(info, dict) or "is_success" not in info:
            raise ValueError(
                "reward_kind='success': the env's info has no 'is_success' flag; use "
                "reward_kind='return'"
            )
        return float(bool(info["is_success"]))
    raise ValueError(f"reward_kind: expected one of {REWARD_KINDS}, got {reward_kind!r}")


def _group_members(groups: list[Any], n: int, per: str) -> list[list[int]]:
    """Indices of each group's members (``groups``: one group id per ``per``, ``n`` of them)."""
    if len(groups) != n:
        raise ValueError(f"groups: expected {n} group ids (one per {per}), got {len(groups)}")
    members: dict[Any, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return list(members.values())


def group_advantages(scores: list[float] | np.ndarray, groups: list[Any]) -> np.ndarray:
    """``(score - group mean) / (group std + 1e-6)`` per episode; 0 where a group's scores are
    all equal (including groups of one)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.zeros_like(scores)
    for idx in _group_members(groups, len(scores), "score"):
        s = scores[idx]
        std = s.std()
        if std > 1e-8:
            out[idx] = (s - s.mean()) / (std + 1e-6)
    return out.astype(np.float32)


def discounted_return_to_go(rewards: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """``G_t = sum_{k >= t} gamma^(k - t) r_k`` for every step ``t`` of one episode."""
    out = np.zeros(len(rewards), np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = float(rewards[t]) + gamma * running
        out[t] = running
    return out


def group_process_advantages(
    rewards: list[np.ndarray] | list[list[float]], groups: list[Any], gamma: float = 1.0
) -> list[np.ndarray]:
    """Per-step advantages (process supervision): each step reward normalised by the mean and
    std of all step rewards of its group, summed (discounted by ``gamma``) from that step to
    the episode's end. Zero for groups of one episode and for groups whose step rewards are all
    equal."""
    idx_of_groups = _group_members(groups, len(rewards), "episode")
    rewards = [np.asarray(r, dtype=np.float64).reshape(-1) for r in rewards]
    out = [np.zeros(len(r), np.float32) for r in rewards]
    for idx in idx_of_groups:
        if len(idx) < 2:
            continue
        pooled = np.concatenate([rewards[i] for i in idx])
        std = pooled.std()
        if std <= 1e-8:
            continue
        for i in idx:
            normed = (rewards[i] - pooled.mean()) / (std + 1e-6)
            out[i] = discounted_return_to_go(normed, gamma).astype(np.float32)
    return out


def group_return_to_go_advantages(
    rewards: list[np.ndarray] | list[list[float]], groups: list[Any], gamma: float = 1.0
) -> list[np.ndarray]:
    """Per-step advantages with a per-step group baseline: a step's return-to-go (discounted by
    ``gamma``; 1: undiscounted) minus the mean return-to-go of the group's episodes still running at the same step index,
    divided by the std of these differences over all steps of the group. Zero for groups of one
    episode, for steps where only one episode of the group is still running, and for groups
    whose differences are all zero."""
    idx_of_groups = _group_members(groups, len(rewards), "episode")
    rewards = [np.asarray(r, dtype=np.float64).reshape(-1) for r in rewards]
    rtg = [discounted_return_to_go(r, gamma) for r in rewards]
    out = [np.zeros(len(r), np.float32) for r in rewards]
    for idx in idx_of_groups:
        if len(idx) < 2:
            continue
        horizon = max(len(rtg[i]) for i in idx)
        total, count = np.zeros(horizon), np.zeros(horizon)
        for i in idx:
            total[: len(rtg[i])] += rtg[i]
            count[: len(rtg[i])] += 1
        diffs = {}
        for i in idx:
            n = len(rtg[i])
            # a step with no other running episode has no baseline: advantage 0
            diffs[i] = np.where(count[:n] > 1, rtg[i] - total[:n] / count[:n], 0.0)
        std = np.concatenate(list(diffs.values())).std()
        if std <= 1e-8:
            continue
        for i in idx:
            out[i] = (diffs[i] / (std + 1e-6)).astype(np.float32)
    return out


class AddGroupAdvantages(ConnectorV2):
    """Learner connector: the steps' advantages (``Postprocessing.ADVANTAGES``), read from
    ``episode.custom_data``: one group advantage for every step, or one per step (process)."""

    def __call__(self, *, rl_module, batch, episodes, **kwargs):
        for ep in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            adv = ep.custom_data.get(ADVANTAGE_KEY, 0.0)
            if np.ndim(adv) == 0:
                adv = np.full(len(ep), float(adv), np.float32)
            self.add_n_batch_items(
                batch,
                Postprocessing.ADVANTAGES,
                items_to_add=np.asarray(adv, np.float32),
                num_items=len(ep),
                single_agent_episode=ep,
            )
        return batch


# per-step advantages from the step rewards (``advantage``'s name -> function)
STEP_ADVANTAGES = {
    "process": group_process_advantages,
    "return_to_go": group_return_to_go_advantages,
}


# -- loss ---------------------------------------------------------------------------------------
class GRPOTorchLearner(TrainableParametersMixin, TorchLearner):
    """Clipped surrogate on group advantages + KL to the initial policy (a frozen copy, or the
    module itself with LoRA adapters off: see the module docstring)."""

    def build(self) -> None:
        super().build()
        self._reference: dict[str, torch.nn.Module] = {}
        # LoRA: frozen copies of the trainable tensors that are not adapters (small: head etc.)
        self._reference_parts: dict[str, dict[str, torch.Tensor]] = {}
        for mid, module in self.module.items():
            m = module.unwrapped()
            if has_lora(m):
                fold_adapters(m)
                self._reference_parts[mid] = {
                    n: p.detach().clone()
                    for n, p in m.named_parameters()
                    if p.requires_grad and not is_adapter_param(n)
                }
                continue
            ref = copy.deepcopy(m)
            ref.requires_grad_(False)
            ref.eval()
            self._reference[mid] = ref

    def reference_module(self, module_id: str) -> torch.nn.Module:
        """The frozen reference copy of ``module_id`` (KeyError with LoRA: there is none; use
        ``reference_dist_inputs``)."""
        return self._reference[module_id]

    def reference_dist_inputs(self, module_id: str, batch: dict[str, Any]) -> torch.Tensor:
        """The reference policy's action-distribution inputs for ``batch`` (no gradient)."""
        with torch.no_grad():
            if module_id in self._reference:
                out = self._reference[module_id].forward_train(batch)
            else:
                module = self.module[module_id].unwrapped()
                parts = self._reference_parts[module_id]
                with adapters_disabled(module), parameters_replaced(module, parts):
                    out = module.forward_train(batch)
        return out[Columns.ACTION_DIST_INPUTS]

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        dist_cls = module.get_train_action_dist_cls()
        dist = dist_cls.from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        logp = dist.logp(batch[Columns.ACTIONS])
        ratio = torch.exp(logp - batch[Columns.ACTION_LOGP])
        adv = batch[Postprocessing.ADVANTAGES]
        clip = config.clip_param
        surrogate = torch.min(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
        ref_dist = dist_cls.from_logits(self.reference_dist_inputs(module_id, batch))
        if config.kl_estimator == "k3":
            log_r = ref_dist.logp(batch[Columns.ACTIONS]) - logp
            kl = torch.exp(log_r) - log_r - 1.0
        else:
            kl = dist.kl(ref_dist)
        policy_loss = -surrogate.mean()
        kl_loss = kl.mean()
        total = policy_loss + config.kl_coeff * kl_loss
        # PPO's penalty on the step from the sampling policy (its logits are in the batch)
        old_dist = dist_cls.from_logits(batch[Columns.ACTION_DIST_INPUTS])
        step_kl = old_dist.kl(dist).mean()
        if config.step_kl_coeff > 0.0:
            total = total + config.step_kl_coeff * step_kl
        clipped = ((ratio - 1.0).abs() > clip).float().mean()
        self.metrics.log_dict(
            {
                "policy_loss": policy_loss.item(),
                "mean_kl_loss": kl_loss.item(),
                "step_kl": step_kl.item(),
                "total_loss": total.item(),
                "entropy": dist.entropy().mean().item(),
                "clip_fraction": clipped.item(),
            },
            key=module_id,
            window=1,
        )
        return total

    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        if not self._check_component("grpo_reference", components, not_components):
            return state  # e.g. weight syncs ask for the RL module only
        state["grpo_reference"] = {
            mid: {k: v.detach().cpu().numpy() for k, v in ref.state_dict().items()}
            for mid, ref in self._reference.items()
        }
        # LoRA: the base weights are in the module's own state; the swapped parts are here
        state["grpo_reference_parts"] = {
            mid: {k: v.cpu().numpy().copy() for k, v in parts.items()}
            for mid, parts in self._reference_parts.items()
        }
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        for mid, weights in (state.get("grpo_reference") or {}).items():
            if mid in self._reference:
                self._reference[mid].load_state_dict(
                    {k: torch.as_tensor(v) for k, v in weights.items()}
                )
        for mid, parts in (state.get("grpo_reference_parts") or {}).items():
            if mid in self._reference_parts:
                for k, v in parts.items():
                    self._reference_parts[mid][k].copy_(torch.as_tensor(v))


# -- config -------------------------------------------------------------------------------------
class GRPOConfig(VLAAlgorithmConfig, AlgorithmConfig):
    """GRPO settings: group size and count, reward kind, advantage kind, clip range, KL
    coefficient/estimator, per-iteration KL penalty; the caller adds env, module and runners."""

    NAME: ClassVar[str] = "grpo"
    # Heads with log-probabilities (the surrogate needs them).
    HEADS: ClassVar[tuple[str, ...]] = ("gaussian",)
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="gaussian", value="none")
    # ``model.chunk_size`` K > 1: a chunk is one macro-action (``vla_ray.envs.chunking``)
    ACTION_CHUNKS: ClassVar[bool] = True
    # ``env.group_seeding`` wraps each sub-env in GroupSeeding (resets from a seed schedule)
    ENV_WRAPPERS: ClassVar[tuple[EnvWrapper, ...]] = (GROUP_SEEDING_WRAPPER,)

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or GRPO)
        self.env_config = {GROUP_SEEDING: True}
        self.set_training_defaults(
            lr=1e-4,
            grad_clip=1.0,
            group_size=8,
            groups_per_iteration=8,
            reward_kind="return",
            clip_param=0.2,
            kl_coeff=0.04,
            kl_estimator="analytic",
            step_kl_coeff=0.0,
            advantage="outcome",
            advantage_gamma=1.0,
            num_epochs=4,
            minibatch_size=256,
        )

    def environment(self, env=NotProvided, *, env_config=NotProvided, **kwargs) -> GRPOConfig:
        # every env config keeps the group-seeding flag (the env creator wraps the env)
        if env_config is not NotProvided:
            env_config = {**(env_config or {}), GROUP_SEEDING: True}
        return super().environment(env, env_config=env_config, **kwargs)

    def training(
        self,
        *,
        group_size: int = NotProvided,
        groups_per_iteration: int = NotProvided,
        reward_kind: str = NotProvided,
        clip_param: float = NotProvided,
        kl_coeff: float = NotProvided,
        kl_estimator: str = NotProvided,
        step_kl_coeff: float = NotProvided,
        advantage: str = NotProvided,
        advantage_gamma: float = NotProvided,
        **kwargs,
    ) -> GRPOConfig:
        super().training(**kwargs)
        for name, value in dict(
            group_size=group_size,
            groups_per_iteration=groups_per_iteration,
            reward_kind=reward_kind,
            clip_param=clip_param,
            kl_coeff=kl_coeff,
            kl_estimator=kl_estimator,
            step_kl_coeff=step_kl_coeff,
            advantage=advantage,
            advantage_gamma=advantage_gamma,
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        if int(self.group_size) < 2:
            self._value_error(
                f"group_size: must be >= 2 (episodes per reset seed), got {self.group_size}"
            )
        if int(self.groups_per_iteration) < 1:
            self._value_error(
                f"groups_per_iteration: must be >= 1, got {self.groups_per_iteration}"
            )
        if self.reward_kind not in REWARD_KINDS:
            self._value_error(
                f"reward_kind: expected one of {REWARD_KINDS}, got {self.reward_kind!r}"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            self._value_error(
                f"kl_estimator: expected one of {KL_ESTIMATORS}, got {self.kl_estimator!r}"
            )
        if self.advantage not in ADVANTAGES:
            self._value_error(f"advantage: expected one of {ADVANTAGES}, got {self.advantage!r}")
        if self.advantage in STEP_ADVANTAGES and self.reward_kind != "return":
            self._value_error(
                f"advantage: {self.advantage!r} scores every step reward, so it needs "
                f"reward_kind='return', got reward_kind={self.reward_kind!r}"
            )
        if not 0.0 < float(self.advantage_gamma) <= 1.0:
            self._value_error(f"advantage_gamma: must be in (0, 1], got {self.advantage_gamma}")
        if float(self.advantage_gamma) != 1.0 and self.advantage not in STEP_ADVANTAGES:
            self._value_error(
                f"advantage_gamma: discounts the per-step advantages {tuple(STEP_ADVANTAGES)}; "
                f"got advantage_gamma={self.advantage_gamma} with advantage={self.advantage!r}"
            )
        if not 0.0 < float(self.clip_param) < 1.0:
            self._value_error(f"clip_param: must be in (0, 1), got {self.clip_param}")
        if float(self.kl_coeff) < 0.0:
            self._value_error(f"kl_coeff: must be >= 0, got {self.kl_coeff}")
        if float(self.step_kl_coeff) < 0.0:
            self._value_error(f"step_kl_coeff: must be >= 0, got {self.step_kl_coeff}")

    def get_default_learner_class(self):
        return GRPOTorchLearner

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from vla_ray.rl_module import VLAModule

        return RLModuleSpec(module_class=VLAModule, model_config=dict(self.MODEL_DEFAULTS))

    def build_learner_connector(self, input_observation_space, input_action_space, device=None):
        pipeline = super().build_learner_connector(
            input_observation_space=input_observation_space,
            input_action_space=input_action_space,
            device=device,
        )
        pipeline.insert_after(AddColumnsFromEpisodesToTrainBatch, AddGroupAdvantages())
        return pipeline


# -- training step ------------------------------------------------------------------------------
class GRPO(Algorithm):
    """Groups of episodes per reset seed, group-normalised advantages, clipped surrogate + KL."""

    @classmethod
    def get_default_config(cls) -> GRPOConfig:
        return GRPOConfig()

    def sample_groups(self) -> tuple[list[SingleAgentEpisode], list[dict]]:
        """This iteration's scheduled episodes (see the module docstring) and runner metrics."""
        cfg = self.config
        seeds = group_seeds(cfg.seed, self.iteration, int(cfg.groups_per_iteration))
        group = self.env_runner_group
        remote = group.num_remote_env_runners() > 0
        ids = sorted(group.healthy_env_runner_ids()) if remote else [0]
        if not ids:
            return [], []
        schedules = deal_schedule(seeds, int(cfg.group_size), ids, cfg.num_envs_per_env_runner)
        results = group.foreach_env_runner(
            lambda runner: _sample_scheduled(runner, schedules),
            local_env_runner=not remote,
            remote_worker_ids=ids if remote else None,
            timeout_seconds=cfg.sample_timeout_s,
        )
        episodes = [ep for eps, _ in results for ep in eps]
        return episodes, [m for _, m in results]

    def training_step(self) -> None:
        cfg = self.config
        episodes, runner_metrics = self.sample_groups()
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        episodes = [ep for ep in episodes if len(ep) > 0]
        if not episodes:
            return
        # group ids are unique within an iteration; the seed guards against a stale schedule
        keys = [(ep.get_infos(0)[GROUP_KEY], ep.get_infos(0)[SEED_KEY]) for ep in episodes]
        scores = [episode_score(ep, cfg.reward_kind) for ep in episodes]
        if cfg.advantage in STEP_ADVANTAGES:
            rewards = [np.asarray(ep.get_rewards(), np.float64) for ep in episodes]
            step_advantages = STEP_ADVANTAGES[cfg.advantage](
                rewards, keys, gamma=float(cfg.advantage_gamma)
            )
            for ep, adv in zip(episodes, step_advantages, strict=True):
                ep.custom_data[ADVANTAGE_KEY] = adv
        else:
            for ep, adv in zip(episodes, group_advantages(scores, keys), strict=True):
                ep.custom_data[ADVANTAGE_KEY] = float(adv)
        by_group: dict[Any, list[float]] = defaultdict(list)
        for k, score in zip(keys, scores, strict=True):
            by_group[k].append(score)
        self.metrics.log_dict(
            {
                "grpo_score_mean": float(np.mean(scores)),
                "grpo_groups": len(by_group),
                "grpo_zero_variance_groups": sum(np.ptp(v) == 0 for v in by_group.values()),
            },
            window=1,
        )
        results = self.learner_group.update(
            episodes=episodes,
            timesteps={
                NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                    (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0
                )
            },
            num_epochs=int(cfg.num_epochs),
            minibatch_size=int(cfg.minibatch_size),
            shuffle_batch_per_epoch=True,
        )
        self.metrics.aggregate(results, key=LEARNER_RESULTS)
        self.env_runner_group.sync_weights(
            from_worker_or_learner_group=self.learner_group, inference_only=True
        )
