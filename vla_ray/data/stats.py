"""Dataset statistics computed in the data path (``ray.data``): per-episode returns and the
mean/std of the ``state`` observation. Only the small results reach the driver, never the
episodes themselves, except for datasets of at most ``LOCAL_READ_BYTES`` of local files, which
the driver reads directly (a Ray Data run costs seconds of task start-up)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from vla_ray.data.rllib_format import dataset_files

# local datasets up to this size are read in the driver (pyarrow) instead of by Ray Data tasks
LOCAL_READ_BYTES = 64 * 2**20


def _map_episode_batches(
    files: list[str], fn: Callable[[dict[str, Any]], dict[str, np.ndarray]], batch_size: int = 16
) -> Iterator[dict[str, Any]]:
    """The rows of ``fn`` over batches of the files' ``item`` column (packed episodes), in file
    order: in the driver for small local datasets, else by ``ray.data``'s ``map_batches``."""
    if all(os.path.isfile(f) for f in files) and (
        sum(os.path.getsize(f) for f in files) <= LOCAL_READ_BYTES
    ):
        import pyarrow.parquet as pq

        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["item"]):
                out = fn({"item": batch.column("item").to_numpy(zero_copy_only=False)})
                for values in zip(*out.values(), strict=True):
                    yield dict(zip(out, values, strict=True))
        return
    import ray

    ds = ray.data.read_parquet(files, columns=["item"])
    yield from ds.map_batches(fn, batch_format="numpy", batch_size=batch_size).iter_rows()


def _unpack_all(items: Any) -> list[Any]:
    from vla_ray.data.rllib_format import _unpack

    return [_unpack(item) for item in items]


def _episode_rows(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """``item`` (packed episodes) -> return, length and ``state`` sums of each episode."""
    returns, lengths, counts, sums, sq = [], [], [], [], []
    for ep in _unpack_all(batch["item"]):
        returns.append(float(np.sum(ep.get_rewards())))
        lengths.append(len(ep))
        obs = ep.get_observations()
        state = obs.get("state") if isinstance(obs, dict) else None
        state = np.zeros((1, 1)) if state is None else np.asarray(state, np.float64)
        state = state.reshape(state.shape[0], -1)
        counts.append(state.shape[0])
        sums.append(state.sum(0))
        sq.append((state**2).sum(0))
    return {
        "return": np.asarray(returns),
        "length": np.asarray(lengths),
        "n_states": np.asarray(counts),
        "state_sum": np.stack(sums),
        "state_sq": np.stack(sq),
    }


def episode_stats(path: str | os.PathLike | list[str]) -> dict[str, Any]:
    """Of a dataset directory (or its list of parquet files): ``returns`` (one per episode, file order), ``lengths``, and ``state_mean``/``state_std``
    over all observations (None when the observations have no ``state``)."""
    files = list(path) if isinstance(path, (list, tuple)) else dataset_files(path)
    rows = list(_map_episode_batches(files, _episode_rows))
    if not rows:
        raise ValueError(f"data: {path} holds no episodes")
    returns = np.asarray([r["return"] for r in rows], np.float64)
    lengths = np.asarray([r["length"] for r in rows], np.int64)
    n = float(sum(r["n_states"] for r in rows))
    s = np.sum([r["state_sum"] for r in rows], axis=0)
    s2 = np.sum([r["state_sq"] for r in rows], axis=0)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    has_state = s.shape != (1,) or bool(np.any(s2))  # no ``state``: the (1, 1) zero stand-in
    return dict(
        returns=returns,
        lengths=lengths,
        state_mean=mean.astype(np.float32).tolist() if has_state else None,
        state_std=np.maximum(std, 1e-3).astype(np.float32).tolist() if has_state else None,
    )


def add_state_normalisation(config: Any) -> None:
    """Put the offline dataset's ``state`` mean/std (``config.input_``) into the module spec's
    ``model_config`` as the VLA's ``state_mean``/``state_std``: every VLA trunk of the module
    (policy, critics, targets) then standardises the state, and checkpoints and exports keep
    it. Nothing when the observations have no ``state`` or there is no module spec yet."""
    spec = config._rl_module_spec
    if spec is None:
        return
    stats = episode_stats(config.input_)
    if stats["state_mean"] is not None:
        spec.model_config = {
            **(spec.model_config or {}),
            "state_mean": stats["state_mean"],
            "state_std": stats["state_std"],
        }


def top_percent_threshold(returns: np.ndarray, percent: float) -> float:
    """The return an episode needs to be among the top ``percent`` % (at least one episode)."""
    if not 0.0 < percent <= 100.0:
        raise ValueError(f"filter_top_percent: must be in (0, 100], got {percent}")
    r = np.sort(np.asarray(returns, np.float64))[::-1]
    k = max(1, int(np.ceil(len(r) * percent / 100.0)))
    return float(r[k - 1])


# actions kept per episode for the quantiles (a bounded, evenly spaced sample)
QUANTILE_SAMPLES_PER_EPISODE = 64


def action_statistics(parts: Any) -> dict[str, list[float]]:
    """Per-dimension ``mean``/``std``/``min``/``max`` (exact) and ``q01``/``q99`` (over up to
    ``QUANTILE_SAMPLES_PER_EPISODE`` evenly spaced actions of each episode) of an iterable of
    per-episode ``(T, D)`` action arrays, with ``count`` (steps): the normalisation statistics
    stored with a converted dataset (Octo uses mean/std, OpenVLA q01/q99)."""
    n, s, s2, lo, hi, sample = 0, None, None, None, None, []
    for a in parts:
        a = np.asarray(a, np.float64).reshape(len(a), -1)
        if not len(a):
            continue
        n += len(a)
        s = a.sum(0) if s is None else s + a.sum(0)
        s2 = (a**2).sum(0) if s2 is None else s2 + (a**2).sum(0)
        lo = a.min(0) if lo is None else np.minimum(lo, a.min(0))
        hi = a.max(0) if hi is None else np.maximum(hi, a.max(0))
        step = max(1, len(a) // QUANTILE_SAMPLES_PER_EPISODE)
        sample.append(a[::step][:QUANTILE_SAMPLES_PER_EPISODE])
    if n == 0:
        raise ValueError("action_statistics: no actions")
    mean = s / n
    q = np.concatenate(sample)
    return dict(
        mean=mean.tolist(),
        std=np.sqrt(np.maximum(s2 / n - mean**2, 0.0)).tolist(),
        min=lo.tolist(),
        max=hi.tolist(),
        q01=np.quantile(q, 0.01, axis=0).tolist(),
        q99=np.quantile(q, 0.99, axis=0).tolist(),
        count=[int(n)],
    )


def _episode_actions(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """``item`` (packed episodes) -> each episode's actions, flattened per step, as one row."""
    rows = [np.asarray(ep.get_actions(), np.float64) for ep in _unpack_all(batch["item"])]
    rows = [a.reshape(len(a), -1) for a in rows]
    return {"actions": np.array(rows + [None], dtype=object)[:-1]}


def dataset_action_statistics(path: str | os.PathLike | list[str]) -> dict[str, list[float]]:
    """:func:`action_statistics` of an RLlib episode dataset: read in the driver up to
    ``LOCAL_READ_BYTES`` of local files, else through ``ray.data`` (only each episode's actions
    reach the driver)."""
    files = list(path) if isinstance(path, (list, tuple)) else dataset_files(path)
    return action_statistics(r["actions"] for r in _map_episode_batches(files, _episode_actions))
