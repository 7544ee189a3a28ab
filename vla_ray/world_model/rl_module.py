"""``WorldModelModule``: the world model, latent actor and critic as one stateful RLlib
TorchRLModule.

Acting filters the observation stream with the RSSM's posterior (the VLA trunk encodes each
observation; the instruction prefix is cached), carrying ``h``, ``z`` and the previous action
in the RLlib state, and the latent actor picks the action. ``model_config`` holds the VLAConfig
fields (as for ``VLAModule``; I/O shapes come from the spaces) plus ``world_model``: a dict of
:class:`WorldModelConfig` fields.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from vla_ray.world_model.config import WorldModelConfig
from vla_ray.world_model.imagination import LatentActor, LatentCritic
from vla_ray.world_model.losses import ReturnNormalizer
from vla_ray.world_model.model import WorldModel
from vla_ray.world_model.rssm import RSSMState, sample_categorical

WORLD_MODEL_KEY = "world_model"


class WorldModelModule(TorchRLModule):
    """Stateful module: RSSM filtering over the VLA trunk's features + latent actor-critic."""

    # model_config keys besides the VLAConfig fields (``vla_ray.setting_keys`` checks them)
    MODEL_KEYS: tuple[str, ...] = (WORLD_MODEL_KEY,)

    def setup(self) -> None:
        from vla_ray.rl_module import vla_config_from_spaces

        mc = dict(self.model_config or {})
        wm_cfg = WorldModelConfig.from_dict(dict(mc.pop(WORLD_MODEL_KEY, None) or {}))
        mc.pop("head", None)  # the latent actor is the policy; no VLA action head
        self.vla_config = vla_config_from_spaces(mc, self.observation_space, self.action_space)
        self.wm_config = wm_cfg
        self.world_model = WorldModel(self.vla_config, wm_cfg)
        F = self.world_model.rssm.feature_dim
        A = self.world_model.action_dim
        # actions in [-1, 1]: RLlib's module-to-env connector rescales them to the env's bounds
        self.actor = LatentActor(F, A, wm_cfg.hidden, -1.0, 1.0)
        self.critic = LatentCritic(F, wm_cfg)
        self.return_norm = ReturnNormalizer(wm_cfg.return_norm_decay)

    def get_initial_state(self) -> dict[str, torch.Tensor]:
        c = self.wm_config
        return {
            "h": torch.zeros(c.deter),
            "z": torch.zeros(c.stoch * c.classes),
            "a": torch.zeros(self.world_model.action_dim),
            "first": torch.ones(1),
        }

    def _act(self, batch: dict[str, Any], explore: bool) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        time_dim = obs["instruction"].dim() == 3  # (B, T=1, L) from RLlib's time-dim connector
        if time_dim:
            obs = {k: v[:, -1] for k, v in obs.items()}
        st = batch[Columns.STATE_IN]
        c = self.wm_config
        rssm = self.world_model.rssm
        B = obs["instruction"].shape[0]
        first = st["first"].reshape(B, 1).float()
        init = rssm.initial(B)
        h = first * init.h + (1 - first) * st["h"].reshape(B, c.deter)
        z = first * init.z.flatten(-2) + (1 - first) * st["z"].reshape(B, -1)
        state = RSSMState(h, z.reshape(B, c.stoch, c.classes))
        a = st["a"].reshape(B, -1) * (1 - first)
        with torch.no_grad():
            h = rssm.recur(state, a)
            embed = self.world_model.encode({k: v[:, None] for k, v in obs.items()})[:, 0]
            probs = rssm.post(rssm.post_mlp(torch.cat([h, embed], -1)))
            if explore:
                z = sample_categorical(probs)
            else:
                z = nn.functional.one_hot(probs.argmax(-1), c.classes).float()
            feat = RSSMState(h, z).features()
            action = self.actor.sample(feat)[0] if explore else self.actor.mode(feat)
        out_state = {"h": h, "z": z.flatten(-2), "a": action, "first": torch.zeros(B, 1)}
        return {
            Columns.ACTIONS: action[:, None] if time_dim else action,
            Columns.STATE_OUT: out_state,
        }

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch, explore=False)

    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch, explore=True)

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {}  # the learner runs the world model and imagination itself

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch, explore=False)
