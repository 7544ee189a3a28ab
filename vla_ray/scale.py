"""Scale and robustness settings of a run: vectorisation, GPUs, fault tolerance.

- ``env_runners.gym_env_vectorize_mode``: ``"sync"`` (RLlib's default: the envs of an EnvRunner
  step one after the other in its process) or ``"async"`` (gymnasium's ``AsyncVectorEnv``: one
  subprocess per env, for heavy simulators such as pixel MuJoCo or CARLA clients);
  ``vla-ray train --vectorize async``.
- ``learners.num_gpus_per_learner``: a number, or ``"auto"`` (the default): 1 when the Ray cluster
  (or, before Ray starts, torch) sees a GPU, else 0; ``--num-gpus-per-learner``.
- ``env_runners.num_gpus_per_env_runner``: a number (fractions share a GPU), default 0: the tiny
  VLAs infer faster on the EnvRunner's CPU; ``--num-gpus-per-env-runner``.
- ``fault_tolerance``: keywords of RLlib's ``AlgorithmConfig.fault_tolerance``. Every run starts
  from :data:`FAULT_TOLERANCE_DEFAULTS`: a dead EnvRunner is restarted by Ray (its weights and
  connector state restored) and training goes on with the others meanwhile; a sub-environment
  that raises is recreated in place and its episode dropped.
"""

from __future__ import annotations

from typing import Any

VECTORIZE_MODES = ("sync", "async")
FAULT_TOLERANCE_DEFAULTS: dict[str, Any] = dict(
    restart_failed_env_runners=True,
    restart_failed_sub_environments=True,
    max_num_env_runner_restarts=1000,
    num_consecutive_env_runner_failures_tolerance=100,
    env_runner_health_probe_timeout_s=30.0,
)


def apply_scale_flags(
    settings: dict[str, Any],
    *,
    vectorize: str | None = None,
    num_gpus_per_learner: float | str | None = None,
    num_gpus_per_env_runner: float | None = None,
) -> dict[str, Any]:
    """Put the CLI's scale flags into a run's ``settings`` (in place); validates them."""
    runners = settings.setdefault("env_runners", {})
    learners = settings.setdefault("learners", {})
    if vectorize is not None:
        runners["gym_env_vectorize_mode"] = vectorize
    mode = runners.get("gym_env_vectorize_mode")
    if mode is not None and str(mode).lower() not in VECTORIZE_MODES:
        raise ValueError(
            f"env_runners.gym_env_vectorize_mode: expected one of {', '.join(VECTORIZE_MODES)}, "
            f"got {mode!r}"
        )
    if mode is not None:
        runners["gym_env_vectorize_mode"] = str(mode).lower()
    if num_gpus_per_learner is not None:
        learners["num_gpus_per_learner"] = _gpu_value(
            "learners.num_gpus_per_learner", num_gpus_per_learner, allow_auto=True
        )
    if num_gpus_per_env_runner is not None:
        runners["num_gpus_per_env_runner"] = _gpu_value(
            "env_runners.num_gpus_per_env_runner", num_gpus_per_env_runner, allow_auto=False
        )
    return settings


def _gpu_value(name: str, value: Any, allow_auto: bool) -> float | str:
    if allow_auto and str(value).lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        expected = "a number >= 0 or 'auto'" if allow_auto else "a number >= 0"
        raise ValueError(f"{name}: expected {expected}, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
    return int(number) if number.is_integer() else number


def available_gpus() -> float:
    """GPUs of the running Ray cluster, else the ones torch sees in this process."""
    try:
        import ray

        if ray.is_initialized():
            return float(ray.cluster_resources().get("GPU", 0.0))
    except Exception:  # pragma: no cover - Ray not importable or not reachable
        pass
    import torch

    return float(torch.cuda.device_count())


def resolve_gpus(
    learners: dict[str, Any], runners: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copies of the learner/EnvRunner settings with ``"auto"`` GPU counts made numbers."""
    learners, runners = dict(learners), dict(runners)
    value = learners.get("num_gpus_per_learner", "auto")
    if str(value).lower() == "auto":
        learners["num_gpus_per_learner"] = 1 if available_gpus() >= 1 else 0
    else:
        learners["num_gpus_per_learner"] = _gpu_value(
            "learners.num_gpus_per_learner", value, allow_auto=False
        )
    if "num_gpus_per_env_runner" in runners:
        runners["num_gpus_per_env_runner"] = _gpu_value(
            "env_runners.num_gpus_per_env_runner",
            runners["num_gpus_per_env_runner"],
            allow_auto=False,
        )
    return learners, runners


def fault_tolerance_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """:data:`FAULT_TOLERANCE_DEFAULTS` updated with the run's ``fault_tolerance`` section."""
    import inspect

    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

    ft = {**FAULT_TOLERANCE_DEFAULTS, **(settings.get("fault_tolerance") or {})}
    valid = set(inspect.signature(AlgorithmConfig.fault_tolerance).parameters) - {"self"}
    unknown = sorted(set(ft) - valid)
    if unknown:
        raise ValueError(
            f"fault_tolerance: unknown key(s) {', '.join(unknown)}; valid keys are "
            f"{', '.join(sorted(k for k in valid if 'worker' not in k and 'recreate' not in k))}"
        )
    return ft
