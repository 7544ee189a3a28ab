"""Policy loading (RLlib checkpoint or ``save_pretrained`` directory) and evaluation episodes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vla_ray.callbacks import episode_goal
from vla_ray.checkpoint import META_NAME, MODULE_SUBDIR
from vla_ray.env_factory import ALGORITHM_WRAPPER_KEYS
from vla_ray.envs.chunking import (
    CHUNK_CONFIG_KEY,
    RETURN_KEY,
    STEPS_KEY,
    TemporalEnsemble,
    wrap_action_chunks,
)

ObsDict = dict[str, np.ndarray]


class EpisodeContext(Protocol):
    """What a policy that conditions on its episode so far (the Decision Transformer) is told."""

    def reset(self) -> None: ...

    def observe(self, reward: float) -> None: ...


class Policy:
    """Deterministic action computation for batched observation dicts, from either source.

    ``model`` is the underlying ``VLA`` (for export and serving; None for a sequence policy).
    ``context`` (a sequence policy's): told of every episode start (``reset``) and step's reward
    (``observe``); such a policy plays one episode at a time.
    """

    def __init__(
        self,
        act_fn: Callable[[ObsDict], np.ndarray],
        meta: dict[str, Any],
        source: str,
        model: torch.nn.Module | None = None,
        context: EpisodeContext | None = None,
    ):
        self._act = act_fn
        self.meta = meta
        self.source = source
        self.model = model
        self.context = context

    def __call__(self, obs: ObsDict) -> np.ndarray:
        """Batched observations -> actions (B, action space dims)."""
        return self._act(obs)

    def reset(self) -> None:
        """A new episode starts (forgets a sequence policy's context)."""
        if self.context is not None:
            self.context.reset()

    def observe(self, reward: float) -> None:
        """The reward of the step just taken (a sequence policy conditions on it)."""
        if self.context is not None:
            self.context.observe(reward)


class RecurrentState:
    """The memory of a temporal VLA (``config.temporal``) over one episode: forgotten at each
    episode's start, carried from step to step (an ``EpisodeContext``)."""

    def __init__(self, vla: Any):
        self.vla = vla
        self.state: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        self.state = None

    def observe(self, reward: float) -> None:
        """Rewards do not enter the memory."""

    def act(self, obs: ObsDict) -> np.ndarray:
        actions, self.state = self.vla.predict_step(obs, self.state, deterministic=True)
        return actions.flatten(1).cpu().numpy()


def _temporal_policy(vla: Any, meta: dict[str, Any], source: str) -> Policy:
    memory = RecurrentState(vla)
    return Policy(memory.act, meta, source, model=vla, context=memory)


def _read_meta(path: Path) -> dict[str, Any]:
    for candidate in (path / META_NAME, path.parent / META_NAME):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def _no_planner(planner: str | None, path: str | Path, module: Any) -> None:
    if planner not in (None, "none"):
        raise ValueError(
            f"--planner {planner}: planning needs a world-model checkpoint (algorithm "
            f"'dreamer'); {path} holds a {type(module).__name__}"
        )


def load_policy(
    path: str | Path, target_return: float | None = None, planner: str | None = None
) -> Policy:
    """Load a policy from an RLlib checkpoint directory (an algorithm checkpoint, or the
    RLModule directory inside one) or from a ``VLA.save_pretrained`` directory.
    ``target_return``: the return a Decision Transformer conditions on (default: the trained
    ``training.target_return``); refused for other policies. ``planner`` ("cem", "mppi"): a
    world-model checkpoint (``dreamer``) plans over its latent dynamics instead of acting with
    its actor alone; refused for other policies."""
    from vla_ray.models.vla import CONFIG_NAME, VLA

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    meta = _read_meta(path)
    if (path / CONFIG_NAME).is_file():
        if planner not in (None, "none"):
            raise ValueError(
                f"--planner {planner}: planning needs a world-model checkpoint (algorithm "
                f"'dreamer'); {path} is a VLA save_pretrained directory"
            )
        vla = VLA.from_pretrained(path).eval()
        if vla.temporal is not None:
            return _temporal_policy(vla, meta, "save_pretrained")

        def act_vla(obs: ObsDict) -> np.ndarray:
            return vla.predict(obs, deterministic=True).flatten(1).cpu().numpy()

        _no_target_return(target_return, path)
        return Policy(act_vla, meta, "save_pretrained", model=vla)

    module_dir = path / MODULE_SUBDIR if (path / MODULE_SUBDIR).is_dir() else path
    if (
        not (module_dir / "class_and_ctor_args.pkl").is_file()
        and not (module_dir / "module_state.pkl").exists()
    ):
        raise ValueError(
            f"checkpoint: {path} is neither an RLlib checkpoint (no {MODULE_SUBDIR}) nor a "
            f"save_pretrained directory (no {CONFIG_NAME})"
        )
    from ray.rllib.core.rl_module.rl_module import RLModule

    module = RLModule.from_checkpoint(str(module_dir.resolve()))
    from vla_ray.algorithms.dt import DTModule

    if isinstance(module, DTModule):
        _no_planner(planner, path, module)
        return _context_policy(module, meta, path, target_return)
    _no_target_return(target_return, path)
    # a world-model checkpoint has imported its class while loading; importing it here for
    # every other checkpoint would import RLlib's DreamerV3, which builds a debugging env at
    # import and prints gymnasium's warnings about it
    world_model = sys.modules.get("vla_ray.world_model.rl_module")
    if world_model is not None and isinstance(module, world_model.WorldModelModule):
        from vla_ray.world_model.policy import LatentPolicy

        runner = LatentPolicy(module, planner or "none")
        return Policy(runner, meta, "rllib", model=None, context=runner)
    _no_planner(planner, path, module)
    if not hasattr(module, "vla"):
        raise ValueError(
            f"checkpoint: {path} holds a {type(module).__name__}, which vla-ray eval cannot run "
            "(neither a VLA policy nor a Decision Transformer)"
        )
    module.eval()
    if getattr(module.vla, "temporal", None) is not None:
        return _temporal_policy(module.vla, meta, "rllib")
    from vla_ray.data.validation import module_actions

    def act_module(obs: ObsDict) -> np.ndarray:
        return module_actions(module, obs)

    return Policy(act_module, meta, "rllib", model=module.vla)


def _no_target_return(target_return: float | None, path: Path) -> None:
    if target_return is not None:
        raise ValueError(
            f"target_return: only a Decision Transformer conditions on a return; {path} holds "
            "a VLA policy"
        )


def _context_policy(
    module: Any, meta: dict[str, Any], path: Path, target_return: float | None = None
) -> Policy:
    """The Decision Transformer as a Policy: its window settings from the checkpoint's meta
    (the training settings it recorded; the algorithm's defaults for what it lacks);
    ``target_return`` overrides the trained one."""
    from vla_ray.algorithms import dt

    training = {**dt.DTConfig.training_defaults(), **(meta.get("training") or {})}
    if target_return is not None:
        training["target_return"] = float(target_return)
    if "training" not in meta:
        print(
            f"checkpoint: {path} records no training settings; the Decision Transformer "
            f"conditions on the defaults (context_length {training['context_length']}, "
            f"target_return {training['target_return']}, return_scale "
            f"{training['return_scale']})",
            file=sys.stderr,
        )
    module.eval()
    runner = dt.ContextRunner(
        module,
        context_length=int(training["context_length"]),
        target_return=float(training["target_return"]),
        return_scale=float(training["return_scale"]),
    )
    return Policy(runner, meta, "rllib", model=None, context=runner)


def write_video(path: str | Path, frames: list[np.ndarray], fps: float = 10) -> Path:
    """Write ``frames`` (uint8 H x W x 3 each, all the same size) as a video at ``path`` (the
    format from its suffix, e.g. mp4 or gif); returns the path."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(str(path), frames, fps=fps)
    return path


def _chunk_size(policy: Policy, chunks: dict[str, Any]) -> int:
    """The policy's chunk size: its VLA's config, else the run's ``action_chunk.size``."""
    config = getattr(policy.model, "config", None)
    if config is not None and hasattr(config, "chunk_size"):
        return int(config.chunk_size)
    return int(chunks.get("size", 1))


def evaluate(
    policy: Policy,
    env_id: str | None = None,
    env_config: dict[str, Any] | None = None,
    episodes: int = 50,
    seed: int = 100_000,
    video: str | Path | None = None,
    progress: bool = True,
    chunk_execute: int | None = None,
    temporal_ensemble: float | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` seeded episodes; success rate, mean return and mean length (env steps).

    A policy of action chunks (``chunk_size`` K > 1) runs its first ``chunk_execute`` actions
    open loop per prediction (default: the run's ``action_chunk.execute``, else K), or, with
    ``temporal_ensemble`` m, predicts at every step and executes ACT's exponentially weighted
    mean of the overlapping predictions for that step (``vla_ray.envs.chunking``).

    Seeds start at ``seed`` (away from training seeds). With ``video``, every episode's frames
    are written to one mp4. When the env's info names the goal (``info["target_color"]`` or
    ``info["goal"]``), the result also has ``success_by_target`` and ``episodes_by_target`` (per
    goal). A driving env's info (``route_completion``, ``collision``, ``infractions``, ...) adds
    ``driving``: route completion, driving score, collision rate, mean speed, infractions
    (``vla_ray.driving.metrics``). With the safety
    layer (``env_config["safety"]``: a rules file), ``safety_interventions`` (totals per rule id),
    ``safety_per_episode`` (means) and ``mean_episode_cost``.
    """
    from tqdm import tqdm

    import vla_ray.envs  # noqa: F401

    env_id = env_id or policy.meta.get("env")
    if not env_id:
        raise ValueError("env: the checkpoint names no env (no vla_ray_meta.json); pass --env")
    cfg = dict(policy.meta.get("env_config", {}) if env_config is None else env_config)
    # training-only wrappers (DAgger's expert mixing): the policy is evaluated alone
    for key in ALGORITHM_WRAPPER_KEYS:
        cfg.pop(key, None)
    chunks = dict(cfg.pop(CHUNK_CONFIG_KEY, None) or {})
    size = _chunk_size(policy, chunks)
    if size == 1 and (temporal_ensemble is not None or chunk_execute is not None):
        flag = "--temporal-ensemble" if temporal_ensemble is not None else "--chunk-execute"
        raise ValueError(f"{flag}: the policy predicts single actions (chunk_size 1)")
    if temporal_ensemble is not None and chunk_execute is not None:
        raise ValueError("--chunk-execute: not with --temporal-ensemble (one step per query)")
    if video:
        cfg["render_mode"] = "rgb_array"
    from vla_ray.driving.metrics import aggregate, episode_metrics
    from vla_ray.safety import EPISODE_COST_INFO_KEY, SAFETY_INFO_KEY, make_env

    env = make_env(env_id, cfg)  # env_config["safety"]: the safety layer's rules file
    safety: list[dict[str, int]] = []
    costs: list[float] = []
    ensemble = None
    if temporal_ensemble is not None:
        ensemble = TemporalEnsemble(size, temporal_ensemble)
        action_dim = int(env.action_space.shape[0])
    elif size > 1:  # a video shows the env at chunk boundaries only
        execute = chunk_execute if chunk_execute is not None else chunks.get("execute")
        env = wrap_action_chunks(env, dict(size=size, execute=execute))
    frames: list[np.ndarray] = []
    returns, lengths, successes = [], [], []
    targets: list[str | None] = []
    driving: list[dict[str, Any]] = []
    try:
        for ep in tqdm(range(episodes), disable=not progress, desc="eval", unit="ep"):
            obs, info = env.reset(seed=seed + ep)
            policy.reset()
            if ensemble is not None:
                ensemble.reset()
            done, ret, length = False, 0.0, 0
            while not done:
                if video:
                    frames.append(env.render())
                action = policy({k: np.asarray(v)[None] for k, v in obs.items()})[0]
                if ensemble is not None:
                    action = ensemble.step(action.reshape(size, action_dim)).astype(np.float32)
                obs, reward, terminated, truncated, info = env.step(action)
                policy.observe(float(reward))
                # a chunk's env steps and its undiscounted reward sum (ExecuteChunk)
                ret += float(info.get(RETURN_KEY, reward))
                length += int(info.get(STEPS_KEY, 1))
                done = terminated or truncated
            if video:
                frames.append(env.render())
            returns.append(ret)
            lengths.append(length)
            successes.append(float(bool(info.get("is_success", False))))
            targets.append(episode_goal(info))
            episode = episode_metrics(info)
            if episode is not None:
                driving.append(episode)
            if SAFETY_INFO_KEY in info:  # episode totals per rule id
                safety.append(dict(info[SAFETY_INFO_KEY]))
                costs.append(float(info.get(EPISODE_COST_INFO_KEY, 0.0)))
    finally:
        env.close()
    if video:
        write_video(video, frames, fps=env.metadata.get("render_fps", 10))
    result: dict[str, Any] = dict(
        env=env_id,
        episodes=episodes,
        success_rate=float(np.mean(successes)),
        mean_return=float(np.mean(returns)),
        mean_length=float(np.mean(lengths)),
    )
    if driving:
        result["driving"] = aggregate(driving)
    if safety:
        rules = list(safety[0])
        result["safety_interventions"] = {r: int(sum(s[r] for s in safety)) for r in rules}
        result["safety_per_episode"] = {r: float(np.mean([s[r] for s in safety])) for r in rules}
        result["mean_episode_cost"] = float(np.mean(costs))
    named = sorted({t for t in targets if t is not None})
    if named:
        result["episodes_by_target"] = {t: targets.count(t) for t in named}
        result["success_by_target"] = {
            t: float(np.mean([s for s, g in zip(successes, targets, strict=True) if g == t]))
            for t in named
        }
    return result
