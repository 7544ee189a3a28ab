"""``WorldModelConfig``: the sizes and loss settings of the RSSM world model (one dataclass)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vla_ray.config import ConfigError, check_choice

# "reconstruction": decoders for image and/or state (DreamerV3); "latent": TD-MPC2's
# self-predictive loss (the prior's predicted next embedding vs the encoder's, stop-gradient)
OBJECTIVES = ("reconstruction", "latent")
# observation fields a reconstruction decoder can predict
DECODE_KEYS = ("image", "state")
# the image encoders whose features the RSSM posterior reads: "trunk" (the VLA trunk's features
# alone) or "trunk+cnn" (beside them, DreamerV3's convolutional image encoder, flattened: a
# direct pixel path; small objects that the trunk's pooled features drop still reach the latent)
IMAGE_ENCODERS = ("trunk", "trunk+cnn")
# how the actor's loss reaches its parameters: "reinforce" (score function, imagined states
# detached) or "dynamics" (backpropagation through the frozen world model's dynamics)
ACTOR_GRADS = ("reinforce", "dynamics")


@dataclass
class WorldModelConfig:
    """RSSM sizes, loss scales and imagination settings (DreamerV3's names where they exist)."""

    # RSSM: deterministic GRU state h (``deter``), ``stoch`` categoricals of ``classes`` each
    deter: int = 64
    stoch: int = 8
    classes: int = 8
    hidden: int = 64
    # mixture with the uniform distribution in every categorical (DreamerV3: 1%)
    unimix: float = 0.01
    # KL balancing with free bits: dyn_scale * max(free_nats, KL(sg(post) || prior))
    #                             + rep_scale * max(free_nats, KL(post || sg(prior)))
    free_nats: float = 1.0
    dyn_scale: float = 0.5
    rep_scale: float = 0.1
    objective: str = "reconstruction"
    # observation fields decoded with objective="reconstruction" (those the env has)
    decode: tuple[str, ...] = ("image", "state")
    # loss weight of the image pixels that differ from the batch's static background (the
    # per-pixel median of its frames) relative to background pixels: small objects on a plain
    # background (LangReach's targets, a few pixels of 32x32) are otherwise left out by the
    # decoder, which reproduces the background alone. It assumes a background shared by the
    # batch's episodes (a fixed scene); 1 = DreamerV3's plain summed MSE.
    image_fg_weight: float = 1.0
    # weight of the image term in the world-model loss (1 = DreamerV3); the image error sums
    # over pixels and is ~100x the state's, so with a direct pixel path (image_encoder=
    # "trunk+cnn") it takes the gradient the state needs: a smaller value gives the state back
    image_scale: float = 1.0
    # weight of the state term (1 = DreamerV3). Unlike a smaller image_scale, a larger one keeps
    # the image's weight relative to the KL (the posterior still pays for the image's detail)
    # while the state's gradient is no longer ~100x smaller than the image's
    state_scale: float = 1.0
    # "trunk" or "trunk+cnn" (IMAGE_ENCODERS) and the CNN's channels in its first layer
    # (doubling per layer, as DreamerV3's encoder)
    image_encoder: str = "trunk"
    cnn_depth: int = 16
    # with "trunk+cnn": 0 = the CNN's flat features (64 * cnn_depth values at 32x32: 1,024) go
    # to the posterior as they are; N >= 1 = a linear projection to N features and a
    # LayerNorm first, so that they do not outnumber the trunk's (the agent's state among them)
    cnn_embed_dim: int = 0
    # loss weight of the self-predictive latent loss (objective="latent")
    latent_scale: float = 1.0
    predict_reward: bool = True
    predict_continue: bool = True
    # two-hot bins over symlog space (DreamerV3: 255 over [-20, 20])
    num_buckets: int = 255
    bucket_low: float = -20.0
    bucket_high: float = 20.0
    # imagination (actor-critic)
    horizon: int = 15
    gamma: float = 0.985
    lambda_: float = 0.95
    entropy_scale: float = 3e-4
    return_norm_decay: float = 0.99
    actor_grad: str = "reinforce"
    critic_ema_decay: float = 0.98
    critic_ema_reg: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("world_model.objective", self.objective, OBJECTIVES)
        check_choice("world_model.actor_grad", self.actor_grad, ACTOR_GRADS)
        check_choice("world_model.image_encoder", self.image_encoder, IMAGE_ENCODERS)
        self.decode = tuple(self.decode)
        for key in self.decode:
            check_choice("world_model.decode", key, DECODE_KEYS)
        for name in ("deter", "stoch", "classes", "hidden", "horizon", "cnn_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"world_model.{name}: expected an integer >= 1, got {value!r}")
        dim = self.cnn_embed_dim
        if isinstance(dim, bool) or not (isinstance(dim, int) and dim >= 0):
            raise ConfigError(
                f"world_model.cnn_embed_dim: expected an integer >= 0, got {self.cnn_embed_dim!r}"
            )
        if self.cnn_embed_dim and self.image_encoder != "trunk+cnn":
            raise ConfigError(
                f"world_model.cnn_embed_dim: projects the CNN's features, expected 0 with "
                f"image_encoder={self.image_encoder!r} (or image_encoder='trunk+cnn'), "
                f"got {self.cnn_embed_dim!r}"
            )
        if not self.image_fg_weight >= 1.0:
            raise ConfigError(
                f"world_model.image_fg_weight: expected a number >= 1, got {self.image_fg_weight!r}"
            )
        for name in ("image_scale", "state_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"world_model.{name}: expected a number > 0, got {value!r}")
        if self.num_buckets < 2:
            raise ConfigError(f"world_model.num_buckets: expected >= 2, got {self.num_buckets}")
        if not 0.0 <= self.unimix < 1.0:
            raise ConfigError(f"world_model.unimix: expected in [0, 1), got {self.unimix}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldModelConfig:
        """Build from a dict; unknown keys raise ConfigError naming them and the valid keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"world_model: unknown key(s) {unknown}; valid keys are {', '.join(sorted(names))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        data = dataclasses.asdict(self)
        data["decode"] = list(self.decode)
        return data
