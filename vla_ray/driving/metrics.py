"""Driving metrics from an env's final ``info`` per episode (any env that reports them).

An episode counts as a driving episode when its final info has ``route_completion`` (the share of
the route driven, in ``[0, 1]``). Optional keys: ``collision`` (bool), ``infractions`` (episode
counts by kind), ``mean_speed`` (m/s over the episode) and ``distance`` (metres).

Driving score, as the CARLA leaderboard (1.0) defines it: per episode, route completion times the
infraction penalty, the product over infractions of a coefficient per kind
(``INFRACTION_PENALTIES``); kinds without a coefficient (e.g. ``offroad``, ``route_deviation``,
which end a LangDrive episode and so show in route completion) multiply by 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ROUTE_COMPLETION_KEY = "route_completion"
# CARLA leaderboard 1.0 infraction coefficients
INFRACTION_PENALTIES: dict[str, float] = {
    "collision_pedestrian": 0.50,
    "collision_vehicle": 0.60,
    "collision_static": 0.65,
    "red_light": 0.70,
    "stop_sign": 0.80,
}


def infraction_penalty(infractions: Mapping[str, Any] | None) -> float:
    """Product of ``INFRACTION_PENALTIES[kind] ** count`` over the episode's infractions."""
    penalty = 1.0
    for kind, count in (infractions or {}).items():
        n = int(count)
        if n < 0:
            raise ValueError(f"infractions[{kind!r}]: expected a count >= 0, got {count!r}")
        penalty *= INFRACTION_PENALTIES.get(str(kind), 1.0) ** n
    return penalty


def episode_metrics(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """One episode's driving metrics from its final info; None when it reports no
    ``route_completion``."""
    if not isinstance(info, Mapping) or ROUTE_COMPLETION_KEY not in info:
        return None
    completion = float(np.clip(float(info[ROUTE_COMPLETION_KEY]), 0.0, 1.0))
    infractions = {str(k): int(v) for k, v in (info.get("infractions") or {}).items()}
    out: dict[str, Any] = dict(
        route_completion=completion,
        driving_score=completion * infraction_penalty(infractions),
        collision=float(bool(info.get("collision", False))),
        infractions=infractions,
    )
    for key in ("mean_speed", "distance"):
        if key in info:
            out[key] = float(info[key])
    return out


def aggregate(episodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over episodes (``episode_metrics`` outputs): route completion, driving score,
    collision rate, mean speed; infractions per episode and per km by kind."""
    if not episodes:
        return {}
    out: dict[str, Any] = dict(
        route_completion=float(np.mean([e["route_completion"] for e in episodes])),
        driving_score=float(np.mean([e["driving_score"] for e in episodes])),
        collision_rate=float(np.mean([e["collision"] for e in episodes])),
    )
    speeds = [e["mean_speed"] for e in episodes if "mean_speed" in e]
    if speeds:
        out["mean_speed"] = float(np.mean(speeds))
    kinds = sorted({k for e in episodes for k in e["infractions"]})
    totals = {k: sum(e["infractions"].get(k, 0) for e in episodes) for k in kinds}
    out["infractions_per_episode"] = {k: totals[k] / len(episodes) for k in kinds}
    km = sum(e.get("distance", 0.0) for e in episodes) / 1000.0
    if km > 0:
        out["infractions_per_km"] = {k: totals[k] / km for k in kinds}
    return out
