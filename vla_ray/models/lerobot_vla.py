"""SmolVLA and pi0 checkpoints as the VLA of the training algorithms (``backbone="smolvla"`` or
``"pi0"``, chosen from the ``vlm_path`` checkpoint's ``config.json`` type).

The checkpoint is split at the prefix embeddings: the trunk embeds the env's observation as the
checkpoint does (camera tokens, instruction tokens, state) and returns them flattened as the
"features"; the head is the checkpoint's own flow-matching network (the VLM layers over the
prefix and the action expert), sampled with its Euler loop. The env's actions and state are
(de)normalised with the checkpoint's statistics. Three heads (``model.head``):

- ``"flow_matching"``: the expert as it is, deterministic (zero initial noise); trained by
  behaviour cloning with the checkpoint's flow loss (BC, DAgger).
- ``"gaussian"`` (PPO and GRPO; BC and DAgger train it by the same flow loss): a diagonal
  Gaussian whose mean is the expert's Euler sample from zero noise, a differentiable function
  of the observation, and whose log-std is a learned, state-independent parameter, one per
  element of the executed chunk (``head_config.init_log_std``, default -1.0). The mean is the
  sample de-normalised but not clipped (clipping would cut its gradient at the bounds), mapped
  to [-1, 1] by the env's action bounds as RLlib's ``normalize_actions`` reads it; the
  distribution inputs are ``[mean, log_std]`` for RLlib's ``TorchDiagGaussian``, so PPO's and
  GRPO's ratios and KL terms run unchanged and the policy gradient reaches the expert (and the
  VLM, where it trains) through the Euler loop. This is a likelihood around the flow, not the
  flow's own: the faithful alternatives, not built here, inject noise in every Euler step and
  score the whole denoising chain (ReinFlow, Zhang et al. 2025; pi_RL's Flow-Noise and
  Flow-SDE, 2025), which needs each step's noisy actions stored with the sample.
- ``"tanh_gaussian"`` (SAC; BC and DAgger train it by the flow loss): the same Gaussian before
  RLlib's tanh squashing onto the env's bounds: the pre-tanh mean is ``atanh`` of the expert's
  zero-noise sample in [-1, 1] (so the squashed mean is the expert's action), continued
  linearly past ``1 - 1e-3`` so that a mean outside the bounds keeps a gradient; the log-std
  is learned as above. SAC's reparameterised draws and its entropy term (the squashed
  Gaussian's log-prob) backpropagate through the Euler loop into the expert.

With ``model.chunk_size`` K > 1 the macro-action is the flattened executed chunk (K * A), as for
every chunked VLA (``vla_ray.envs.chunking``). The value function (``value="shared"``, PPO) reads
the VLM's prefix representation: the states the VLM's last layer reads (its normed input, from
which that layer's keys and values for the expert are made), mean-pooled over the valid prefix
tokens, computed in the same prefix pass as the action distribution (``value_dim`` = the VLM
width). ``value="separate"`` (a second copy of the checkpoint) is refused. SAC's twin Q
networks and their Polyak targets (``vla_ray.sac_module``) are MLPs on the same pooled prefix
states, detached, concatenated with the action: the critics' losses do not train the VLM (the
actor's loss does, where it trains), and the checkpoint is held once, not once per critic.

What trains: the checkpoint's own set (``train_expert_only``, ``freeze_vision_encoder``), less
what ``freeze_vision`` (the vision tower), ``freeze_projector`` (the connector / projector) and
``freeze_llm`` (the VLM's language model) freeze on top; plus the log-std and the value head
(SAC: the Q MLPs). LoRA is refused.

Supported algorithms (``SUPPORTED_ALGORITHMS``): BC and DAgger (any head), PPO and GRPO
(``head="gaussian"``), SAC (``head="tanh_gaussian"``). :func:`check_algorithm` refuses the
others: GAIL, MARWIL and APPO are untested with these heads; CQL and IQL are not wired to the
prefix-state critics (their modules give each critic its own trunk, a copy of the checkpoint);
TD3+BC and DT need a deterministic regression head.

Constraints: one camera (the env's ``image``; the checkpoint may add ``empty_cameras``), the
env's state and action sizes equal the checkpoint's, instruction ids from the checkpoint's
tokenizer (``env_config.tokenizer``), a VLA chunk no longer than the checkpoint's (the
checkpoint predicts its whole chunk; the first ``chunk_size`` steps are trained and executed).
The instruction reaches the checkpoint as the env tokenises it (no newline appended).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vla_ray.config import ConfigError, VLAConfig
from vla_ray.models.heads import LOG_STD_MAX, LOG_STD_MIN, NoiseSampledHead, masked_mean
from vla_ray.models.smolvla import ACTION_KEY, STATE_KEY, attention_2d_mask, euler_integrate

LEROBOT_BACKBONES = ("smolvla", "pi0")
# "flow_matching": the expert itself; "gaussian": a Gaussian around its Euler sample;
# "tanh_gaussian": a tanh-squashed Gaussian around it (SAC)
LEROBOT_HEADS = ("flow_matching", "gaussian", "tanh_gaussian")
GAUSSIAN_HEAD_KEYS = ("init_log_std",)
DEFAULT_INIT_LOG_STD = -1.0
SUPPORTED_ALGORITHMS = ("bc", "dagger", "ppo", "grpo", "sac")
# the head each likelihood algorithm needs: a Gaussian (PPO, GRPO) or a squashed one (SAC)
LIKELIHOOD_HEADS = {"ppo": "gaussian", "grpo": "gaussian", "sac": "tanh_gaussian"}
# pre-tanh mean of head="tanh_gaussian": atanh of the expert's mean inside this bound, linear
# beyond it (the expert may step outside the bounds, where atanh is undefined)
TANH_MEAN_BOUND = 1.0 - 1e-3


def checkpoint_type(path: str | Path | None) -> str | None:
    """``"smolvla"`` / ``"pi0"`` when ``path`` is a LeRobot checkpoint of that type, else None."""
    if path is None:
        return None
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    kind = json.loads(cfg.read_text()).get("type")
    return kind if kind in LEROBOT_BACKBONES else None


def check_algorithm(algorithm: str, model_config: dict[str, Any]) -> None:
    """ConfigError when ``model_config`` loads a SmolVLA / pi0 checkpoint (``vlm_path``) and
    ``algorithm`` cannot train it, or needs the action likelihood of ``head="gaussian"`` and
    another head is given."""
    kind = checkpoint_type(model_config.get("vlm_path"))
    if kind is None:
        return
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise ConfigError(
            f"algorithm: {algorithm!r} cannot train a {kind} checkpoint (model.vlm_path): its "
            f"action head is a flow-matching expert, trained by its flow loss (bc, dagger), "
            f"as the mean of a Gaussian with a learned std (ppo, grpo: head='gaussian') or of "
            f"a tanh-squashed one (sac: head='tanh_gaussian'); supported algorithms: "
            f"{', '.join(SUPPORTED_ALGORITHMS)}"
        )
    head, want = model_config.get("head"), LIKELIHOOD_HEADS.get(algorithm)
    if want is not None and head != want:
        raise ConfigError(
            f"model.head: {algorithm} needs the action likelihood of head={want!r} (the "
            f"{kind} expert's Euler sample as the mean of a "
            f"{'tanh-squashed ' if want == 'tanh_gaussian' else ''}Gaussian); given {head!r}"
        )


def check_config(config: VLAConfig) -> None:
    """ConfigError naming the first VLAConfig field these backbones cannot honour."""
    kind = checkpoint_type(config.vlm_path)
    if kind != config.backbone:
        raise ConfigError(
            f"vlm_path: backbone={config.backbone!r} needs a LeRobot {config.backbone} checkpoint "
            f"directory (config.json with type {config.backbone!r}), got {config.vlm_path!r}"
        )
    if config.head not in LEROBOT_HEADS:
        raise ConfigError(
            f"head: backbone={config.backbone!r} acts through the checkpoint's own flow-matching "
            f"expert; expected 'flow_matching' (the expert), 'gaussian' (a Gaussian around "
            f"its Euler sample, for PPO/GRPO) or 'tanh_gaussian' (a squashed one, for SAC), "
            f"given {config.head!r}"
        )
    gaussian = config.head in ("gaussian", "tanh_gaussian")
    if gaussian:
        unknown = sorted(set(config.head_config) - set(GAUSSIAN_HEAD_KEYS))
        if unknown:
            raise ConfigError(
                f"head_config: {unknown} not used by backbone={config.backbone!r} with "
                f"head={config.head!r}; expected only {list(GAUSSIAN_HEAD_KEYS)}"
            )
    given = [k for k in ("vlm_family", "image_processor_path") if getattr(config, k)]
    given += [k for k in ("lora", "vlm_config") if getattr(config, k)]
    given += ["head_config"] if config.head_config and not gaussian else []
    given += ["num_cameras"] if config.num_cameras != 1 else []
    given += ["vision_skip"] if config.vision_skip else []
    if given:
        raise ConfigError(f"{', '.join(given)}: not used with backbone={config.backbone!r}")


def load_policy(config: VLAConfig) -> nn.Module:
    """The SmolVLA / Pi0 of ``config.vlm_path``. ``tokenizer_path``: the SmolVLM directory
    (config + tokenizer) for smolvla, the PaliGemma tokenizer for pi0 (default: where the
    checkpoint says)."""
    if config.backbone == "smolvla":
        from vla_ray.models.smolvla import SmolVLA

        return SmolVLA.from_pretrained(config.vlm_path, vlm_path=config.tokenizer_path)
    from vla_ray.models.pi0 import Pi0

    return Pi0.from_pretrained(config.vlm_path, tokenizer_path=config.tokenizer_path)


class LeRobotTrunk(nn.Module):
    """Observation dict -> the checkpoint's flattened prefix embeddings (B, feature_dim)."""

    def __init__(self, config: VLAConfig):
        super().__init__()
        check_config(config)
        self.kind = config.backbone
        self.policy = load_policy(config)
        # the switches freeze on top of the checkpoint's own trainable set
        for switch, part in (
            ("freeze_vision", self.vision),
            ("freeze_projector", self.projector),
            ("freeze_llm", self.language_model),
        ):
            if getattr(config, switch):
                part.requires_grad_(False)
        pc = self.policy.config
        cams = pc.image_keys
        if len(cams) != 1:
            raise ConfigError(
                f"vlm_path: the checkpoint takes {len(cams)} cameras {cams}; the env gives one "
                f"'image' (expected a one-camera checkpoint)"
            )
        self.camera = cams[0]
        hw = tuple(pc.input_features[self.camera]["shape"][1:])
        checks = (
            ("image_size", hw, tuple(config.image_size)),
            ("state_dim", pc.state_dim, config.state_dim),
            ("action_dim", pc.action_dim, config.action_dim),
        )
        for name, want, got in checks:
            if want != got:
                raise ConfigError(
                    f"{name}: the {self.kind} checkpoint takes {want}, the env gives {got}"
                )
        if config.chunk_size > pc.chunk_size:
            raise ConfigError(
                f"chunk_size: expected <= the checkpoint's chunk_size ({pc.chunk_size}), "
                f"given {config.chunk_size}"
            )
        self.width = self._prefix_width()
        dummy = {
            "image": torch.zeros(1, *hw, 3, dtype=torch.uint8),
            "instruction": torch.zeros(1, config.instruction_max_length, dtype=torch.long),
            "instruction_mask": torch.ones(1, config.instruction_max_length, dtype=torch.bool),
            "state": torch.zeros(1, config.state_dim),
        }
        with torch.no_grad():
            self.feature_dim = int(self(dummy).shape[1])
        extra = 1 if self.kind == "smolvla" else 0  # smolvla: the block-start flags
        self.prefix_len = (self.feature_dim - self._tail()) // (self.width + 1 + extra)

    @property
    def vision(self) -> nn.Module:
        """The checkpoint's vision tower (the trunk contract's ``vision``)."""
        if self.kind == "smolvla":
            return self.policy.model.vlm_with_expert.vlm.model.vision_model
        return self.policy.model.paligemma_with_expert.vision_tower

    @property
    def projector(self) -> nn.Module:
        """The connector (smolvla) / multi-modal projector (pi0) from vision to the VLM."""
        if self.kind == "smolvla":
            return self.policy.model.vlm_with_expert.vlm.model.connector
        return self.policy.model.paligemma_with_expert.paligemma.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        """The VLM's language model (its layers over the prefix, token embeddings)."""
        if self.kind == "smolvla":
            return self.policy.model.vlm_with_expert.text_model
        return self.policy.model.paligemma_with_expert.language_model

    def _prefix_width(self) -> int:
        if self.kind == "smolvla":
            return self.policy.model.vlm_with_expert.text_model.config.hidden_size
        return self.policy.sizes.paligemma.width

    def _tail(self) -> int:
        """Features after the per-token blocks: pi0's normalised padded state."""
        return self.policy.config.max_state_dim if self.kind == "pi0" else 0

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        p = self.policy
        image = obs["image"]
        B = image.shape[0]
        imgs, masks = p._images({self.camera: image.cpu()}, B)
        tokens = obs["instruction"].long().to(p.device)
        mask = obs["instruction_mask"].bool().to(p.device)
        state = p.normalizer(obs["state"].float().to(p.device), STATE_KEY)
        state = F.pad(state, (0, p.config.max_state_dim - state.shape[-1]))
        if self.kind == "smolvla":
            embs, pad, blocks = p.embed_prefix(imgs, masks, tokens, mask, state)
            parts = [embs.flatten(1), pad.to(embs.dtype), blocks.to(embs.dtype)]
        else:
            embs, pad = p.embed_prefix(imgs, masks, tokens, mask)
            parts = [embs.flatten(1), pad.to(embs.dtype), state.to(embs.dtype)]
        return torch.cat(parts, dim=1).float()


class LeRobotFlowHead(NoiseSampledHead):
    """The checkpoint's flow-matching network as the action head: features -> prefix keys and
    values -> the expert's velocity; BC by the flow loss on the first ``chunk_size`` steps."""

    def __init__(self, trunk: LeRobotTrunk, config: VLAConfig):
        super().__init__(
            trunk.feature_dim,
            config.action_dim,
            config.chunk_size,
            config.action_low,
            config.action_high,
        )
        self.trunk_ref = [trunk]  # not a submodule: the trunk owns the checkpoint's parameters

    @property
    def policy(self) -> nn.Module:
        return self.trunk_ref[0].policy

    @property
    def value_dim(self) -> int:
        """Width of ``value_input``: the VLM's hidden size."""
        return self.trunk_ref[0].width

    def value_input(self, features: torch.Tensor) -> torch.Tensor:
        """The VLM's prefix representation (B, width): the normed states its last layer reads,
        mean-pooled over the valid prefix tokens."""
        return self._prefix(features, with_summary=True)[1]

    def _prefix(
        self, features: torch.Tensor, with_summary: bool = False
    ) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor | None]:
        """The VLM over the prefix, once: the expert's velocity function of (x_t, t), and with
        ``with_summary`` the pooled prefix representation (``value_input``)."""
        trunk, p = self.trunk_ref[0], self.policy
        P, W = trunk.prefix_len, trunk.width
        dtype = p.model.action_in_proj.weight.dtype
        f = features.to(p.device)
        embs = f[:, : P * W].view(-1, P, W).to(dtype)
        pad = f[:, P * W : P * W + P] > 0.5
        positions = torch.cumsum(pad.long(), dim=1) - 1
        if trunk.kind == "smolvla":
            from vla_ray.models.smolvla import Prefix

            blocks = f[:, P * W + P : P * W + 2 * P] > 0.5
            mask = attention_2d_mask(pad, blocks)
            out = p.model.vlm_with_expert.prefix_kv(embs, mask, positions, with_summary)
            kv, hidden = out if with_summary else (out, None)
            prefix = Prefix(kv, pad)
            velocity = lambda x_t, t: p.velocity(x_t, t, prefix)  # noqa: E731
        else:
            from vla_ray.models.pi0 import Prefix as Pi0Prefix

            state = f[:, P * W + P :]
            mask = attention_2d_mask(pad, torch.zeros_like(pad))
            out = p.model.paligemma_with_expert.prefix_kv(embs, mask, positions, with_summary)
            kv, hidden = out if with_summary else (out, None)
            prefix = Pi0Prefix(kv, pad)
            velocity = lambda x_t, t: p.velocity(state, x_t, t, prefix)  # noqa: E731
        if hidden is None:
            return velocity, None
        m = pad.unsqueeze(-1).float()
        summary = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        return velocity, summary.to(features.device)

    def _velocity_fn(self, features: torch.Tensor):
        return self._prefix(features)[0]

    def _time(self, batch: int) -> torch.Tensor:
        if self.trunk_ref[0].kind == "smolvla":
            from vla_ray.models.smolvla import sample_time

            return sample_time(batch)
        from vla_ray.models.pi0 import sample_time as pi0_time

        return pi0_time(batch, self.policy.config)

    def loss(
        self, features: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The checkpoint's flow-matching loss on the executed steps of its chunk (B, K, A);
        ``mask`` (B, K) excludes the slots past an episode's end."""
        p, k, A = self.policy, self.chunk_size, self.action_dim
        pc = p.config
        B = actions.shape[0]
        a = p.normalizer(actions.float().to(p.device), ACTION_KEY)
        target = torch.zeros(B, pc.chunk_size, pc.max_action_dim, device=p.device)
        target[:, :k, :A] = a
        noise = torch.randn_like(target)
        time = self._time(B).to(p.device)
        t = time[:, None, None]
        v = self._velocity_fn(features)(t * noise + (1 - t) * target, time)
        err = (v[:, :k, :A] - (noise - target)[:, :k, :A]) ** 2
        return masked_mean(err.flatten(1), mask, A)

    def sample(
        self, features: torch.Tensor, noise: torch.Tensor, steps: int | None = None
    ) -> torch.Tensor:
        """Euler integration of the checkpoint's expert from ``noise`` (B, K*A) in the executed
        steps (zeros elsewhere) -> the executed chunk (B, K, A), de-normalised and clipped."""
        p = self.policy
        pc = p.config
        full = torch.zeros(noise.shape[0], pc.chunk_size, pc.max_action_dim, device=p.device)
        full[:, : self.chunk_size, : self.action_dim] = self._chunk(noise.to(p.device))
        return self._integrate(features, full, steps)

    def _integrate(
        self,
        features: torch.Tensor,
        noise: torch.Tensor,
        steps: int | None,
        velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        clip: bool = True,
    ) -> torch.Tensor:
        p = self.policy
        pc = p.config
        n = steps or getattr(pc, "num_inference_steps", None) or pc.num_steps
        x = euler_integrate(velocity or self._velocity_fn(features), noise, n)
        out = p.normalizer(x[:, : self.chunk_size, : self.action_dim], ACTION_KEY, inverse=True)
        if clip:
            out = out.clamp(self.low, self.high)
        return out.to(features.device)

    def predict(self, features: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        if deterministic:
            return super().predict(features, deterministic=True)
        pc = self.policy.config
        noise = torch.randn(features.shape[0], pc.chunk_size, pc.max_action_dim)
        return self._integrate(features, noise.to(self.policy.device), None)


class LeRobotGaussianHead(LeRobotFlowHead):
    """A diagonal Gaussian around the checkpoint's expert (``head="gaussian"``, PPO and GRPO):
    the mean is the expert's Euler sample from zero noise (unclipped, in the [-1, 1] scale of
    the env's bounds), the log-std a learned parameter per element of the executed chunk.
    Distribution inputs ``[mean, log_std]`` as RLlib's ``TorchDiagGaussian`` reads them; BC's
    loss is the expert's flow loss (the log-std gets no gradient from it)."""

    stochastic = True

    def __init__(self, trunk: LeRobotTrunk, config: VLAConfig):
        super().__init__(trunk, config)
        init = float(config.head_config.get("init_log_std", DEFAULT_INIT_LOG_STD))
        self.log_std = nn.Parameter(torch.full((self.out_dim,), init))

    def dist_inputs_and_value_input(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The distribution inputs (B, 2*K*A) and ``value_input`` (B, width) from one VLM pass
        over the prefix."""
        return self._dist_inputs(features, with_summary=True)

    def dist_inputs(self, features: torch.Tensor) -> torch.Tensor:
        return self._dist_inputs(features, with_summary=False)[0]

    def _dist_inputs(
        self, features: torch.Tensor, with_summary: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self.policy
        pc = p.config
        velocity, summary = self._prefix(features, with_summary)
        zeros = torch.zeros(features.shape[0], pc.chunk_size, pc.max_action_dim, device=p.device)
        mean = self._to_unit(self._integrate(features, zeros, None, velocity, clip=False))
        mean = mean.flatten(1)
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1), summary

    def predict(self, features: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """The expert's zero-noise chunk (deterministic), else a draw of the Gaussian; (B, K, A)
        in the env's bounds."""
        if deterministic:
            return super().predict(features, deterministic=True)
        mean, log_std = self.dist_inputs(features).chunk(2, dim=-1)
        draw = mean + log_std.exp() * torch.randn_like(mean)
        return self._chunk(self._from_unit(draw).clamp(self.low, self.high))


class LeRobotTanhGaussianHead(LeRobotGaussianHead):
    """A tanh-squashed diagonal Gaussian around the checkpoint's expert (``head="tanh_gaussian"``,
    SAC): distribution inputs ``[atanh(mean), log_std]`` as RLlib's ``TorchSquashedGaussian``
    reads them onto the env's bounds, where ``mean`` is the expert's zero-noise Euler sample in
    the [-1, 1] scale of the bounds (so the squashed mean is the expert's action, up to
    ``1 - TANH_MEAN_BOUND`` where the expert steps past the bounds: there ``atanh`` goes on
    linearly, so that the mean keeps a gradient), and ``log_std`` a learned parameter per
    element of the executed chunk, clamped to [-20, 2] as SAC's heads are.
    Reparameterised draws backpropagate through the Euler steps into the expert."""

    def _dist_inputs(
        self, features: torch.Tensor, with_summary: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs, summary = super()._dist_inputs(features, with_summary)
        mean, log_std = inputs.chunk(2, dim=-1)
        inside = mean.clamp(-TANH_MEAN_BOUND, TANH_MEAN_BOUND)
        # past the bound atanh goes on with slope 1: a saturated mean keeps a gradient (the
        # squashed log-prob's Jacobian term pulls it back inside)
        loc = torch.atanh(inside) + (mean - inside)
        return torch.cat([loc, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)], dim=-1), summary

    def predict(self, features: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """The expert's zero-noise chunk (deterministic), else a draw of the squashed Gaussian;
        (B, K, A) in the env's bounds."""
        if deterministic:
            return super().predict(features, deterministic=True)
        loc, log_std = self.dist_inputs(features).chunk(2, dim=-1)
        draw = torch.tanh(loc + log_std.exp() * torch.randn_like(loc))
        return self._chunk(self._from_unit(draw).clamp(self.low, self.high))


def lerobot_head(trunk: LeRobotTrunk, config: VLAConfig) -> LeRobotFlowHead:
    """The head ``config.head`` names (``LEROBOT_HEADS``) over the checkpoint's expert."""
    if config.head == "tanh_gaussian":
        return LeRobotTanhGaussianHead(trunk, config)
    if config.head == "gaussian":
        return LeRobotGaussianHead(trunk, config)
    return LeRobotFlowHead(trunk, config)
