"""The SAC family (SAC, CQL, IQL) with the VLA as policy and VLA trunks as critics.

RLlib's SAC, CQL and IQL learners read fixed forward outputs (``qf_preds``, ``qf_twin_preds``,
``q_curr``, ``q_target_next``, ``logp_resampled``, ...) and optimise fixed parts of the module
(``pi_encoder`` + ``pi`` for the actor, ``qf_encoder`` + ``qf`` and the twin for the critics,
``vf_encoder`` + ``vf`` for IQL's value function). The modules here subclass RLlib's own default
modules (``DefaultSACTorchRLModule``, ``DefaultCQLTorchRLModule``, ``DefaultIQLTorchRLModule``),
keep their forward passes and swap in the VLA:

- policy: ``pi_encoder`` is the VLA trunk and ``pi`` the VLA's ``tanh_gaussian`` head, both views
  of one ``VLA`` kept as ``self.vla`` (so ``save_pretrained``, ``vla-ray eval``/export/serve and
  the instruction prefix cache work as for ``VLAModule``);
- critics: each Q network (and IQL's value function) has its own VLA trunk of the same
  architecture, reading the same observations (image and/or state + instruction); the Q head is
  an MLP on ``[trunk features, action]``. Separate trunks are the faithful SAC design (RLlib's
  default module also gives every Q its own encoder): the actor's features never move with the
  critic's TD errors. For the tiny VLA the extra trunks are cheap;
- target networks (``TargetNetworkAPI``): Polyak copies of every Q trunk and head.

SmolVLA / pi0 checkpoints (``vlm_path``, ``head="tanh_gaussian"``,
``vla_ray.models.lerobot_vla``) would be copied four times by that design, so their critics
read the actor instead: each Q network (and its target) is an MLP on ``[pooled VLM prefix
states of the observation, action]``, the states the actor's value input gives
(``head.value_input``), detached, so the critics' losses do not train the VLM; their encoders
(``ConcatActionEncoder``) have no parameters. In a training pass each observation batch (obs,
next obs) runs the VLM once: the actor's pass gives the distribution inputs and the critics'
input together (``PassMemo``).

Actions live in the env's own bounds: the squashed Gaussian maps onto ``[action_low,
action_high]`` (the VLA head does the same), so ``normalize_actions`` is off in the algorithm
configs, and offline datasets (raw env actions) need no rescaling. Bounds must be the same for
every action dimension (as for ``VLAModule``).

``model_config`` takes the ``VLAConfig`` fields (``head`` must be ``tanh_gaussian``; with
``chunk_size`` K > 1 the Q networks score whole chunks, the macro-actions of ``ExecuteChunk``:
SAC only, CQL and IQL refuse chunks) plus ``q_hidden`` (width of the Q/value MLPs, 256), ``pretrained_path`` /
``vlm_path`` (start the policy from a saved VLA / pretrained VLM, as in ``VLAModule``) and the
keys RLlib adds (``twin_q``; CQL's ``num_actions``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.cql.torch.default_cql_torch_rl_module import DefaultCQLTorchRLModule
from ray.rllib.algorithms.iql.torch.default_iql_torch_rl_module import DefaultIQLTorchRLModule
from ray.rllib.algorithms.sac.sac_learner import QF_PREDS, QF_TWIN_PREDS
from ray.rllib.algorithms.sac.torch.default_sac_torch_rl_module import DefaultSACTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import (
    TorchDeterministic,
    TorchSquashedGaussian,
)
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from vla_ray.config import ConfigError
from vla_ray.models.heads import ActionHead, mlp
from vla_ray.models.lerobot_vla import LEROBOT_BACKBONES
from vla_ray.models.prefix import CachedPrefixTrunk
from vla_ray.models.vla import build_trunk
from vla_ray.rl_module import MODULE_ONLY_KEYS, build_vla

# model_config keys of these modules (and of RLlib's SAC-family configs) that are not VLAConfig's
# (pretrained_path, vlm_path and value are VLAModule's, which build_vla already sets aside)
SAC_MODULE_KEYS = ("q_hidden", "twin_q", "num_actions")


class VLASquashedGaussian(TorchSquashedGaussian):
    """RLlib's squashed Gaussian onto fixed bounds, whose deterministic action is squashed too.

    (RLlib's ``to_deterministic`` returns the pre-tanh mean; here it is ``tanh(mean)`` scaled
    into the bounds, the same action as ``VLA.predict(deterministic=True)``.)
    """

    bounds: tuple[float, float] = (-1.0, 1.0)

    @classmethod
    def bounded(cls, low: float, high: float) -> type[VLASquashedGaussian]:
        """This class with ``from_logits`` squashing into ``[low, high]``."""
        return type(cls.__name__, (cls,), {"bounds": (float(low), float(high))})

    @classmethod
    def from_logits(cls, logits: torch.Tensor, **kwargs: Any) -> VLASquashedGaussian:
        kwargs.setdefault("low", cls.bounds[0])
        kwargs.setdefault("high", cls.bounds[1])
        return super().from_logits(logits, **kwargs)

    def to_deterministic(self) -> TorchDeterministic:
        return TorchDeterministic(loc=self._squash(self.loc))


class PassMemo:
    """Values computed once per input object within one training forward pass (keyed by the
    object's identity): the LeRobot actor's trunk features per observation batch, and its
    distribution inputs with the pooled prefix states per feature batch (one VLM pass)."""

    def __init__(self) -> None:
        self._values: dict[int, tuple[Any, Any]] | None = None

    @property
    def active(self) -> bool:
        """Inside ``shared()``."""
        return self._values is not None

    @contextlib.contextmanager
    def shared(self):
        """Memoise inside this context (one training forward pass)."""
        self._values = {}
        try:
            yield
        finally:
            self._values = None

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, or its value for the same ``key`` object earlier in the pass."""
        if self._values is None:
            return compute()
        hit = self._values.get(id(key))
        if hit is not None and hit[0] is key:
            return hit[1]
        value = compute()
        self._values[id(key)] = (key, value)  # keep key alive so that its id stays unique
        return value


class TrunkEncoder(nn.Module):
    """A VLA trunk as an RLlib encoder: ``{obs: dict}`` -> ``{ENCODER_OUT: features}``."""

    def __init__(self, trunk: nn.Module, memo: PassMemo | None = None):
        super().__init__()
        self.trunk = trunk
        self.memo = memo

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        obs = batch[Columns.OBS]
        if self.memo is None:
            return {ENCODER_OUT: self.trunk(obs)}
        return {ENCODER_OUT: self.memo.get(obs, lambda: self.trunk(obs))}


class StateActionEncoder(TrunkEncoder):
    """A Q network's encoder: ``[trunk features of obs, action]``.

    Inside ``reuse_features()`` the trunk runs once per observation batch: SAC evaluates each Q
    network on the same observations with the batch's and with resampled actions. Features
    reached while the critic is frozen (RLlib's straight-through pass for the actor loss) are
    detached, as the trunk's own frozen parameters would have made them.
    """

    def __init__(self, trunk: CachedPrefixTrunk):
        super().__init__(trunk)
        self._features: dict[int, tuple[Any, torch.Tensor, bool]] | None = None

    @contextlib.contextmanager
    def reuse_features(self):
        """Cache trunk features per observation batch for one training forward pass."""
        self._features = {}
        try:
            yield
        finally:
            self._features = None

    def features(self, obs: Mapping[str, Any]) -> torch.Tensor:
        """The trunk's features of an observation batch (cached inside ``reuse_features()``)."""
        trainable = torch.is_grad_enabled() and any(
            p.requires_grad for p in self.trunk.parameters()
        )
        hit = self._features.get(id(obs)) if self._features is not None else None
        if hit is not None and hit[0] is obs and (hit[2] or not trainable):
            return hit[1] if trainable else hit[1].detach()
        features = self.trunk(obs)
        if self._features is not None:  # keep obs alive so that its id stays unique
            self._features[id(obs)] = (obs, features, trainable)
        return features

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        features = self.features(batch[Columns.OBS])
        actions = batch[Columns.ACTIONS].to(features.dtype).flatten(1)
        return {ENCODER_OUT: torch.cat([features, actions], dim=-1)}


class PolicyHead(nn.Module):
    """The VLA's tanh-Gaussian head as RLlib's ``pi``: features -> ``[mean, log_std]``."""

    def __init__(self, head: ActionHead, memo: PassMemo | None = None):
        super().__init__()
        self.head = head
        self.memo = memo

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.memo is None:
            return self.head.dist_inputs(features)
        return self.dist_inputs_and_value_input(features)[0]

    def dist_inputs_and_value_input(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's distribution inputs and ``value_input`` (memoised per feature batch)."""
        if self.memo is None:
            return self.head.dist_inputs_and_value_input(features)
        return self.memo.get(features, lambda: self.head.dist_inputs_and_value_input(features))


class ConcatActionEncoder(nn.Module):
    """A Q network's encoder without parameters: ``[state representation, action]``, where the
    module puts the representation (the actor's pooled VLM prefix states) under ``obs``."""

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        state = batch[Columns.OBS]
        actions = batch[Columns.ACTIONS].to(state.dtype).flatten(1)
        return {ENCODER_OUT: torch.cat([state, actions], dim=-1)}


class _ObsBatch(dict):
    """A dict observation batch with the ``shape`` RLlib's CQL module reads (``obs.shape[0]``)."""

    @property
    def shape(self) -> torch.Size:
        return next(iter(self.values())).shape


class VLASACModule(DefaultSACTorchRLModule):
    """RLlib's default SAC module with the VLA as the policy and VLA trunks in the critics."""

    MODEL_KEYS = MODULE_ONLY_KEYS + SAC_MODULE_KEYS
    # SmolVLA / pi0: the critics read the actor's pooled VLM prefix states (SAC's only)
    PREFIX_CRITICS = True

    def __init__(self, *args, **kwargs):
        # no Catalog: RLlib's catalogs cannot encode Dict observations; setup() builds the parts
        kwargs.pop("catalog_class", None)
        TorchRLModule.__init__(self, *args, **kwargs)

    # ---- construction ---------------------------------------------------------------------
    @override(RLModule)
    def setup(self) -> None:
        mc = dict(self.model_config or {})
        head = mc.setdefault("head", "tanh_gaussian")
        if head != "tanh_gaussian":
            raise ConfigError(
                f"head: SAC, CQL and IQL need the squashed Gaussian policy head "
                f"'tanh_gaussian', got {head!r}"
            )
        # SAC's own keys (q_hidden, twin_q, ...) are not VLA fields
        self.vla = build_vla(mc, self.observation_space, self.action_space, SAC_MODULE_KEYS)
        if mc.get("pretrained_path") and self.vla.config.head != "tanh_gaussian":
            raise ConfigError(
                f"pretrained_path: the saved VLA has head {self.vla.config.head!r}; "
                "SAC, CQL and IQL need 'tanh_gaussian'"
            )
        config = self.vla.config
        if config.temporal != "none":
            # RLlib's replay buffers sample single transitions, without the sequences and
            # STATE_IN a memory trains on
            raise ConfigError(
                f"temporal: {config.temporal!r} is not supported by SAC, CQL or IQL (they learn "
                "from replayed single transitions); use temporal='none', or ppo/appo for a memory"
            )
        self.twin_q = bool(mc.get("twin_q", True))
        self.q_hidden = int(mc.get("q_hidden", 256))
        self._dist_cls = VLASquashedGaussian.bounded(config.action_low, config.action_high)
        # SmolVLA / pi0: one VLM pass per observation batch serves the actor and the critics
        self._memo = PassMemo() if config.backbone in LEROBOT_BACKBONES else None
        if self._memo is not None and not self.PREFIX_CRITICS:
            raise ConfigError(
                f"vlm_path: {type(self).__name__} would give every critic its own copy of the "
                f"{config.backbone} checkpoint; of the SAC family only SAC trains it"
            )
        if self.inference_only:
            return
        action_dims = int(np.prod(self.action_space.shape))
        if self._memo is not None:  # the critics read the actor's pooled VLM prefix states
            q_in = self.vla.head.value_dim + action_dims
            self.qf_encoder = ConcatActionEncoder()
            self.qf = mlp(q_in, self.q_hidden, 1)
            if self.twin_q:
                self.qf_twin_encoder = ConcatActionEncoder()
                self.qf_twin = mlp(q_in, self.q_hidden, 1)
            return
        q_in = self.vla.trunk.feature_dim + action_dims
        self.qf_encoder = StateActionEncoder(self._critic_trunk())
        self.qf = mlp(q_in, self.q_hidden, 1)
        if self.twin_q:
            self.qf_twin_encoder = StateActionEncoder(self._critic_trunk())
            self.qf_twin = mlp(q_in, self.q_hidden, 1)

    def _critic_trunk(self) -> CachedPrefixTrunk:
        """A fresh trunk of the policy's architecture (own weights)."""
        return build_trunk(self.vla.config, self.vla.tokenizer)

    # The policy parts RLlib's forward passes and optimisers use are views of ``self.vla``
    # (not registered twice: the state dict holds the VLA once, under ``vla.``).
    @property
    def pi_encoder(self) -> TrunkEncoder:
        return TrunkEncoder(self.vla.trunk, self._memo)

    @property
    def pi(self) -> PolicyHead:
        return PolicyHead(self.vla.head, self._memo)

    def _prefix_states(self, obs: Mapping[str, Any]) -> torch.Tensor:
        """SmolVLA / pi0: the actor's pooled VLM prefix states of ``obs`` (B, width), detached
        (the critics' losses do not train the VLM). In a training pass they come from the
        actor's own VLM pass over ``obs``."""
        features = self.pi_encoder({Columns.OBS: obs})[ENCODER_OUT]
        if self._memo is not None and self._memo.active:
            return self.pi.dist_inputs_and_value_input(features)[1].detach()
        with torch.no_grad():
            return self.vla.head.value_input(features)

    @override(DefaultSACTorchRLModule)
    def _qf_forward_train_helper(
        self, batch: dict[str, Any], encoder: nn.Module, head: nn.Module, squeeze: bool = True
    ) -> torch.Tensor:
        if self._memo is not None:  # Q(s, a) = MLP([VLM prefix states of s (detached), a])
            batch = {
                Columns.OBS: self._prefix_states(batch[Columns.OBS]),
                Columns.ACTIONS: batch[Columns.ACTIONS],
            }
        return super()._qf_forward_train_helper(batch, encoder, head, squeeze=squeeze)

    # ---- forward passes: RLlib's, without autograd when acting ----------------------------
    @override(DefaultSACTorchRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():  # also lets the trunk reuse its memoised instruction prefixes
            return super()._forward_inference(batch)

    @override(DefaultSACTorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._forward_inference(batch)

    @override(DefaultSACTorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        # one pass runs each trunk several times on the same instructions and observations:
        # encode each instruction once per trunk, and each observation batch once per critic
        with contextlib.ExitStack() as stack:
            if self._memo is not None:
                stack.enter_context(self._memo.shared())
            for m in self.modules():
                if isinstance(m, CachedPrefixTrunk):
                    stack.enter_context(m.shared_prefixes())
                elif isinstance(m, StateActionEncoder):
                    stack.enter_context(m.reuse_features())
            return self._train_outputs(batch)

    def _train_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The training pass's outputs (RLlib's default module's, for this algorithm)."""
        return super()._forward_train(batch)

    # ---- action distributions ---------------------------------------------------------------
    @override(TorchRLModule)
    def get_inference_action_dist_cls(self) -> type[VLASquashedGaussian]:
        return self._dist_cls

    @override(TorchRLModule)
    def get_exploration_action_dist_cls(self) -> type[VLASquashedGaussian]:
        return self._dist_cls

    @override(TorchRLModule)
    def get_train_action_dist_cls(self) -> type[VLASquashedGaussian]:
        return self._dist_cls


class VLACQLModule(VLASACModule, DefaultCQLTorchRLModule):
    """RLlib's default CQL module (SAC + conservative Q penalty samples) with the VLA.

    The penalty's samples are those of the CQL paper (Kumar et al., 2020, and RLlib's old API
    stack, ``cql_torch_policy.py``): ``num_actions`` uniform actions, actions of the policy at
    ``s`` and actions of the policy at ``s'``, all three scored by the Q functions at ``s``.
    RLlib 2.60's new-stack module scores the third set at ``s'`` (``q_next_repeat`` =
    ``Q(s', a' ~ pi(s'))``), so a third of the log-sum-exp over "actions at ``s``" held values of
    other states, and the penalty pushed down the next states' values instead of out-of-data
    actions at ``s``.
    """

    PREFIX_CRITICS = False

    def _train_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = DefaultSACTorchRLModule._forward_train(self, batch)
        obs = batch[Columns.OBS]
        policy = list(self.vla.trunk.parameters()) + list(self.vla.head.parameters())
        for p in policy:  # as RLlib: the penalty's samples train the critics only
            p.requires_grad = False
        try:
            low = torch.as_tensor(self.action_space.low, device=out[QF_PREDS].device)
            high = torch.as_tensor(self.action_space.high, device=out[QF_PREDS].device)
            n = int(self.model_config["num_actions"]) * batch[Columns.ACTIONS].shape[0]
            uniform = low + (high - low) * torch.rand((n, low.shape[0]), device=low.device)
            sets = {
                "rand": self._repeat_actions(obs, uniform),
                "curr": self._repeat_actions(obs),
                "next": self._repeat_actions(obs, policy_obs=batch[Columns.NEXT_OBS]),
            }
        finally:
            for p in policy:
                p.requires_grad = True
        for name, samples in sets.items():
            out[f"actions_{name}_repeat"] = samples[Columns.ACTIONS]
            out[f"q_{name}_repeat"] = samples[QF_PREDS]
            if Columns.ACTION_LOGP in samples:
                out[f"logps_{name}_repeat"] = samples[Columns.ACTION_LOGP]
            if self.twin_q:
                out[f"q_twin_{name}_repeat"] = samples[QF_TWIN_PREDS]
        return out

    @override(DefaultCQLTorchRLModule)
    def _repeat_actions(
        self, obs: Any, actions: torch.Tensor | None = None, *, policy_obs: Any = None
    ) -> dict[str, Any]:
        """RLlib's CQL sampling of ``num_actions`` actions (and their Q values) per observation:
        the given ``actions``, or samples of the policy at ``policy_obs`` (default ``obs``),
        scored by the Q functions at ``obs``.

        RLlib repeats the observations ``num_actions`` times and runs every encoder on the
        copies; here each trunk runs once on the observations and its features are repeated
        (the same values and gradients, ``1/num_actions`` of the trunk work).
        """
        batch_size = _ObsBatch(obs).shape[0]
        n = int(self.model_config["num_actions"])
        output: dict[str, Any] = {}
        if actions is None:
            policy_obs = obs if policy_obs is None else policy_obs
            features = self.pi_encoder({Columns.OBS: policy_obs})[ENCODER_OUT]
            dist = self.get_train_action_dist_cls().from_logits(
                self.pi(self._repeat_tensor(features, n))
            )
            actions, logp = dist.rsample_and_logp()
            output[Columns.ACTION_LOGP] = logp.view(batch_size, n, 1)
        output[Columns.ACTIONS] = actions
        critics = [(QF_PREDS, self.qf_encoder, self.qf)]
        if self.twin_q:
            critics.append((QF_TWIN_PREDS, self.qf_twin_encoder, self.qf_twin))
        for key, encoder, head in critics:
            features = self._repeat_tensor(encoder.features(obs), n)
            q = head(torch.cat([features, actions.to(features.dtype).flatten(1)], dim=-1))
            output[key] = q.view(batch_size, n, 1)
        return output


class VLAIQLModule(VLASACModule, DefaultIQLTorchRLModule):
    """RLlib's default IQL module with the VLA; the value function has its own VLA trunk."""

    PREFIX_CRITICS = False

    @override(VLASACModule)
    def setup(self) -> None:
        super().setup()
        if not self.inference_only:
            self.vf_encoder = TrunkEncoder(self._critic_trunk())
            self.vf = mlp(self.vla.trunk.feature_dim, self.q_hidden, 1)
