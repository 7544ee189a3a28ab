"""SmolVLA and pi0 checkpoints as the VLA of the training algorithms (``backbone="smolvla"`` or
``"pi0"``, chosen from the ``vlm_path`` checkpoint's ``config.json`` type).

The checkpoint is split at the prefix embeddings: the trunk embeds the env's observation as the
checkpoint does (camera tokens, instruction tokens, state) and returns them flattened as the
"features"; the head is the checkpoint's own flow-matching network (the VLM layers over the
prefix and the action expert), trained by behaviour cloning with the checkpoint's flow loss and
sampled with its Euler loop. The env's actions and state are (de)normalised with the
checkpoint's statistics.

Supported algorithms: those whose loss is the head's behaviour-cloning loss (``bc``,
``dagger``). The others need an action likelihood (PPO, GRPO, GAIL, MARWIL), a
reparameterised Gaussian (SAC, CQL, IQL) or a deterministic regression head (TD3+BC, DT), which
a flow-matching expert does not give: :func:`check_algorithm` refuses them.

Constraints: one camera (the env's ``image``; the checkpoint may add ``empty_cameras``), the
env's state and action sizes equal the checkpoint's, instruction ids from the checkpoint's
tokenizer (``env_config.tokenizer``), a VLA chunk no longer than the checkpoint's (the
checkpoint predicts its whole chunk; the first ``chunk_size`` steps are trained and executed).
The instruction reaches the checkpoint as the env tokenises it (no newline appended).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vla_ray.config import ConfigError, VLAConfig
from vla_ray.models.heads import NoiseSampledHead, masked_mean
from vla_ray.models.smolvla import ACTION_KEY, STATE_KEY, attention_2d_mask, euler_integrate

LEROBOT_BACKBONES = ("smolvla", "pi0")
SUPPORTED_ALGORITHMS = ("bc", "dagger")


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
    ``algorithm`` cannot train its flow-matching expert."""
    kind = checkpoint_type(model_config.get("vlm_path"))
    if kind is not None and algorithm not in SUPPORTED_ALGORITHMS:
        raise ConfigError(
            f"algorithm: {algorithm!r} cannot train a {kind} checkpoint (model.vlm_path): its "
            f"action head is a flow-matching expert with no action likelihood or Gaussian; "
            f"supported algorithms: {', '.join(SUPPORTED_ALGORITHMS)}"
        )


def check_config(config: VLAConfig) -> None:
    """ConfigError naming the first VLAConfig field these backbones cannot honour."""
    kind = checkpoint_type(config.vlm_path)
    if kind != config.backbone:
        raise ConfigError(
            f"vlm_path: backbone={config.backbone!r} needs a LeRobot {config.backbone} checkpoint "
            f"directory (config.json with type {config.backbone!r}), got {config.vlm_path!r}"
        )
    if config.head != "flow_matching":
        raise ConfigError(
            f"head: backbone={config.backbone!r} acts through the checkpoint's own flow-matching "
            f"expert; expected 'flow_matching', given {config.head!r}"
        )
    given = [k for k in ("vlm_family", "image_processor_path") if getattr(config, k)]
    given += [k for k in ("lora", "head_config", "vlm_config") if getattr(config, k)]
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

    def _velocity_fn(self, features: torch.Tensor):
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
            vwe = p.model.vlm_with_expert
            prefix = Prefix(vwe.prefix_kv(embs, attention_2d_mask(pad, blocks), positions), pad)
            return lambda x_t, t: p.velocity(x_t, t, prefix)
        from vla_ray.models.pi0 import Prefix as Pi0Prefix

        state = f[:, P * W + P :]
        mask = attention_2d_mask(pad, torch.zeros_like(pad))
        pwe = p.model.paligemma_with_expert
        prefix = Pi0Prefix(pwe.prefix_kv(embs, mask, positions), pad)
        return lambda x_t, t: p.velocity(state, x_t, t, prefix)

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
        self, features: torch.Tensor, noise: torch.Tensor, steps: int | None
    ) -> torch.Tensor:
        p = self.policy
        pc = p.config
        n = steps or getattr(pc, "num_inference_steps", None) or pc.num_steps
        x = euler_integrate(self._velocity_fn(features), noise, n)
        out = p.normalizer(x[:, : self.chunk_size, : self.action_dim], ACTION_KEY, inverse=True)
        return out.clamp(self.low, self.high).to(features.device)

    def predict(self, features: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        if deterministic:
            return super().predict(features, deterministic=True)
        pc = self.policy.config
        noise = torch.randn(features.shape[0], pc.chunk_size, pc.max_action_dim)
        return self._integrate(features, noise.to(self.policy.device), None)
