"""The interface every vla-ray algorithm declares, in one place: its RLlib config class.

Each algorithm (``vla_ray/algorithms/<name>.py``) defines one ``AlgorithmConfig`` subclass that
mixes in :class:`VLAAlgorithmConfig` (offline ones: :class:`OfflineVLAAlgorithmConfig`), as
RLlib's own ``PPOConfig`` is one class: its training defaults are set once, in ``__init__``
(:meth:`VLAAlgorithmConfig.set_training_defaults`); its module comes from
``get_default_rl_module_spec()`` and its learner from ``get_default_learner_class()``; what it
is (offline, needs a dataset, takes action chunks, evaluates, exports a VLA) are typed class
attributes; how it uses ``--data`` and its evaluation env are two hook methods. ``vla-ray
train`` reads only this interface.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from vla_ray.env_factory import EnvWrapper


class VLAAlgorithmConfig:
    """Mixin for an algorithm's RLlib ``AlgorithmConfig`` subclass (listed first among the
    bases, so that its hooks take precedence over RLlib's)."""

    # the name ``--preset``/``get_algorithm`` use
    NAME: ClassVar[str]
    # action heads (``model.head``) the algorithm's loss works with
    HEADS: ClassVar[tuple[str, ...]]
    # defaults of the ``model`` section (the module's ``model_config``); presets override them
    MODEL_DEFAULTS: ClassVar[dict[str, Any]]
    # trains from a dataset only (``--data``); EnvRunners only evaluate
    OFFLINE: ClassVar[bool] = False
    # ``--data`` is required (offline algorithms; online ones that learn from demos: GAIL)
    NEEDS_DATA: ClassVar[bool] = False
    # ``--data`` is allowed (required or optional: DAgger's demos that seed its dataset)
    ACCEPTS_DATA: ClassVar[bool] = False
    # ``model.chunk_size`` K > 1 is supported (a chunk is one macro-action)
    ACTION_CHUNKS: ClassVar[bool] = False
    # ``model.temporal`` (a GRU or windowed transformer memory) is supported: the algorithm
    # trains on RLlib's time-ranked sequences with STATE_IN (``vla_ray.models.temporal``)
    TEMPORAL: ClassVar[bool] = False
    # training episodes do not measure the policy (offline data, expert mixing): the run
    # reports deterministic evaluation episodes (``eval_every``/``eval_episodes``)
    EVALUATES: ClassVar[bool] = False
    # checkpoints carry a ``vla/`` ``save_pretrained`` export (False: the policy is more than a
    # VLA, e.g. the Decision Transformer, and the RLlib checkpoint is the policy)
    EXPORTS_VLA: ClassVar[bool] = True
    # env wrappers the algorithm needs, applied by the env factory when their key is in the env
    # config (which the algorithm sets)
    ENV_WRAPPERS: ClassVar[tuple[EnvWrapper, ...]] = ()

    def set_training_defaults(self, **values: Any) -> None:
        """Apply ``values`` through ``training()`` and record them as this algorithm's training
        defaults (the ``training`` section a run reports and ``--set training.X`` overrides).
        Called from ``__init__``; a subclass's call adds to its base's."""
        recorded = dict(getattr(self, "_vla_training_defaults", None) or {})
        recorded.update(copy.deepcopy(values))
        self._vla_training_defaults = recorded
        self.training(**copy.deepcopy(values))

    @classmethod
    def training_defaults(cls) -> dict[str, Any]:
        """The training defaults set by ``__init__`` (a fresh copy)."""
        return copy.deepcopy(getattr(cls(), "_vla_training_defaults", None) or {})

    @classmethod
    def module_class(cls) -> type:
        """The RLModule class a run builds (from ``get_default_rl_module_spec``)."""
        return cls().get_default_rl_module_spec().module_class

    def get_default_rl_module_spec(self):
        """The VLA policy (``VLAModule``); algorithms that need more (critics, a target
        network, a sequence model) return their subclass."""
        from ray.rllib.core.rl_module.rl_module import RLModuleSpec

        from vla_ray.rl_module import VLAModule

        return RLModuleSpec(module_class=VLAModule)

    def use_data(self, data: str | None, val_fraction: float = 0.0) -> None:
        """Take ``--data`` (a dataset path, or None) less the ``val_fraction`` of its episodes
        held out for validation (offline algorithms); called once the env and seed are
        configured. Online algorithms read none (``resolve`` refuses ``--data`` unless
        ``ACCEPTS_DATA``)."""

    def evaluation_env_config(self, env_config: dict[str, Any]) -> dict[str, Any]:
        """The env config of evaluation episodes (when ``EVALUATES``): the training one."""
        return dict(env_config)


class OfflineVLAAlgorithmConfig(VLAAlgorithmConfig):
    """An offline algorithm: trains from ``--data`` through RLlib's offline pipeline (any
    format ``--data`` reads, converted once to RLlib episodes) and evaluates on the EnvRunners."""

    OFFLINE: ClassVar[bool] = True
    NEEDS_DATA: ClassVar[bool] = True
    ACCEPTS_DATA: ClassVar[bool] = True
    EVALUATES: ClassVar[bool] = True

    def use_data(self, data: str | None, val_fraction: float = 0.0) -> None:
        """Fresh uniform batches over the whole dataset (less the held-out episodes), one
        episode read per iteration."""
        from vla_ray.data.convert import offline_input  # any format -> RLlib episodes
        from vla_ray.data.stream import VLAPreLearner, offline_data_settings

        files = offline_input(data, self.env, self.env_config)
        if val_fraction:  # held-out episodes, scored in train(): vla_ray.data.validation
            from vla_ray.data.validation import split_files

            files = split_files(files, val_fraction, self.seed)[0]
        self.offline_data(**offline_data_settings(files))
        if self.prelearner_class is None:
            self.offline_data(prelearner_class=VLAPreLearner)
