"""Conservative Q-learning (Kumar et al., 2020) with the VLA policy: RLlib's own CQL.

Offline: trains from a dataset (``vla-ray train --preset hopper-cql --data PATH``, e.g. written
by ``vla-ray collect``); the EnvRunners only evaluate. ``VLACQLModule`` (``vla_ray/sac_module.py``)
is RLlib's default CQL module with the VLA as actor and VLA trunks in the twin Q networks; the
loss (SAC + the conservative penalty over random / policy actions, BC warm-up of the actor for
``bc_iters`` updates) is RLlib's. ``VLACQLLearner`` and ``VLACQL`` mend RLlib 2.60 where its CQL
does not do what it says: the actor never left the BC warm-up, a local learner crashed, and an
offline iteration was as many updates as fit in a second.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.cql import CQL, CQLConfig
from ray.rllib.algorithms.cql.torch.cql_torch_learner import CQLTorchLearner
from ray.rllib.algorithms.marwil import MARWIL
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import ALL_MODULES
from ray.tune.result import TRAINING_ITERATION

from vla_ray.algorithm_spec import OfflineVLAAlgorithmConfig
from vla_ray.data.stats import add_state_normalisation
from vla_ray.sac_module import VLACQLModule


class VLACQLLearner(CQLTorchLearner):
    """RLlib's CQL learner, with the BC warm-up counted over the learner's lifetime.

    RLlib 2.60's learner reads its update count from a ``"sum"`` metric, which the learner's
    metrics reset after every update call, so the count never passed 2: with ``bc_iters >= 3``
    the actor stayed on the BC loss for the whole run and never used the Q functions. Here the
    learner counts its updates itself (kept in its state, so a resumed run goes on counting) and
    hands RLlib that count.
    """

    def build(self) -> None:
        super().build()
        self.num_updates = 0

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        # RLlib adds 1 to this key, then uses the Q functions when it is >= ``bc_iters``: the
        # actor is cloned for the first ``bc_iters`` updates
        key = (ALL_MODULES, TRAINING_ITERATION)
        self.metrics.delete(*key, key_error=False)
        self.metrics.log_value(key, self.num_updates - 1, reduce="sum")
        self.num_updates += 1
        return super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        state["cql_num_updates"] = self.num_updates
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.num_updates = int(state.get("cql_num_updates", self.num_updates))


class VLACQL(CQL):
    """RLlib's CQL with RLlib's offline training step (MARWIL's, which IQL inherits): RLlib 2.60's
    CQL step hands a local learner a bare batch as ``data_iterators`` (``KeyError: 0``) where
    MARWIL's wraps it in ``TrainingData(batch=...)``; ``dataset_num_iters_per_learner`` updates
    per iteration."""

    training_step = MARWIL.training_step


class VLACQLConfig(OfflineVLAAlgorithmConfig, CQLConfig):
    """RLlib's CQLConfig building ``VLACQL`` with ``VLACQLLearner`` and ``VLACQLModule``, plus
    ``normalize_states``: standardise the ``state`` observation with the dataset's mean/std
    (kept in the VLA's config, so every trunk, checkpoint and export applies it), as TD3+BC
    does. The caller adds env (spaces, evaluation) and data.

    Dataset actions are the env's raw actions: the module's squashed Gaussian covers the env's
    bounds, so RLlib's action normalisation is off.
    """

    NAME: ClassVar[str] = "cql"
    HEADS: ClassVar[tuple[str, ...]] = ("tanh_gaussian",)
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = dict(head="tanh_gaussian", q_hidden=256)

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or VLACQL)
        self.normalize_states = False
        self.normalize_actions = False
        self.clip_actions = False
        # RLlib's CQLConfig sets ``lr`` but its SAC validation refuses it: actor/critic/alpha
        # lrs. SAC's and CQL's reporting defaults (an iteration repeats its training step for
        # >= 1 s, >= 100 sampled and >= 100 trained steps) made an offline iteration as many
        # updates as fit in a second: one iteration is one update here, as in the other
        # offline algorithms.
        self.lr = None
        self.min_time_s_per_iteration = 0
        self.min_sample_timesteps_per_iteration = 0
        self.min_train_timesteps_per_iteration = 0
        # CORL's MuJoCo settings (alpha auto-tuned, min_q_weight 5 -> RLlib's default, BC
        # warm-up), but the entropy temperature's lr at 1e-3: from alpha 1.0, at 1e-4 it was
        # still at 0.6-0.75 after the 3,000-5,000 updates of a CPU budget (the actor weighing
        # entropy, not Q); at 1e-3 it reaches ~0.1 by 2,500 updates (docs/benchmarks.md, "CQL's
        # entropy temperature"). States standardised with the dataset's statistics (as CORL's
        # CQL and our TD3+BC): without it, CQL on HalfCheetah medium-replay peaked early and
        # fell to BC's level ("CQL with standardised states").
        self.set_training_defaults(
            actor_lr=1e-4,
            critic_lr=3e-4,
            alpha_lr=1e-3,
            gamma=0.99,
            tau=0.005,
            initial_alpha=1.0,
            twin_q=True,
            train_batch_size_per_learner=256,
            num_actions=10,
            min_q_weight=5.0,
            bc_iters=100,  # learner updates of BC warm-up for the actor (VLACQLLearner counts)
            deterministic_backup=True,
            normalize_states=True,
        )

    def training(self, *, normalize_states: bool = NotProvided, **kwargs) -> VLACQLConfig:
        super().training(**kwargs)
        if normalize_states is not NotProvided:
            self.normalize_states = bool(normalize_states)
        return self

    def build_algo(self, *args, **kwargs):
        if self.normalize_states:
            add_state_normalisation(self)
        return super().build_algo(*args, **kwargs)

    def get_default_learner_class(self) -> type:
        return VLACQLLearner

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=VLACQLModule)
