"""SuccessRateCallback: overall and per-goal success from the episodes' final infos."""

from __future__ import annotations

import pytest
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

from vla_ray.callbacks import SUCCESS_BY_TARGET_KEY, SUCCESS_KEY, SuccessRateCallback


class _Episode:
    def __init__(self, info: dict) -> None:
        self.info = info

    def get_infos(self, index: int) -> dict:
        assert index == -1
        return self.info


def _log(infos: list[dict]) -> MetricsLogger:
    logger = MetricsLogger()
    callback = SuccessRateCallback()
    for info in infos:
        callback.on_episode_end(episode=_Episode(info), metrics_logger=logger)
    return logger


def test_success_rate_overall_and_per_target():
    logger = _log(
        [
            {"is_success": True, "target_color": "red"},
            {"is_success": True, "target_color": "red"},
            {"is_success": False, "target_color": "green"},
            {"is_success": True, "target_color": "blue"},
            {"is_success": False, "target_color": "blue"},
        ]
    )
    assert logger.peek(SUCCESS_KEY) == pytest.approx(3 / 5)
    assert logger.peek((SUCCESS_BY_TARGET_KEY, "red")) == pytest.approx(1.0)
    assert logger.peek((SUCCESS_BY_TARGET_KEY, "green")) == pytest.approx(0.0)
    assert logger.peek((SUCCESS_BY_TARGET_KEY, "blue")) == pytest.approx(0.5)


def test_episodes_without_success_or_target_are_not_counted():
    logger = _log([{"is_success": True}, {"distance": 0.3}, {"is_success": False}])
    assert logger.peek(SUCCESS_KEY) == pytest.approx(0.5)
    assert not logger.reduce().get(SUCCESS_BY_TARGET_KEY)
