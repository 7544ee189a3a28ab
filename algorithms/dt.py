"""Decision Transformer (Chen et al., 2021) as a new RLlib algorithm with the VLA trunk.

A causal transformer over interleaved (return-to-go, observation, action) tokens of a context
window of ``K = context_length`` steps predicts each step's action from its observation token
(masked MSE to the dataset's actions).

- Observations are encoded by the VLA trunk (``build_trunk``: state-only or image + instruction),
  one feature vector per step; returns-to-go, actions and the episode timestep are embedded
  linearly / by lookup. The sequence model is a small GPT-2 built locally from a
  ``transformers.GPT2Config`` (no download).
- Data: ``DTPreLearner`` (an RLlib ``OfflinePreLearner`` inside ``ray.data``) keeps every
  episode streamed to it and turns them into ``train_batch_size_per_learner`` windows ending
  at uniformly drawn steps, with returns-to-go ``R_t = sum_{k>=t} gamma^(k-t) r_k`` computed
  per episode (windows never cross an episode boundary; the first steps are left-padded and
  masked).
- Evaluation on the EnvRunners: the ``DTContext`` env-to-module connector builds the same window
  from the running episode (last K observations, previous actions, ``target_return`` minus the
  rewards collected so far, timesteps), so the module itself is stateless. Evaluation runs
  whole episodes (``evaluation_duration_unit="episodes"``); ``return_to_go_gamma`` should stay 1
  (the undiscounted return-to-go the evaluation conditions on).

Return-to-go values are divided by ``return_scale`` in the data and the connector alike. The
RLlib checkpoint is the policy (the transformer is part of it; no ``vla/`` export);
``vla-ray eval`` runs it with ``ContextRunner``, which builds the same window from the episode it
plays (the settings come from the checkpoint's ``vla_ray_meta.json``; ``--target-return``
overrides the return it conditions on). ``vla-ray export`` writes the window graph
(``vla_ray.export_dt``: torchscript, torch-export) whose runner keeps the window
(``vla_ray.sequence``), and Serve's torch backend keeps one window per session id.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import tree
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.bc import BC, BCConfig
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils import flatten_dict
from torch import nn

from vla_ray.algorithm_spec import OfflineVLAAlgorithmConfig
from vla_ray.config import ConfigError
from vla_ray.data.stream import BUFFER_STEPS, VLAPreLearner
from vla_ray.models.vla import build_trunk, load_vla_tokenizer
from vla_ray.rl_module import vla_config_from_spaces
from vla_ray.sequence import (  # noqa: F401  (window and context_window: re-exported)
    MASK,
    PREV_ACTIONS,
    RTG,
    TIMESTEPS,
    WindowRunner,
    context_window,
    window,
)

# model_config keys of the DT module (sequence model size); the rest are VLAConfig fields
MODULE_KEYS = ("dt_hidden", "dt_layers", "dt_heads", "dt_dropout", "max_timestep", "value")
MODULE_ID = "default_policy"


# -- returns-to-go and windows (pure functions, unit-tested) --------------------------------------
def returns_to_go(rewards: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """``R_t = r_t + gamma * R_{t+1}`` over one episode's rewards (R after the last step = 0)."""
    r = np.asarray(rewards, np.float64)
    out = np.zeros_like(r)
    acc = 0.0
    for t in range(len(r) - 1, -1, -1):
        acc = r[t] + gamma * acc
        out[t] = acc
    return out.astype(np.float32)


def dt_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared action error over the real (mask 1) steps of (B, K, A) windows."""
    m = mask.float().unsqueeze(-1)
    return ((pred - target) ** 2 * m).sum() / (m.sum() * pred.shape[-1]).clamp(min=1.0)


def prepare_episode(ep: Any, gamma: float = 1.0, scale: float = 1.0) -> tuple[Any, Any, Any]:
    """A ``SingleAgentEpisode`` -> (observations dict, actions ``(T, A)``, returns-to-go ``(T,)``
    divided by ``scale``), what :func:`sample_windows` draws from."""
    obs = ep.get_observations()
    obs = obs if isinstance(obs, dict) else {"obs": obs}
    rtg = returns_to_go(ep.get_rewards(), gamma) / scale
    actions = np.asarray(ep.get_actions(), np.float32).reshape(len(ep), -1)
    return {k: np.asarray(v) for k, v in obs.items()}, actions, rtg


def sample_windows(
    data: list[tuple[Any, Any, Any]], n: int, K: int, rng: np.random.Generator
) -> dict[str, Any]:
    """``n`` windows (stacked, see :func:`window`) from prepared episodes: episodes drawn in
    proportion to their length, window ends uniform over the episode's steps."""
    data = [d for d in data if len(d[2]) > 0]
    if not data:
        raise ValueError("sample_windows: no non-empty episodes to sample from")
    lengths = np.asarray([len(d[2]) for d in data], np.float64)
    rows = []
    for i in rng.choice(len(data), size=n, p=lengths / lengths.sum()):
        obs, actions, rtg = data[i]
        rows.append(window(obs, actions, rtg, int(rng.integers(len(rtg))), K))
    out = _stack(rows)
    if set(out["obs"]) == {"obs"}:  # a plain (non-Dict) observation space
        out["obs"] = out["obs"]["obs"]
    return out


def episode_windows(
    episodes: list[Any],
    n: int,
    K: int,
    rng: np.random.Generator,
    *,
    gamma: float = 1.0,
    scale: float = 1.0,
) -> dict[str, Any]:
    """``n`` windows from ``SingleAgentEpisode``s (see :func:`sample_windows`); returns-to-go
    are computed per episode (``gamma``) and divided by ``scale``."""
    return sample_windows([prepare_episode(ep, gamma, scale) for ep in episodes], n, K, rng)


def _stack(items: list[Any]) -> Any:
    return tree.map_structure(lambda *xs: np.stack(xs), *items)


# -- data: episodes -> windows ------------------------------------------------------------------
class DTPreLearner(VLAPreLearner):
    """Episodes streamed from ``ray.data`` (see ``vla_ray.data.stream``) ->
    ``train_batch_size_per_learner`` training windows, drawn from every episode read so far
    (the oldest dropped beyond ``BUFFER_STEPS`` steps)."""

    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self._rng = np.random.default_rng(config.seed)
        self._episodes: dict[str, Any] = {}  # id -> prepared episode, in reading order
        self._steps = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vla_ray.data.rllib_format import _unpack

        cfg = self.config
        for item in batch["item"]:
            ep = _unpack(item)
            if ep.id_ not in self._episodes:
                self._episodes[ep.id_] = prepare_episode(
                    ep, cfg.return_to_go_gamma, cfg.return_scale
                )
                self._steps += len(ep)
        while self._steps > BUFFER_STEPS and len(self._episodes) > 1:
            self._steps -= len(self._episodes.pop(next(iter(self._episodes)))[2])
        w = sample_windows(
            list(self._episodes.values()),
            cfg.train_batch_size_per_learner,
            int(cfg.context_length),
            self._rng,
        )
        out = {
            Columns.OBS: w["obs"],
            Columns.ACTIONS: w["actions"],
            PREV_ACTIONS: w["actions"],  # the causal mask hides a_t from the a_t prediction
            RTG: w["rtg"],
            TIMESTEPS: w["timesteps"],
            MASK: w["mask"],
        }
        return flatten_dict({MODULE_ID: out})


# -- evaluation: the running episode -> the context window ----------------------------------------
class ContextRunner(WindowRunner):
    """The DT's module as a step-by-step policy outside RLlib (``vla-ray eval``): the window
    ``DTContext`` builds on the EnvRunners, from the episode it plays (see ``WindowRunner``)."""

    def __init__(
        self, module: DTModule, context_length: int, target_return: float, return_scale: float
    ):
        self.module = module
        super().__init__(
            self._act_module, module.act_dim, context_length, target_return, return_scale
        )

    @torch.no_grad()
    def _act_module(self, w: dict[str, Any]) -> np.ndarray:
        batch = {
            Columns.OBS: tree.map_structure(torch.as_tensor, w["obs"]),
            PREV_ACTIONS: torch.as_tensor(w["actions"]),
            RTG: torch.as_tensor(w["rtg"]),
            TIMESTEPS: torch.as_tensor(w["timesteps"]),
            MASK: torch.as_tensor(w["mask"]),
        }
        return self.module.forward_inference(batch)[Columns.ACTIONS].cpu().numpy()


class DTContext(ConnectorV2):
    """Env-to-module piece: the last K steps of each running episode, conditioned on
    ``target_return`` minus the rewards collected so far (scaled by ``return_scale``)."""

    def __init__(
        self, *args, context_length: int, target_return: float, return_scale: float, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.K, self.target, self.scale = int(context_length), target_return, return_scale

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs):
        for ep in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=True):
            t = len(ep)  # actions taken so far; the current observation is step t
            start = max(0, t - self.K + 1)
            act_dim = int(np.prod(ep.action_space.shape))
            w = context_window(
                [ep.get_observations(i) for i in range(start, t + 1)],
                np.asarray(ep.get_actions(slice(0, t)), np.float32).reshape(t, act_dim)
                if t
                else np.zeros((0, act_dim), np.float32),
                np.asarray(ep.get_rewards(), np.float64) if t else np.zeros(0),
                self.K,
                self.target,
                self.scale,
            )
            self.add_batch_item(batch, Columns.OBS, w["obs"], ep)
            self.add_batch_item(batch, PREV_ACTIONS, w["actions"], ep)
            self.add_batch_item(batch, RTG, w["rtg"], ep)
            self.add_batch_item(batch, TIMESTEPS, w["timesteps"], ep)
            self.add_batch_item(batch, MASK, w["mask"], ep)
        return batch


# -- module -------------------------------------------------------------------------------------
class DTModule(TorchRLModule):
    """VLA trunk per step + GPT-2 over (R, s, a) tokens + tanh action predictor."""

    MODEL_KEYS = MODULE_KEYS

    def setup(self) -> None:
        from transformers import GPT2Config, GPT2Model

        mc = dict(self.model_config or {})
        extra = {k: mc.pop(k) for k in MODULE_KEYS if k in mc}
        mc.pop("head", None)
        config = vla_config_from_spaces(
            {**mc, "head": "mlp"}, self.observation_space, self.action_space
        )
        self.config = config
        self.tokenizer = load_vla_tokenizer(config)  # the instruction's (for export)
        self.trunk = build_trunk(config, self.tokenizer)
        H = int(extra.get("dt_hidden", 128))
        heads = int(extra.get("dt_heads", 1))
        if H % heads:
            raise ConfigError(f"dt_heads: must divide dt_hidden={H}, got {heads}")
        p = float(extra.get("dt_dropout", 0.1))
        self.gpt = GPT2Model(
            GPT2Config(
                vocab_size=1,  # inputs are embeddings: no token vocabulary
                bos_token_id=0,
                eos_token_id=0,
                n_embd=H,
                n_layer=int(extra.get("dt_layers", 3)),
                n_head=heads,
                n_positions=1024,
                n_inner=4 * H,
                resid_pdrop=p,
                embd_pdrop=p,
                attn_pdrop=p,
            )
        )
        self.act_dim = int(np.prod(self.action_space.shape))
        self.max_timestep = int(extra.get("max_timestep", 1000))
        self.embed_timestep = nn.Embedding(self.max_timestep + 1, H)
        self.embed_return = nn.Linear(1, H)
        self.embed_state = nn.Linear(self.trunk.feature_dim, H)
        self.embed_action = nn.Linear(self.act_dim, H)
        self.embed_ln = nn.LayerNorm(H)
        self.predict_action = nn.Linear(H, self.act_dim)
        self._low = float(np.min(self.action_space.low))
        self._high = float(np.max(self.action_space.high))

    def predict(self, batch: dict[str, Any], functional: bool = False) -> torch.Tensor:
        """Actions (B, K, A) predicted at every step of the windows. ``functional``: the trunk
        as a plain function of its inputs (no instruction-prefix memo; for export)."""
        rtg = batch[RTG].float()
        B, K = rtg.shape
        obs = tree.map_structure(lambda x: x.reshape(B * K, *x.shape[2:]), batch[Columns.OBS])
        trunk = self.trunk.forward_functional if functional else self.trunk
        feats = trunk(obs).reshape(B, K, -1)
        t = self.embed_timestep(batch[TIMESTEPS].long().clamp(0, self.max_timestep))
        s = self.embed_state(feats) + t
        a = self.embed_action(batch[PREV_ACTIONS].float().reshape(B, K, -1)) + t
        r = self.embed_return(rtg.unsqueeze(-1)) + t
        x = self.embed_ln(torch.stack([r, s, a], dim=2).reshape(B, 3 * K, -1))
        mask = batch[MASK].float().repeat_interleave(3, dim=1)
        h = self.gpt(inputs_embeds=x, attention_mask=mask).last_hidden_state
        h = h.reshape(B, K, 3, -1)[:, :, 1]  # the observation tokens predict the actions
        unit = torch.tanh(self.predict_action(h))
        return self._low + (unit + 1.0) * 0.5 * (self._high - self._low)

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.predict(batch)[:, -1]}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.predict(batch)}

    def get_inference_action_dist_cls(self):
        return None

    def get_exploration_action_dist_cls(self):
        return None

    def get_train_action_dist_cls(self):
        return None


# -- learner, config, algorithm ------------------------------------------------------------------
class DTLearner(TorchLearner):
    """Masked action MSE over the windows."""

    def compute_loss_for_module(self, *, module_id, config=None, batch, fwd_out):
        loss = dt_loss(fwd_out[Columns.ACTIONS], batch[Columns.ACTIONS].float(), batch[MASK])
        self.metrics.log_value((module_id, "action_mse"), loss.item(), window=1)
        return loss


class DTConfig(OfflineVLAAlgorithmConfig, BCConfig):
    """Decision Transformer settings on RLlib's offline (BC) pipeline; the caller adds env
    (spaces, evaluation), module and data."""

    NAME: ClassVar[str] = "dt"
    # the action predictor is the DT's own (tanh-squashed linear) output layer
    HEADS: ClassVar[tuple[str, ...]] = ("mlp",)
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="mlp", value="none")
    # the RLlib checkpoint is the policy (the transformer is part of it): no ``vla/`` export
    EXPORTS_VLA: ClassVar[bool] = False

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DT)
        self.prelearner_class = DTPreLearner
        self.set_training_defaults(
            lr=1e-4,
            train_batch_size_per_learner=64,
            grad_clip=0.25,
            context_length=20,
            target_return=3600.0,
            return_scale=1000.0,
            return_to_go_gamma=1.0,
        )

    def training(
        self,
        *,
        context_length: int = NotProvided,
        target_return: float = NotProvided,
        return_scale: float = NotProvided,
        return_to_go_gamma: float = NotProvided,
        **kwargs,
    ) -> DTConfig:
        super().training(**kwargs)
        for name, value in dict(
            context_length=context_length,
            target_return=target_return,
            return_scale=return_scale,
            return_to_go_gamma=return_to_go_gamma,
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        if int(self.context_length) < 1:
            self._value_error(f"context_length: must be >= 1, got {self.context_length}")
        if not self.return_scale > 0:
            self._value_error(f"return_scale: must be > 0, got {self.return_scale}")
        if not 0.0 < self.return_to_go_gamma <= 1.0:
            self._value_error(
                f"return_to_go_gamma: must be in (0, 1], got {self.return_to_go_gamma}"
            )

    def build_env_to_module_connector(self, env=None, spaces=None, device=None):
        pipeline = super().build_env_to_module_connector(env=env, spaces=spaces, device=device)
        pipeline.prepend(
            DTContext(
                context_length=self.context_length,
                target_return=self.target_return,
                return_scale=self.return_scale,
            )
        )
        return pipeline

    def get_default_learner_class(self):
        return DTLearner

    def get_default_rl_module_spec(self):
        from ray.rllib.core.rl_module.rl_module import RLModuleSpec

        return RLModuleSpec(module_class=DTModule)


class DT(BC):
    """RLlib's offline training step (sample windows, update the learner) with the DT."""

    @classmethod
    def get_default_config(cls) -> DTConfig:
        return DTConfig()
