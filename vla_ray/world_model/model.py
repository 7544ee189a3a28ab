"""``WorldModel``: the VLA trunk as the per-step encoder, an RSSM, decoders (or a self-predictive
latent loss), reward and continuation predictors, and DreamerV3's world-model loss.

The encoder is the VLA trunk (vision + instruction + state through the language model, with the
instruction-prefix cache: every step of an episode shares its instruction, so the prefix is
encoded once per distinct instruction in a batch), so the dynamics are language-conditioned.
With ``image_encoder='trunk+cnn'`` DreamerV3's convolutional image encoder runs beside the trunk
and its flattened features are appended to the trunk's: the tiny trunk's pooled features carry
no trace of LangReach's few-pixel targets (docs/benchmarks.md, issue 27, third session).

A batch is batch-major sequences (B, T): ``obs`` (a dict of (B, T, ...) fields the trunk reads),
``prev_actions`` (B, T, A: the action that led to ``obs[:, t]``, zero where ``is_first``),
``rewards`` (B, T: the reward received on arriving at ``obs[:, t]``), ``continues`` (B, T: 0
where ``obs[:, t]`` is terminal) and ``is_first`` (B, T).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from ray.rllib.algorithms.dreamerv3.torch.models.components.mlp import MLP
from torch import nn

from vla_ray.config import ConfigError, VLAConfig
from vla_ray.models.vla import build_trunk, expected_obs_shapes, load_vla_tokenizer, run_trunk
from vla_ray.world_model.config import WorldModelConfig
from vla_ray.world_model.losses import TwoHotHead, kl_balance, symlog, weighted_image_error
from vla_ray.world_model.rssm import RSSM, RSSMState


class WorldModelInputError(KeyError):
    """A batch lacks a field the world model needs; the message names it."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0]) if self.args else ""


def _doublings(image_size: tuple[int, int], what: str, fix: str) -> int:
    """k for a square image of side 4 * 2^k (k >= 1); ConfigError naming ``what`` otherwise."""
    h, w = image_size
    k = int(round(math.log2(h / 4))) if h >= 8 else -1
    if h != w or k < 1 or 4 * 2**k != h:
        raise ConfigError(
            f"{what} needs a square image of side 4 * 2^k (8, 16, 32, 64, ...), got image_size "
            f"{tuple(image_size)}; {fix}"
        )
    return k


class ImageDecoder(nn.Module):
    """Features -> image (H, W, 3) in [-0.5, 0.5]: a linear layer to a 4x4 map, then
    transposed convolutions doubling the size (H = W = 4 * 2^k)."""

    def __init__(self, in_dim: int, image_size: tuple[int, int], depth: int = 16):
        super().__init__()
        k = _doublings(
            image_size,
            "world_model.decode: the image decoder",
            "decode 'state' only or use objective='latent'",
        )
        chans = [depth * 2 ** min(i, 3) for i in reversed(range(k))]
        self.c0 = chans[0]
        self.linear = nn.Linear(in_dim, self.c0 * 16)
        layers: list[nn.Module] = []
        for i, c in enumerate(chans):
            out = chans[i + 1] if i + 1 < k else 3
            layers.append(nn.ConvTranspose2d(c, out, 4, stride=2, padding=1))
            if i + 1 < k:
                layers += [nn.GroupNorm(1, out), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.linear(x.reshape(-1, x.shape[-1])).reshape(-1, self.c0, 4, 4)
        y = self.net(y)  # (N, 3, H, W)
        return y.permute(0, 2, 3, 1).reshape(*lead, *y.shape[2:], 3)


class ImageEncoder(nn.Module):
    """DreamerV3's image encoder: (..., H, W, 3) uint8 -> flat features. Convolutions (kernel 4,
    stride 2, GroupNorm, SiLU) halve the image down to 4x4 (H = W = 4 * 2^k); the channels start
    at ``depth`` and double per layer (at most 8 * depth)."""

    def __init__(self, image_size: tuple[int, int], depth: int = 16):
        super().__init__()
        k = _doublings(
            image_size, "world_model.image_encoder: the CNN encoder", "use image_encoder='trunk'"
        )
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(k):
            c = depth * 2 ** min(i, 3)
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.GroupNorm(1, c), nn.SiLU()]
            c_in = c
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_dim = c_in * 16

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        lead = image.shape[:-3]
        x = image_target(image.reshape(-1, *image.shape[-3:])).permute(0, 3, 1, 2)
        return self.net(x).reshape(*lead, self.out_dim)


def image_target(image: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-0.5, 0.5] (the decoder's target)."""
    return image.float() / 255.0 - 0.5


class WorldModel(nn.Module):
    """Language-conditioned RSSM world model over the VLA trunk's features."""

    def __init__(
        self,
        vla_config: VLAConfig,
        config: WorldModelConfig | None = None,
        trunk: nn.Module | None = None,
    ):
        super().__init__()
        self.vla_config = vla_config
        self.config = config = config or WorldModelConfig()
        if trunk is None:
            trunk = build_trunk(vla_config, load_vla_tokenizer(vla_config))
        self.trunk = trunk
        self.obs_shapes = expected_obs_shapes(vla_config)
        embed_dim = int(trunk.feature_dim)
        self.image_encoder: ImageEncoder | None = None
        self.cnn_proj: nn.Module | None = None  # world_model.cnn_embed_dim >= 1
        if config.image_encoder == "trunk+cnn":
            if "image" not in self.obs_shapes:
                raise ConfigError(
                    f"world_model.image_encoder: 'trunk+cnn' needs an 'image' observation field, "
                    f"this model has {sorted(self.obs_shapes)}; use image_encoder='trunk'"
                )
            self.image_encoder = ImageEncoder(vla_config.image_size, config.cnn_depth)
            cnn_dim = self.image_encoder.out_dim
            if config.cnn_embed_dim:
                self.cnn_proj = nn.Sequential(
                    nn.Linear(cnn_dim, config.cnn_embed_dim), nn.LayerNorm(config.cnn_embed_dim)
                )
                cnn_dim = config.cnn_embed_dim
            embed_dim += cnn_dim
        A = vla_config.action_dim * vla_config.chunk_size
        self.action_dim = A
        self.rssm = RSSM(
            embed_dim, A, config.deter, config.stoch, config.classes, config.hidden, config.unimix
        )
        F = self.rssm.feature_dim
        self.decoders = nn.ModuleDict()
        self.latent_head: nn.Module | None = None
        if config.objective == "reconstruction":
            keys = [k for k in config.decode if k in self.obs_shapes]
            if not keys:
                raise ConfigError(
                    f"world_model.decode: none of {list(config.decode)} is an observation field "
                    f"of this model ({sorted(self.obs_shapes)}); use objective='latent'"
                )
            for key in keys:
                if key == "image":
                    self.decoders[key] = ImageDecoder(F, vla_config.image_size)
                else:
                    self.decoders[key] = nn.Sequential(
                        MLP(input_size=F, num_dense_layers=2, dense_hidden_units=config.hidden),
                        nn.Linear(config.hidden, self.obs_shapes[key][0]),
                    )
        else:  # TD-MPC2: predict the next embedding from what the dynamics knew (h_t)
            self.latent_head = nn.Sequential(
                MLP(input_size=config.deter, num_dense_layers=1, dense_hidden_units=config.hidden),
                nn.Linear(config.hidden, embed_dim),
            )
        self.reward_head: nn.Module | None = None
        if config.predict_reward:
            self.reward_head = nn.Sequential(
                MLP(input_size=F, num_dense_layers=1, dense_hidden_units=config.hidden),
                TwoHotHead(
                    config.hidden, config.num_buckets, config.bucket_low, config.bucket_high
                ),
            )
        self.continue_head: nn.Module | None = None
        if config.predict_continue:
            self.continue_head = nn.Sequential(
                MLP(input_size=F, num_dense_layers=1, dense_hidden_units=config.hidden),
                nn.Linear(config.hidden, 1),
            )

    # ---- inputs ---------------------------------------------------------------------------
    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Raise WorldModelInputError naming the first missing field the model needs."""
        obs = batch.get("obs")
        if not isinstance(obs, Mapping):
            raise WorldModelInputError(
                f"batch field 'obs' is missing: expected a dict of (B, T, ...) observation "
                f"fields {sorted(self.obs_shapes)}; given fields: {sorted(batch)}"
            )
        for key, shape in self.obs_shapes.items():
            if key not in obs:
                raise WorldModelInputError(
                    f"observation field {key!r} is missing: the world model's encoder (the VLA "
                    f"trunk) needs it with per-step shape {shape}; given fields: {sorted(obs)}"
                )
        needed = ["prev_actions", "is_first"]
        if self.reward_head is not None:
            needed.append("rewards")
        if self.continue_head is not None:
            needed.append("continues")
        for key in needed:
            if key not in batch:
                why = {
                    "rewards": " (world_model.predict_reward is on; a dataset without rewards "
                    "needs predict_reward=False)",
                    "continues": " (world_model.predict_continue is on)",
                }.get(key, "")
                raise WorldModelInputError(
                    f"batch field {key!r} is missing{why}; given fields: {sorted(batch)}"
                )

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Trunk features of (B, T, ...) observations (and, with ``image_encoder='trunk+cnn'``,
        the CNN's image features after them, projected to ``cnn_embed_dim`` if set) ->
        (B, T, E)."""
        B, T = obs["instruction"].shape[:2]
        flat = {k: v.reshape(B * T, *v.shape[2:]) for k, v in obs.items() if k in self.obs_shapes}
        embed = run_trunk(self.trunk, self.vla_config, flat).reshape(B, T, -1)
        if self.image_encoder is None:
            return embed
        cnn = self.image_encoder(obs["image"])
        if self.cnn_proj is not None:
            cnn = self.cnn_proj(cnn)
        return torch.cat([embed, cnn], dim=-1)

    # ---- heads ----------------------------------------------------------------------------
    def reward(self, feat: torch.Tensor) -> torch.Tensor:
        """Predicted reward (...,) in real space (0 without a reward head)."""
        if self.reward_head is None:
            return feat.new_zeros(feat.shape[:-1])
        return self.reward_head[1](self.reward_head[0](feat))

    def continue_prob(self, feat: torch.Tensor) -> torch.Tensor:
        """Predicted probability (...,) that the episode continues (1 without the head)."""
        if self.continue_head is None:
            return feat.new_ones(feat.shape[:-1])
        return torch.sigmoid(self.continue_head(feat).squeeze(-1))

    # ---- training ---------------------------------------------------------------------------
    def loss(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float], RSSMState]:
        """The world-model loss (mean over B, T), its parts as floats and the posterior states
        (B, T, ...)."""
        self.check_batch(batch)
        obs = batch["obs"]
        embed = self.encode(obs)
        post_state, post, prior = self.rssm.observe(
            embed, batch["prev_actions"].float(), batch["is_first"], generator
        )
        feat = post_state.features()
        B, T = feat.shape[:2]
        mask = batch.get("mask")  # 0 on padding steps of short fragments
        w = torch.ones(B, T) if mask is None else torch.as_tensor(mask).float()
        w = w.to(feat.device)

        def mean(x: torch.Tensor, weight: torch.Tensor = w) -> torch.Tensor:
            return (x * weight).sum() / weight.sum().clamp(min=1.0)

        kl = kl_balance(
            post, prior, self.config.free_nats, self.config.dyn_scale, self.config.rep_scale
        )
        total = mean(kl["loss"])
        metrics = {
            "kl": mean(kl["kl"]).item(),
            "dyn_loss": mean(kl["dyn"]).item(),
            "rep_loss": mean(kl["rep"]).item(),
        }
        for key, decoder in self.decoders.items():
            pred = decoder(feat)
            if key == "image":
                img = weighted_image_error(
                    pred, image_target(obs["image"]), self.config.image_fg_weight
                )
                for part in ("mse", "fg_mse", "bg_mse", "fg_fraction"):
                    metrics[f"image_{part}"] = mean(img[part]).item()
                total = total + self.config.image_scale * mean(img["loss"])
            else:
                err = (pred - symlog(obs[key].float())) ** 2
                metrics[f"{key}_mse"] = mean(err.mean(-1)).item()
                total = total + self.config.state_scale * mean(err.sum(-1))
        vision = getattr(self.trunk, "vision", None)
        if getattr(vision, "recon", None) is not None and "image" in obs:
            # the keypoint encoder's own reconstruction loss (vision_config.recon_coeff): a short
            # gradient path that keeps every object in the keypoints
            images = obs["image"]
            aux = vision.reconstruction_loss(images.reshape(-1, *images.shape[-3:]))
            metrics["keypoint_recon"] = aux.item()
            total = total + aux
        if self.latent_head is not None:
            target = nn.functional.layer_norm(embed.detach(), embed.shape[-1:])
            err = ((self.latent_head(post_state.h) - target) ** 2).mean(-1)
            metrics["latent_loss"] = mean(err).item()
            total = total + self.config.latent_scale * mean(err)
        if self.reward_head is not None:
            # the reward on arriving at a window's first step is not in the window
            wr = w * (1 - batch["is_first"].float().to(w.device))
            rewards = batch["rewards"].float()
            hidden = self.reward_head[0](feat)
            total = total + mean(self.reward_head[1].loss(hidden, rewards), wr)
            with torch.no_grad():
                pred = self.reward_head[1](hidden)
            metrics["reward_mae"] = mean((pred - rewards).abs(), wr).item()
        if self.continue_head is not None:
            logits = self.continue_head(feat).squeeze(-1)
            cont = batch["continues"].float()
            bce = nn.functional.binary_cross_entropy_with_logits(logits, cont, reduction="none")
            metrics["continue_bce"] = mean(bce).item()
            total = total + mean(bce)
        metrics["loss"] = total.item()
        return total, metrics, post_state

    # ---- imagination ------------------------------------------------------------------------
    @torch.no_grad()
    def filter(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> RSSMState:
        """Posterior states (B, T, ...) of observed sequences (no gradient)."""
        self.check_batch({**batch, "rewards": 0, "continues": 0})
        embed = self.encode(batch["obs"])
        return self.rssm.observe(
            embed, batch["prev_actions"].float(), batch["is_first"], generator
        )[0]
