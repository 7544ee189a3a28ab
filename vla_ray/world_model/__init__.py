"""A language-conditioned RSSM world model over the VLA trunk's features (DreamerV3-style),
imagination actor-critic training and latent-space planners (CEM, MPPI)."""

from vla_ray.world_model.config import WorldModelConfig
from vla_ray.world_model.model import WorldModel, WorldModelInputError
from vla_ray.world_model.rssm import RSSM, RSSMState

__all__ = ["RSSM", "RSSMState", "WorldModel", "WorldModelConfig", "WorldModelInputError"]
