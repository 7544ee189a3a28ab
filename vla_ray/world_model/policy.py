"""``LatentPolicy``: a trained ``WorldModelModule`` as an episode policy for ``vla-ray eval``:
it filters the observations with the RSSM posterior and acts with the latent actor (``planner``
"none") or plans with CEM / MPPI over the learned latent dynamics, warm-started from the
actor's imagined plan (``vla_ray.world_model.planner``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vla_ray.config import check_choice
from vla_ray.world_model.planner import PlannerConfig, latent_objective, plan
from vla_ray.world_model.rssm import RSSMState

PLANNER_CHOICES = ("none", "cem", "mppi")


class LatentPolicy:
    """Deterministic actions for one episode at a time (``reset`` between episodes)."""

    def __init__(
        self, module: Any, planner: str = "none", config: PlannerConfig | None = None, seed: int = 0
    ):
        check_choice("planner", planner, PLANNER_CHOICES)
        self.module = module.eval()
        self.planner = planner
        self.config = config or PlannerConfig(horizon=module.wm_config.horizon)
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.state: RSSMState | None = None
        self.prev_action: torch.Tensor | None = None
        self.steps = 0

    def observe(self, reward: float) -> None:  # the world model predicts rewards itself
        pass

    @torch.no_grad()
    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        m = self.module
        rssm, wm = m.world_model.rssm, m.world_model
        B = 1
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in obs.items() if k in wm.obs_shapes}
        if self.state is None:
            state, action = rssm.initial(B), torch.zeros(B, wm.action_dim)
        else:
            state, action = self.state, self.prev_action
        h = rssm.recur(state, action)
        embed = wm.encode({k: v[:, None] for k, v in tensors.items()})[:, 0]
        probs = rssm.post(rssm.post_mlp(torch.cat([h, embed], -1)))
        z = torch.nn.functional.one_hot(probs.argmax(-1), rssm.classes).float()
        self.state = RSSMState(h, z)
        act = m.actor.mode(self.state.features())
        if self.planner != "none":
            act = self._plan(act)
        self.prev_action = act
        self.steps += 1
        return act.cpu().numpy()

    def _plan(self, first: torch.Tensor) -> torch.Tensor:
        m, cfg = self.module, self.config
        # warm start: the actor's own plan, imagined with the prior's modes
        state, warm = self.state, [first[0]]
        for _ in range(cfg.horizon - 1):
            state, probs = m.world_model.rssm.img_step(state, warm[-1][None])
            z = torch.nn.functional.one_hot(probs.argmax(-1), m.world_model.rssm.classes).float()
            state = RSSMState(state.h, z)
            warm.append(m.actor.mode(state.features())[0])
        objective = latent_objective(
            m.world_model, m.critic, self.state, m.wm_config.gamma, self.seed + self.steps
        )
        g = torch.Generator().manual_seed(self.seed + self.steps)
        best = plan(
            self.planner,
            objective,
            m.world_model.action_dim,
            -1.0,
            1.0,
            cfg,
            warm_start=torch.stack(warm),
            generator=g,
        )
        return best[:1]
