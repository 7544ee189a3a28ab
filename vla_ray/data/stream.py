"""How offline algorithms draw training batches from a dataset: RLlib's ``OfflineData`` and
``OfflinePreLearner`` (``ray.data``), set so that every training batch is a fresh uniform draw
over the whole dataset.

- The dataset (packed episodes) is read once into Ray's object store (``materialize_data``).
- The stream is that dataset repeated, its blocks (files or parts of files) in a seeded shuffled
  order per pass, until it is at least ``MIN_STREAM_EPISODES`` long or ``MAX_STREAM_BLOCKS``
  blocks: a small dataset does not run out every few iterations (each time the stream runs out,
  RLlib restarts it with a new pre-learner actor, whose buffer refills from empty). The repeats
  share the object-store blocks; nothing is copied. (Ray Data's cost grows with the number of
  blocks, about 2 ms each per run.)
- Each pre-learner call takes one episode from the stream into its episode buffer (an episode
  already there is skipped) and samples ``train_batch_size_per_learner`` steps from everything
  in the buffer, which holds up to ``BUFFER_STEPS`` steps.
- The buffer's sampling is seeded with the run's ``seed``, and the pre-learner runs one call at
  a time in stream order (Ray Data's default of several tasks in flight per actor runs them
  concurrently, in any order), so a run with the same seed draws the same batches.

RLlib's defaults do otherwise here: BC/MARWIL map the dataset once and materialise the result (a
dataset of a few hundred episodes becomes one fixed batch, trained on every iteration); IQL/CQL
stream but read the whole dataset in each pre-learner call (seconds per batch).
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
from ray.data import ActorPoolStrategy
from ray.rllib.offline.offline_data import OfflineData
from ray.rllib.offline.offline_prelearner import OfflinePreLearner

from vla_ray.data.rllib_format import check_packed

# the pre-learner's episode buffer: batches are uniform over up to this many steps
BUFFER_STEPS = 1_000_000
# a stream at least this many episodes long before it is restarted (one episode per iteration)
MIN_STREAM_EPISODES = 20_000
# ... unless it would be more blocks than this (a 3-episode file: 500 passes, 1,500 iterations)
MAX_STREAM_BLOCKS = 500


class RepeatedOfflineData(OfflineData):
    """RLlib's ``OfflineData`` over the materialised dataset, repeated (blocks in a seeded
    shuffled order per pass) to at least ``MIN_STREAM_EPISODES`` episodes or at most
    ``MAX_STREAM_BLOCKS`` blocks, whichever comes first (a dataset of more blocks: one pass)."""

    def __init__(self, config: Any):
        import ray

        # reads and (materialize_data=True) materialises the episodes, in file order
        options = ray.data.DataContext.get_current().execution_options
        preserve = options.preserve_order
        options.preserve_order = True
        try:
            super().__init__(config)
        finally:
            options.preserve_order = preserve
        refs = self.data.to_arrow_refs()
        n = self.data.count()
        if n == 0:
            raise ValueError(f"data: {config.input_} holds no episodes")
        rng = np.random.default_rng(config.seed)
        passes = max(1, min(math.ceil(MIN_STREAM_EPISODES / n), MAX_STREAM_BLOCKS // len(refs)))
        order: list[int] = []
        for _ in range(passes):
            order.extend(rng.permutation(len(refs)).tolist())
        self.data = repeated_blocks(refs, order)
        self.stream_episodes = passes * n
        # batches in the order the pre-learner made them (a seeded run repeats itself)
        self.data.context.execution_options.preserve_order = True


def repeated_blocks(refs: list[Any], order: list[int]) -> Any:
    """``ray.data.from_arrow_refs([refs[i] for i in order])``, with each distinct block's
    metadata computed once (``from_arrow_refs`` runs one Ray task per listed block: ~3 s for a
    500-block stream on 2 CPUs). Falls back to the public call if Ray's internals moved."""
    import ray

    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.from_operators import FromArrow
        from ray.data._internal.remote_fn import cached_remote_fn
        from ray.data._internal.stats import DatasetStats
        from ray.data._internal.util import get_table_block_metadata_schema
        from ray.data.context import DataContext
        from ray.data.dataset import MaterializedDataset
    except ImportError:  # pragma: no cover - another Ray version
        return ray.data.from_arrow_refs([refs[i] for i in order])
    get_metadata = cached_remote_fn(get_table_block_metadata_schema)
    metadata = ray.get([get_metadata.remote(r) for r in refs])
    blocks = [refs[i] for i in order]
    block_metadata = [metadata[i] for i in order]
    stats = DatasetStats(metadata={"FromArrow": block_metadata}, parent=None)
    context = DataContext.get_current().copy()
    plan = LogicalPlan(FromArrow(blocks, block_metadata), context)
    return MaterializedDataset(plan, context, stats)


class VLAPreLearner(OfflinePreLearner):
    """RLlib's ``OfflinePreLearner`` with its buffer's sampling seeded by ``config.seed``, that
    refuses packed episodes which would unpickle objects (RLlib decodes them with
    msgpack-numpy, which unpickles object arrays) before RLlib decodes them."""

    def __init__(self, *, config: Any, **kwargs: Any):
        super().__init__(config=config, **kwargs)
        if hasattr(self, "episode_buffer"):
            self.episode_buffer.rng = np.random.default_rng(config.seed)

    def _validate_episodes(self, episodes: list[Any]) -> set[Any]:
        """RLlib's checks, then (a module with ``chunk_size`` K > 1) each new episode's
        actions as windows of the next K actions (``vla_ray.data.chunks``) before it enters
        the buffer."""
        new = super()._validate_episodes(episodes)
        size = module_chunk_size(self._module)
        if size == 1:
            return new
        from vla_ray.data.chunks import chunk_episode

        return {chunk_episode(ep, size) for ep in new}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.config.input_read_episodes:
            files = self.config.input_
            source = files if isinstance(files, str) else f"{files[0]} (of {len(files)} files)"
            check_packed(batch["item"], source=str(source))
        return super().__call__(batch)


def close_offline_data(offline_data: OfflineData | None) -> None:
    """Stop ``offline_data``'s batch stream now: Ray Data's streaming executor and its worker
    threads (its block prefetcher thread stays, parked, making no Ray call). RLlib keeps the
    stream's generator for the algorithm's life and never closes it; threads still running when
    Ray shuts down call into the shut-down core worker, which ends the process with exit status
    1 (after a run that succeeded). Safe to call twice, and with ``None`` (an online
    algorithm)."""
    if offline_data is None:
        return
    iterators = offline_data.batch_iterators
    offline_data.batch_iterators = None
    for it in iterators if isinstance(iterators, list) else [iterators]:
        if isinstance(it, types.GeneratorType):
            it.close()  # GeneratorExit -> Ray Data shuts the executor and its threads down


def module_chunk_size(module: Any) -> int:
    """The ``chunk_size`` of the (multi-agent) module's default policy's action head (1 for
    modules without one)."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    head = getattr(getattr(module[DEFAULT_MODULE_ID].unwrapped(), "vla", None), "head", None)
    return int(getattr(head, "chunk_size", 1))


def offline_data_settings(input_: list[str]) -> dict[str, Any]:
    """``config.offline_data(**...)`` for ``vla-ray train``'s offline algorithms."""
    return dict(
        input_=input_,
        input_read_episodes=True,
        offline_data_class=RepeatedOfflineData,
        materialize_data=True,
        materialize_mapped_data=False,
        input_read_batch_size=1,  # one episode per pre-learner call (and per training batch)
        prelearner_buffer_kwargs={"capacity": BUFFER_STEPS},
        dataset_num_iters_per_learner=1,
        map_batches_kwargs={
            # one light pre-learner actor (the EnvRunners and the learner keep their CPUs),
            # one call at a time: its buffer is not shared between threads, and the calls run
            # in stream order
            "compute": ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
            "num_cpus": 0.1,
        },
    )
