"""RLlib callbacks shared by every vla-ray run."""

from __future__ import annotations

from typing import Any

from ray.rllib.callbacks.callbacks import RLlibCallback

SUCCESS_KEY = "success_rate"


class SuccessRateCallback(RLlibCallback):
    """Logs ``env_runners/success_rate``: the mean of the final ``info["is_success"]`` per episode.

    Episodes whose env reports no ``is_success`` are not counted.
    """

    def on_episode_end(self, *, episode: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
        if metrics_logger is None:
            return
        info = episode.get_infos(-1)
        if isinstance(info, dict) and "is_success" in info:
            metrics_logger.log_value(
                SUCCESS_KEY, float(bool(info["is_success"])), reduce="mean", window=100
            )
