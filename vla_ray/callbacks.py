"""RLlib callbacks shared by every vla-ray run."""

from __future__ import annotations

from typing import Any

from ray.rllib.callbacks.callbacks import RLlibCallback

SUCCESS_KEY = "success_rate"
# per-goal success, logged when the env's info names the goal (LangReach: the target colour,
# LangDrive: the manoeuvre, as ``goal``); the first of these keys present names it
SUCCESS_BY_TARGET_KEY = "success_by_target"
TARGET_INFO_KEY = "target_color"
GOAL_INFO_KEYS = (TARGET_INFO_KEY, "goal")
# driving metrics (vla_ray.driving.metrics), logged when the info has ``route_completion``
DRIVING_KEY = "driving"
# safety interventions per rule id per episode, and the episode's safety cost (vla_ray.safety)
SAFETY_KEY = "safety"
EPISODE_COST_KEY = "episode_cost"


def episode_goal(info: Any) -> str | None:
    """The goal an episode's final info names (``GOAL_INFO_KEYS``), or None."""
    if not isinstance(info, dict):
        return None
    for key in GOAL_INFO_KEYS:
        if info.get(key) is not None:
            return str(info[key])
    return None


class SuccessRateCallback(RLlibCallback):
    """Logs ``env_runners/success_rate``: the mean of the final ``info["is_success"]`` per episode.

    Episodes whose env reports no ``is_success`` are not counted. When the final info also names
    the goal (``info["target_color"]`` or ``info["goal"]``), ``env_runners/success_by_target/<goal>``
    is logged too, so a policy that solves two colours and never the third shows as such rather
    than as a 0.67 mean. A driving env's final info (``route_completion``, ...) gives
    ``env_runners/driving/<metric>``: route completion, driving score, collision, mean speed.
    With the safety wrapper (``env.safety``), ``env_runners/safety/<rule id>`` (interventions per
    episode) and ``env_runners/episode_cost`` are logged too.
    """

    def on_episode_end(self, *, episode: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
        if metrics_logger is None:
            return
        info = episode.get_infos(-1)
        if isinstance(info, dict) and "is_success" in info:
            success = float(bool(info["is_success"]))
            metrics_logger.log_value(SUCCESS_KEY, success, reduce="mean", window=100)
            target = episode_goal(info)
            if target is not None:
                metrics_logger.log_value(
                    (SUCCESS_BY_TARGET_KEY, str(target)), success, reduce="mean", window=100
                )
        from vla_ray.driving.metrics import episode_metrics

        driving = episode_metrics(info) if isinstance(info, dict) else None
        if driving is not None:
            for key in ("route_completion", "driving_score", "collision", "mean_speed"):
                if key in driving:
                    metrics_logger.log_value(
                        (DRIVING_KEY, key), driving[key], reduce="mean", window=100
                    )
        # the safety wrapper's counts (episode totals in the final info): mean per episode
        if isinstance(info, dict) and isinstance(info.get(SAFETY_KEY), dict):
            for rule, n in info[SAFETY_KEY].items():
                metrics_logger.log_value(
                    (SAFETY_KEY, str(rule)), float(n), reduce="mean", window=100
                )
            metrics_logger.log_value(
                EPISODE_COST_KEY, float(info.get(EPISODE_COST_KEY, 0.0)), reduce="mean", window=100
            )
