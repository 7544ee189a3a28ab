"""Behaviour cloning with the VLA module, on RLlib's BC (offline data through ``ray.data``).

RLlib's BC reads episodes with its offline pipeline and calls the learner on batches of
(observation, action). Its stock loss is the action distribution's log-likelihood, which exists
only for stochastic heads; here the loss is the head's own behaviour-cloning loss instead, so
every head trains: MSE (``mlp``), Gaussian NLL (``gaussian``, ``tanh_gaussian``), noise
prediction (``diffusion``), velocity regression (``flow_matching``) and cross-entropy over
action tokens (``transformer``).

Two options select which demonstrations are imitated, both applied per episode in the data
path (``ReturnSelectionPreLearner``, RLlib's ``OfflinePreLearner`` running inside ``ray.data``,
before the episodes enter the sampling buffer):

- **filtered BC** ``training.filter_top_percent=P``: only the episodes whose return is among the
  top P % of the dataset (the threshold comes from one ``ray.data`` pass over the returns
  before training: see ``vla_ray.data.stats``);
- **weighted BC** ``training.return_weight_temperature=T``: each episode is admitted with
  probability ``exp((R - R_max) / T)``, so episodes are sampled in proportion to
  ``exp(R / T)`` (the best episode always; large T = plain BC, small T = the best episodes);
  each episode is decided once.

Both may be combined (weights among the filtered episodes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.bc import BCConfig
from ray.rllib.algorithms.marwil.torch.marwil_torch_learner import MARWILTorchLearner
from ray.rllib.core.columns import Columns

from vla_ray.algorithm_spec import OfflineVLAAlgorithmConfig
from vla_ray.config import ACTION_HEADS
from vla_ray.data.chunks import split_chunk_targets
from vla_ray.data.stream import VLAPreLearner
from vla_ray.rl_module import with_aux_loss


# -- loss ---------------------------------------------------------------------------------------
class VLABCLearner(MARWILTorchLearner):
    """BC learner whose loss is ``head.loss(features, actions, mask)`` of the VLA, plus the
    module's auxiliary loss when it has one (the keypoint reconstruction of
    ``vision_config.recon_coeff``, which keeps every target decodable from the CNN's keypoints).

    With ``chunk_size`` K > 1 the batch's actions are the windows of the next K actions, NaN
    in the slots past an episode's end, which the loss masks (``vla_ray.data.chunks``)."""

    def compute_loss_for_module(self, *, module_id, config=None, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        head = module.vla.head
        actions = batch[Columns.ACTIONS].float()
        if head.chunk_size == 1:
            target, mask = actions.view(actions.shape[0], 1, head.action_dim), None
        else:
            target, mask = split_chunk_targets(actions, head.chunk_size, head.action_dim)
        loss = head.loss(fwd_out[Columns.EMBEDDINGS], target, mask)
        self.metrics.log_value((module_id, "bc_loss"), loss.item(), window=1)
        # + the keypoint reconstruction (vision_config.recon_coeff)
        return with_aux_loss(self, module_id, loss, fwd_out)


# -- return-based episode selection (filtered / weighted BC) ----------------------------------
def selection_probabilities(
    returns: np.ndarray,
    *,
    threshold: float | None = None,
    temperature: float | None = None,
    max_return: float | None = None,
) -> np.ndarray:
    """Probability of admitting each episode: 0 below ``threshold``; ``exp((R - max_return) /
    temperature)`` with a temperature (``max_return`` defaults to the largest given return)."""
    r = np.asarray(returns, np.float64)
    p = np.ones_like(r)
    if threshold is not None:
        p = np.where(r >= threshold, p, 0.0)
    if temperature is not None:
        top = float(np.max(r)) if max_return is None else float(max_return)
        p = p * np.exp(np.minimum(r - top, 0.0) / float(temperature))
    return p


def admit(
    episodes: list[Any], probabilities: np.ndarray, rng: np.random.Generator, need_one: bool
) -> list[Any]:
    """Each episode kept with its probability; with ``need_one`` and none kept, the most
    probable one (then the first)."""
    keep = [ep for ep, pi in zip(episodes, probabilities, strict=True) if rng.random() < pi]
    if not keep and need_one and episodes:
        keep = [episodes[int(np.argmax(probabilities))]]
    return keep


class ReturnSelectionPreLearner(VLAPreLearner):
    """RLlib's pre-learner that admits episodes into its buffer by return (see module doc).

    Each episode is decided once: the stream offers a small dataset many times over, and a
    rejected episode does not get another draw. If none of a first batch of episodes is admitted
    (the buffer would be empty), its most probable episode is kept so that a batch can always be
    sampled.
    """

    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self._rng = np.random.default_rng(config.seed)
        self._rejected: set[str] = set()

    def _postprocess_and_sample(self, episodes):
        in_buffer = self.episode_buffer.episode_id_to_index
        new = [ep for ep in episodes if ep.id_ not in in_buffer and ep.id_ not in self._rejected]
        if not new:  # seen before: sample from the buffer as it is
            return super()._postprocess_and_sample([])
        returns = np.asarray([float(np.sum(ep.get_rewards())) for ep in new])
        p = selection_probabilities(
            returns,
            threshold=self.config.return_threshold,
            temperature=self.config.return_weight_temperature,
            max_return=self.config.return_max,
        )
        keep = admit(new, p, self._rng, self.episode_buffer.get_num_timesteps() == 0)
        kept = {ep.id_ for ep in keep}
        self._rejected.update(ep.id_ for ep in new if ep.id_ not in kept)
        return super()._postprocess_and_sample(keep)


# -- config -------------------------------------------------------------------------------------
class VLABCConfig(OfflineVLAAlgorithmConfig, BCConfig):
    """RLlib's BCConfig with the VLA learner and the return-based selection options; the caller
    adds env (for spaces and evaluation), module and data."""

    NAME: ClassVar[str] = "bc"
    # Every head has a behaviour-cloning loss.
    HEADS: ClassVar[tuple[str, ...]] = ACTION_HEADS
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="gaussian", value="none")
    # ``model.chunk_size`` K > 1: each step's target is the window of the next K actions
    # (masked past the episode's end), filtered/weighted BC included
    ACTION_CHUNKS: ClassVar[bool] = True

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.filter_top_percent: float | None = None
        self.return_weight_temperature: float | None = None
        # computed from the dataset when the algorithm is built
        self.return_threshold: float | None = None
        self.return_max: float | None = None
        self.set_training_defaults(lr=1e-3, train_batch_size_per_learner=256, grad_clip=1.0)

    def training(
        self,
        *,
        filter_top_percent: float | None = NotProvided,
        return_weight_temperature: float | None = NotProvided,
        **kwargs,
    ) -> VLABCConfig:
        super().training(**kwargs)
        if filter_top_percent is not NotProvided:
            self.filter_top_percent = filter_top_percent
        if return_weight_temperature is not NotProvided:
            self.return_weight_temperature = return_weight_temperature
        return self

    def validate(self) -> None:
        super().validate()
        p = self.filter_top_percent
        if p is not None and not 0.0 < float(p) <= 100.0:
            self._value_error(f"filter_top_percent: must be in (0, 100], got {p}")
        t = self.return_weight_temperature
        if t is not None and not float(t) > 0.0:
            self._value_error(f"return_weight_temperature: must be > 0, got {t}")

    def build_algo(self, *args, **kwargs):
        if self.filter_top_percent is not None or self.return_weight_temperature is not None:
            from vla_ray.data.stats import episode_stats, top_percent_threshold

            returns = episode_stats(self.input_)["returns"]
            if self.filter_top_percent is not None:
                self.return_threshold = top_percent_threshold(returns, self.filter_top_percent)
            self.return_max = float(np.max(returns))
            self.prelearner_class = ReturnSelectionPreLearner
        return super().build_algo(*args, **kwargs)

    def get_default_learner_class(self):
        return VLABCLearner
