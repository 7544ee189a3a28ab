"""``VLAModule``: the VLA packaged as an RLlib (new API stack) TorchRLModule.

Plug it into any RLlib algorithm config::

    PPOConfig().rl_module(rl_module_spec=RLModuleSpec(module_class=VLAModule,
                                                       model_config={"head": "gaussian"}))

``model_config`` takes the ``VLAConfig`` fields except the I/O ones, which come from the spaces
(``image_size``, ``state_dim``, ``instruction_max_length``, ``action_dim``, bounds), plus:

- ``value``: ``"shared"`` (value head on the policy trunk, default; on what the head's
  ``value_input`` gives: the trunk features, or for SmolVLA / pi0 the VLM's pooled prefix
  states), ``"separate"`` (its own trunk) or ``"none"`` (no value function, e.g. GRPO);
- ``vf_hidden``: hidden width of the value MLP (256);
- ``cost_value``: also a cost value function ``V_c`` (PPO-Lagrangian's cost critic, on the
  same input as the value function; ``compute_cost_values``); False by default;
- ``pretrained_path``: the policy to initialise from: a ``VLA.save_pretrained`` directory, a
  vla-ray checkpoint (its ``vla/`` export) or a vla-ray run directory (``checkpoints/best``,
  else ``last``), e.g. a BC or PPO run to continue with PPO or GRPO; its architecture wins,
  except the ``FINE_TUNING_KEYS`` given here (``lora``: adapters added to a full checkpoint
  start at zero; ``freeze_*``, ``gradient_checkpointing``, ``autocast``);
- ``vlm_path``: a pretrained VLM directory (``vla-ray pretrain``'s ``OUTPUT/vlm``): the trunk
  (vision encoder, projector, language model, tokenizer) is built and loaded from it, the rest
  (head, state projection, value function, freezing, LoRA) follows ``model_config``.

With ``temporal`` ("gru" or "transformer", ``vla_ray.models.temporal``) the module is stateful
(RLlib's API: ``get_initial_state``, ``STATE_IN``/``STATE_OUT``, time-ranked (B, T, ...) batches,
``max_seq_len`` = ``temporal_config.history``); PPO and APPO train it.

The observation space is a Dict with ``instruction`` and ``instruction_mask`` (int token ids +
mask of a fixed length), ``image`` (uint8 HxWx3) and/or ``state``. Without ``image`` (state-only
tasks) the module is built with ``vision="none"``.
The action space is a Box of shape ``(chunk_size * action_dim,)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import (
    TorchDiagGaussian,
    TorchSquashedGaussian,
)
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from vla_ray.config import ConfigError, VLAConfig, check_choice
from vla_ray.models.heads import mlp
from vla_ray.models.temporal import TemporalModule, fold_time
from vla_ray.models.vla import VLA, build_trunk, run_trunk

# ``_forward_train`` output: an auxiliary loss of the module (the keypoint reconstruction of a
# ``cnn`` encoder with ``recon_coeff > 0``) that the learner adds to its own (``with_aux_loss``)
AUX_LOSS = "aux_loss"


def with_aux_loss(learner: Any, module_id: str, loss: Any, fwd_out: dict[str, Any]) -> Any:
    """``loss`` plus the module's auxiliary loss (``AUX_LOSS`` in ``fwd_out``, logged by the
    learner) when its forward returned one; every learner of a VLA adds it this way."""
    aux = fwd_out.get(AUX_LOSS)
    if aux is None:
        return loss
    learner.metrics.log_value((module_id, AUX_LOSS), aux.item(), window=1)
    return loss + aux


MODULE_ONLY_KEYS = (
    "value",
    "vf_hidden",
    "cost_value",
    "pretrained_path",
    "vlm_path",
    "start_log_std",
)
SPACE_DERIVED_KEYS = (
    "image_size",
    "state_dim",
    "instruction_max_length",
    "action_dim",
    "action_low",
    "action_high",
)
REQUIRED_OBS_KEYS = ("instruction", "instruction_mask")
# model_config keys that apply to a ``pretrained_path`` start too (how it trains, not what it is)
FINE_TUNING_KEYS = (
    "lora",
    "freeze_vision",
    "freeze_projector",
    "freeze_llm",
    "gradient_checkpointing",
    "autocast",
)
# Keys RLlib's algorithm configs merge into every model_config (e.g. PPO's vf_share_layers).
_RLLIB_MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(DefaultModelConfig))


def vla_config_from_spaces(
    model_config: dict[str, Any], observation_space: gym.Space, action_space: gym.Space
) -> VLAConfig:
    """Combine the user's ``model_config`` with the shapes implied by the env's spaces."""
    if not isinstance(observation_space, gym.spaces.Dict):
        raise ConfigError(
            f"observation_space: VLAModule expects a gymnasium Dict space with keys "
            f"{list(REQUIRED_OBS_KEYS)} + 'image' and/or 'state', got {observation_space}"
        )
    spaces = observation_space.spaces
    missing = [k for k in REQUIRED_OBS_KEYS if k not in spaces]
    if "image" not in spaces and "state" not in spaces:
        missing.append("image' or 'state")
    if missing:
        raise ConfigError(
            f"observation_space: missing key(s) {missing}; expected {list(REQUIRED_OBS_KEYS)} "
            f"+ 'image' and/or 'state', got {list(spaces)}"
        )
    img = spaces.get("image")
    if img is not None and (len(img.shape) != 3 or img.shape[-1] != 3 or img.dtype != np.uint8):
        raise ConfigError(
            f"observation_space['image']: expected uint8 (H, W, 3), got {img.dtype} {img.shape}"
        )
    if not isinstance(action_space, gym.spaces.Box) or len(action_space.shape) != 1:
        raise ConfigError(
            f"action_space: VLAModule expects a 1-D Box (chunk_size * action_dim,), got {action_space}"
        )
    user = {
        k: v
        for k, v in model_config.items()
        if k not in MODULE_ONLY_KEYS and k not in _RLLIB_MODEL_KEYS
    }
    clash = [k for k in SPACE_DERIVED_KEYS if k in user]
    if clash:
        raise ConfigError(f"model_config: {clash} are derived from the env's spaces; remove them")
    chunk = int(user.get("chunk_size", 1))
    n = int(action_space.shape[0])
    if n % chunk:
        raise ConfigError(
            f"chunk_size: the action space has {n} dims, not a multiple of chunk_size={chunk}"
        )
    if img is None:
        vision = user.setdefault("vision", "none")
        if vision != "none":
            raise ConfigError(
                f"vision: {vision!r} needs an 'image' observation, but the env's observation "
                f"space has only {list(spaces)}; use vision='none' for state-only envs"
            )
    if user.get("sensors"):
        user["sensors"] = _sensors_from_spaces(user["sensors"], spaces)
    state = spaces.get("state")
    return VLAConfig.from_dict(
        {
            **user,
            "image_size": tuple(img.shape[:2]) if img is not None else VLAConfig.image_size,
            "state_dim": int(state.shape[0]) if state is not None else 0,
            "instruction_max_length": int(observation_space["instruction"].shape[0]),
            "action_dim": n // chunk,
            "action_low": float(np.min(action_space.low)),
            "action_high": float(np.max(action_space.high)),
        }
    )


def _sensors_from_spaces(sensors: Any, spaces: Mapping[str, gym.Space]) -> dict[str, Any]:
    """The model config's sensor specs with their sizes read from the env's observation space."""
    from vla_ray.models.sensors import sensor_spec_from_shape

    if not isinstance(sensors, Mapping):
        raise ConfigError(f"sensors: expected a dict of sensor name -> spec, got {sensors!r}")
    out = {}
    for kind, spec in sensors.items():
        if kind not in spaces:
            raise ConfigError(
                f"sensors.{kind}: the env's observation space has no {kind!r} key; "
                f"it has {list(spaces)}"
            )
        out[kind] = sensor_spec_from_shape(kind, tuple(spaces[kind].shape), dict(spec or {}))
    return out


def resolve_pretrained_dir(path: str | os.PathLike) -> Path:
    """The ``VLA.save_pretrained`` directory behind ``path``: the directory itself, a vla-ray
    checkpoint's ``vla/`` export, or a vla-ray run directory's ``checkpoints/best`` (else
    ``last``) export. ConfigError naming the three accepted forms otherwise."""
    from vla_ray.checkpoint import VLA_DIR, run_checkpoints
    from vla_ray.models.vla import CONFIG_NAME

    p = Path(path)
    for candidate in (p, p / VLA_DIR, *(c / VLA_DIR for c in run_checkpoints(p))):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise ConfigError(
        f"pretrained_path: {p} is none of a save_pretrained directory (with {CONFIG_NAME}), a "
        "vla-ray checkpoint (with vla/) or a vla-ray run directory (with checkpoints/best|last)"
    )


def build_vla(
    model_config: dict[str, Any],
    observation_space: gym.Space,
    action_space: gym.Space,
    ignore_keys: tuple[str, ...] = (),
) -> VLA:
    """The module's VLA: from ``vlm_path`` (pretrained trunk), ``pretrained_path`` (a whole saved
    VLA, whose architecture wins; only the env-derived I/O fields must agree) or fresh from
    ``model_config``. ``ignore_keys`` are the caller's own (non-VLA) model_config keys."""
    mc = {k: v for k, v in model_config.items() if k not in ignore_keys}
    config = vla_config_from_spaces(mc, observation_space, action_space)
    if mc.get("pretrained_path") and mc.get("vlm_path"):
        raise ConfigError(
            "model_config: give either pretrained_path (a whole VLA) or vlm_path (a "
            "pretrained VLM trunk), not both"
        )
    if mc.get("vlm_path"):
        return VLA.from_pretrained_vlm(mc["vlm_path"], config)
    if mc.get("pretrained_path"):
        io = {k: v for k, v in config.to_dict().items() if k in SPACE_DERIVED_KEYS}
        # how the run trains the saved architecture (e.g. LoRA RL from a full BC run) is the
        # run's choice; adapters the checkpoint lacks start fresh (zero update)
        io.update({k: mc[k] for k in FINE_TUNING_KEYS if k in mc})
        vla = VLA.from_pretrained(resolve_pretrained_dir(mc["pretrained_path"]), **io)
        if mc.get("start_log_std") is not None:
            set_log_std(vla, mc["start_log_std"])
        return vla
    if mc.get("start_log_std") is not None:
        raise ConfigError(
            "start_log_std: sets a loaded policy's log-std, so it needs pretrained_path; "
            f"got start_log_std={mc['start_log_std']!r} without it (use "
            "head_config.init_log_std for a fresh model)"
        )
    return VLA(config)


def set_log_std(vla: VLA, value: float) -> None:
    """Set the state-independent log-std of ``vla``'s head to ``value`` in every dimension."""
    log_std = getattr(vla.head, "log_std", None)
    if not isinstance(log_std, torch.nn.Parameter):
        raise ConfigError(
            "start_log_std: needs a head with a learned state-independent log-std (e.g. "
            f"'gaussian'), got head={vla.config.head!r}"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -5 <= value <= 2:
        raise ConfigError(f"start_log_std: expected a float in [-5, 2], got {value!r}")
    with torch.no_grad():
        log_std.fill_(float(value))


class VLAModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    """Vision-language-action policy (+ optional value function) for RLlib's new API stack."""

    # model_config keys this module reads besides the VLAConfig fields (see setting_keys)
    MODEL_KEYS: tuple[str, ...] = MODULE_ONLY_KEYS

    @override(RLModule)
    def setup(self) -> None:
        mc = dict(self.model_config or {})
        value = mc.get("value", "shared")
        check_choice("value", value, ("shared", "separate", "none"))
        self.vla = build_vla(mc, self.observation_space, self.action_space)
        config = self.vla.config
        self.value_mode = value
        if value == "separate" and config.backbone in ("smolvla", "pi0"):
            raise ConfigError(
                f"value: 'separate' would load a second copy of the {config.backbone} checkpoint; "
                "use 'shared' (the value head reads the VLM's prefix representation) or 'none'"
            )
        # (features, value input) of the last training forward, for compute_values to reuse
        self._value_input: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.inference_only and value == "separate":
            self.vf_trunk = build_trunk(config, self.vla.tokenizer)
            self.vf = mlp(self.vla.trunk.feature_dim, int(mc.get("vf_hidden", 256)), 1)
        elif not self.inference_only and value == "shared":
            self.vf = mlp(self.vla.head.value_dim, int(mc.get("vf_hidden", 256)), 1)
        self.cost_value = bool(mc.get("cost_value", False))
        if self.cost_value and value == "none":
            raise ConfigError(
                "cost_value: the cost value function reads the value function's input; "
                "expected value='shared' or 'separate', got value='none'"
            )
        if not self.inference_only and self.cost_value:
            width = self.vf[0].in_features
            self.cvf = mlp(width, int(mc.get("vf_hidden", 256)), 1)
        if self.temporal is not None:
            if value == "separate":
                raise ConfigError(
                    f"value: 'separate' has its own trunk without the policy's memory "
                    f"(temporal={config.temporal!r}); use value='shared' or 'none'"
                )
            # RLlib's connectors cut training episodes into sequences of max_seq_len steps
            self.model_config = {**mc, "max_seq_len": self.temporal.history}

    # ---- the stateful API (config.temporal) ---------------------------------------------------
    @property
    def temporal(self) -> TemporalModule | None:
        """The VLA's memory (``config.temporal``); None: the module is stateless."""
        return self.vla.temporal

    @override(RLModule)
    def get_initial_state(self) -> dict[str, Any]:
        if self.temporal is None:
            return {}
        return {k: v.numpy() for k, v in self.temporal.initial_state().items()}

    def _features(
        self, batch: dict[str, Any], vla: VLA | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The features the heads of ``vla`` (default: the policy's) read and the state output
        (empty without memory). With memory the batch is time-ranked (B, T, ...) as RLlib's
        connectors give it, with ``STATE_IN`` (B, ...) (without it, the episodes start here); a
        batch without a time rank is one step (T = 1) and its features keep no time rank."""
        vla = self.vla if vla is None else vla
        obs = batch[Columns.OBS]
        if vla.temporal is None:
            return vla.features(obs), {}
        timed = obs["instruction_mask"].dim() == 3
        if not timed:
            obs = {k: v[:, None] for k, v in obs.items()}
        flat, B, T = fold_time(obs)
        per_step = vla.features(flat).view(B, T, -1)
        state = batch.get(Columns.STATE_IN) or vla.temporal.batch_initial_state(B)
        features, state_out = vla.temporal(per_step, state)
        return (features if timed else features[:, 0]), {Columns.STATE_OUT: state_out}

    @staticmethod
    def _per_row(fn: Any, features: torch.Tensor) -> torch.Tensor:
        """``fn`` (which takes (N, F)) over features with any leading dims (B, T, F)."""
        lead = features.shape[:-1]
        out = fn(features.reshape(-1, features.shape[-1]))
        return out.reshape(*lead, *out.shape[1:])

    # ---- forward passes ---------------------------------------------------------------------
    def _policy_out(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        head = self.vla.head
        if head.stochastic:
            return {Columns.ACTION_DIST_INPUTS: self._per_row(head.dist_inputs, features)}
        predict = lambda f: head.predict(f, deterministic=True).flatten(1)  # noqa: E731
        return {Columns.ACTIONS: self._per_row(predict, features)}

    @override(RLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        features, state = self._features(batch)
        return {**self._policy_out(features), **state}

    @override(RLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        features, state = self._features(batch)
        head = self.vla.head
        self._value_input = None
        if (
            head.stochastic
            and self.value_mode == "shared"
            and not self.inference_only
            and self.temporal is None
        ):
            inputs, value_input = head.dist_inputs_and_value_input(features)
            out = {Columns.ACTION_DIST_INPUTS: inputs}
            if value_input is not features:  # a head's own representation (LeRobot's VLM)
                # the learner's compute_values(embeddings=features) reuses it: one VLM pass
                self._value_input = (features, value_input)
        else:
            out = self._policy_out(features)
        out[Columns.EMBEDDINGS] = features
        out.update(state)
        vision = self.vla.trunk.vision
        if getattr(vision, "recon", None) is not None:  # cnn with recon_coeff > 0
            image = batch[Columns.OBS]["image"]
            out[AUX_LOSS] = vision.reconstruction_loss(image.reshape(-1, *image.shape[-3:]))
        return out

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Any | None = None) -> torch.Tensor:
        if self.value_mode == "none":
            raise ConfigError(
                "value: this VLAModule was built with value='none' and has no value function; "
                "use value='shared' or 'separate' for PPO/APPO/MARWIL"
            )
        if self.value_mode == "separate":
            return self.vf(self._vf_input(batch, embeddings)).squeeze(-1)
        cached, self._value_input = self._value_input, None
        return self.vf(self._vf_input(batch, embeddings, cached)).squeeze(-1)

    def _vf_input(
        self, batch: dict[str, Any], embeddings: Any | None, cached: Any | None = None
    ) -> torch.Tensor:
        """What the value functions (``vf``, ``cvf``) read: the separate trunk's features, or
        the head's value input from the policy's ``embeddings`` (``cached``: a forward's
        ``(embeddings, value_input)``, used when it is for these embeddings)."""
        if self.value_mode == "separate":
            return run_trunk(self.vf_trunk, self.vla.config, batch[Columns.OBS])
        if embeddings is None:
            embeddings = self._features(batch)[0]
        if cached is not None and cached[0] is embeddings:
            return cached[1]
        return self._per_row(self.vla.head.value_input, embeddings)

    def compute_cost_values(
        self, batch: dict[str, Any], embeddings: Any | None = None
    ) -> torch.Tensor:
        """The cost value function ``V_c`` (``cost_value=True``) per row: the expected
        discounted safety cost from each observation, on the value function's input."""
        if not self.cost_value:
            raise ConfigError(
                "cost_value: this VLAModule was built without a cost value function; "
                "build it with cost_value=True (ppo_lag: training.cost_critic=true)"
            )
        return self.cvf(self._vf_input(batch, embeddings)).squeeze(-1)

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["vf", "vf_trunk", "cvf"]  # RLlib skips the ones this module does not build

    # ---- action distributions -----------------------------------------------------------------
    def _dist_cls(self):
        head = self.vla.config.head
        if head == "gaussian":
            return TorchDiagGaussian
        if head == "tanh_gaussian":
            return TorchSquashedGaussian
        raise ConfigError(
            f"head: {head!r} is deterministic and defines no action distribution; algorithms "
            "that sample actions or need log-probabilities (PPO, APPO, GRPO, SAC) need "
            "head='gaussian' (or 'tanh_gaussian' for SAC)"
        )

    @override(TorchRLModule)
    def get_inference_action_dist_cls(self):
        return self._dist_cls()

    @override(TorchRLModule)
    def get_exploration_action_dist_cls(self):
        return self._dist_cls()

    @override(TorchRLModule)
    def get_train_action_dist_cls(self):
        return self._dist_cls()
