"""Planners over action sequences: CEM and MPPI (TD-MPC2's), and random shooting (the control).

A planner maximises ``objective(actions (N, H, A)) -> scores (N,)`` within ``[low, high]``,
starting from a warm-start mean (H, A) (the learned policy's imagined plan). With a world model
the objective is :func:`latent_objective`: imagined discounted reward plus the critic's value at
the horizon, from the current posterior state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vla_ray.config import check_choice

Objective = Callable[[torch.Tensor], torch.Tensor]
PLANNERS = ("cem", "mppi", "random")


@dataclass
class PlannerConfig:
    """Sampling budget: ``iterations`` x ``num_samples`` evaluated sequences of ``horizon``."""

    horizon: int = 8
    iterations: int = 4
    num_samples: int = 64
    num_elites: int = 8
    init_std: float = 0.5
    min_std: float = 0.05
    temperature: float = 0.5  # MPPI: softmax temperature over normalised scores
    momentum: float = 0.1  # CEM: weight of the previous mean in the refit


def _sample(mean: torch.Tensor, std: torch.Tensor, n: int, low: float, high: float, g):
    eps = torch.randn((n, *mean.shape), generator=g, device=mean.device)
    return (mean + std * eps).clamp(low, high)


def plan(
    name: str,
    objective: Objective,
    action_dim: int,
    low: float,
    high: float,
    config: PlannerConfig | None = None,
    warm_start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The best action sequence (H, A) found by planner ``name`` (cem, mppi, random) within
    ``[low, high]``; ``warm_start`` (H, A) is the initial mean (default: the middle of the box)
    and one of the candidates."""
    check_choice("planner", name, PLANNERS)
    cfg = config or PlannerConfig()
    H = cfg.horizon
    mean = (
        torch.full((H, action_dim), (low + high) / 2)
        if warm_start is None
        else warm_start.detach().clamp(low, high)
    )
    if name == "random":  # uniform shooting with the same budget
        n = cfg.iterations * cfg.num_samples
        u = torch.rand((n, H, action_dim), generator=generator)
        cands = low + u * (high - low)
        if warm_start is not None:
            cands[0] = mean
        return cands[objective(cands).argmax()]
    std = torch.full_like(mean, cfg.init_std * (high - low) / 2)
    best, best_score = mean.clone(), objective(mean[None])[0]
    for _ in range(cfg.iterations):
        cands = _sample(mean, std, cfg.num_samples, low, high, generator)
        cands[0] = mean
        scores = objective(cands)
        top = scores.argmax()
        if scores[top] > best_score:
            best, best_score = cands[top].clone(), scores[top]
        if name == "cem":
            elite = cands[scores.topk(cfg.num_elites).indices]
            mean = cfg.momentum * mean + (1 - cfg.momentum) * elite.mean(0)
            std = elite.std(0).clamp(min=cfg.min_std)
        else:  # mppi: exponentially weighted average of all samples
            z = (scores - scores.max()) / (scores.std() + 1e-8)
            w = torch.softmax(z / cfg.temperature, 0)
            mean = (w[:, None, None] * cands).sum(0)
            var = (w[:, None, None] * (cands - mean) ** 2).sum(0)
            std = var.sqrt().clamp(min=cfg.min_std)
    final = objective(mean[None])[0]
    return mean if final >= best_score else best


def latent_objective(
    world_model,
    critic,
    start,
    gamma: float,
    generator_seed: int = 0,
) -> Objective:
    """Score action sequences by imagined discounted reward from ``start`` (one RSSMState row)
    plus the critic's discounted value at the horizon (0 without a critic). Every call uses the
    same latent samples (common random numbers), so candidates are compared fairly."""

    @torch.no_grad()
    def objective(actions: torch.Tensor) -> torch.Tensor:
        from vla_ray.world_model.rssm import RSSMState

        N, H, _ = actions.shape
        g = torch.Generator(device=actions.device).manual_seed(generator_seed)
        state = RSSMState(start.h.expand(N, -1), start.z.expand(N, -1, -1))
        total = torch.zeros(N, device=actions.device)
        disc = torch.ones(N, device=actions.device)
        for t in range(H):
            state, _ = world_model.rssm.img_step(state, actions[:, t], g)
            feat = state.features()
            total = total + disc * world_model.reward(feat)
            disc = disc * gamma * world_model.continue_prob(feat)
        if critic is not None:
            total = total + disc * critic(state.features())
        return total

    return objective
