"""Held-out validation for offline / imitation runs and ``vla-ray eval --data``: how close a
policy's deterministic actions are to a dataset's, without an env.

- :func:`split_files`: a seeded split of an RLlib episode dataset into train and validation
  episodes (``val_fraction`` of them, at least one each), written once into the data cache next
  to the converted dataset and reused.
- :func:`action_metrics`: per action dimension the MSE and L1 of the policy's first action
  against the dataset's action at each step (``val_action_mse``, ``val_action_l1`` and their
  per-dimension lists); for a policy of action chunks (K actions per prediction), the average
  and final displacement (L2) over the horizon where the episode has the next actions
  (``val_chunk_ade``, ``val_chunk_fde``), as for waypoint outputs; for a token head (the
  ``transformer`` head's 256 bins per dimension), the fraction of action tokens the greedy
  decoding gets right (``val_token_accuracy``: the policy's actions and the dataset's binned
  with the head's own bins, over every action value compared, the chunk's included). This is
  the accuracy of the generated tokens, not OpenVLA's teacher-forced training accuracy.
- :func:`iteration_metrics`: those metrics of a training run's current module on its held-out
  episodes, computed in the learner's process (``LearnerGroup.foreach_learner``), for
  ``metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.data.rllib_format import DataError, dataset_files, read_episodes
from vla_ray.fsutil import replace_dir, temp_dir

ActFn = Callable[[dict[str, np.ndarray] | np.ndarray], np.ndarray]
TokenizeFn = Callable[[np.ndarray], np.ndarray]
SPLIT_VERSION = 1


# the scalar validation metrics (``metric:`` names for ``vla-ray tune``); present where they apply
SCALAR_METRICS = (
    "val_action_mse",
    "val_action_l1",
    "val_chunk_ade",
    "val_chunk_fde",
    "val_token_accuracy",
)


def split_files(
    files: list[str], val_fraction: float, seed: int, cache: str | os.PathLike | None = None
) -> tuple[list[str], list[str]]:
    """``(train files, validation files)`` of the episodes in ``files``: a seeded
    ``val_fraction`` of the episodes held out (written once under ``cache``, default the data
    cache, keyed by the files, fraction and seed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    from vla_ray.data.convert import cache_dir

    stamp = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = json.dumps([SPLIT_VERSION, stamp, float(val_fraction), int(seed)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out = Path(cache or cache_dir()) / f"split-{digest}"
    done = out / "split.json"
    if not done.is_file():
        tables = [pq.read_table(f, columns=["item"]) for f in files]
        table = pa.concat_tables(tables)
        n = table.num_rows
        if n < 2:
            raise DataError(
                f"data: {n} episode(s); a validation split needs at least 2 (val_fraction "
                f"{val_fraction})"
            )
        k = min(n - 1, max(1, round(n * float(val_fraction))))
        order = np.random.default_rng(seed).permutation(n)
        val_rows, train_rows = np.sort(order[:k]), np.sort(order[k:])
        # written aside and moved in whole: runs that split the same data at once (Tune trials)
        # never read a half-written split
        tmp = temp_dir(out)
        for name, rows in (("train", train_rows), ("val", val_rows)):
            (tmp / name).mkdir()
            pq.write_table(table.take(pa.array(rows)), tmp / name / "part-000000.parquet")
        info = {"episodes": n, "val_episodes": int(k), "seed": int(seed)}
        (tmp / "split.json").write_text(json.dumps(info))
        replace_dir(tmp, out)  # the same split as any other writer's: same files, fraction, seed
    return dataset_files(out / "train"), dataset_files(out / "val")


def token_bins(model: Any) -> TokenizeFn | None:
    """Actions (..., D) -> their token ids under ``model``'s (a ``VLA``) token head; None for
    a head that does not tokenise actions."""
    from vla_ray.models.heads import TransformerHead

    head = getattr(model, "head", None)
    if not isinstance(head, TransformerHead):
        return None
    import torch

    def tokenize(actions: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            values = torch.as_tensor(np.asarray(actions, np.float32), device=head.causal.device)
            return head.tokenize(values).cpu().numpy()

    return tokenize


def action_metrics(
    act: ActFn,
    episodes: Iterable[Any],
    batch_size: int = 64,
    tokenize: TokenizeFn | None = None,
) -> dict[str, Any]:
    """Metrics of ``act`` (batched observations -> actions (B, D) or chunks (B, K*D)) against
    the actions of ``episodes`` (``SingleAgentEpisode``s); ``tokenize`` (:func:`token_bins`)
    adds the token accuracy. See the module doc."""
    sq, ab, n = None, None, 0
    ade, fde, chunks = 0.0, 0.0, 0
    right, compared = 0, 0
    for ep in episodes:
        obs = ep.get_observations()
        actions = np.asarray(ep.get_actions(), np.float64)
        T = len(actions)
        actions = actions.reshape(T, -1)
        D = actions.shape[1]
        for start in range(0, T, batch_size):
            stop = min(T, start + batch_size)
            batch = (
                {k: np.asarray(v)[start:stop] for k, v in obs.items()}
                if isinstance(obs, dict)
                else np.asarray(obs)[start:stop]
            )
            pred = np.asarray(act(batch), np.float64).reshape(stop - start, -1)
            if pred.shape[1] % D:
                raise DataError(
                    f"validation: the policy gives {pred.shape[1]} action values per step, the "
                    f"dataset's actions have {D} dimensions"
                )
            pred = pred.reshape(stop - start, -1, D)  # (B, K, D)
            err = pred[:, 0] - actions[start:stop]
            sq = (err**2).sum(0) if sq is None else sq + (err**2).sum(0)
            ab = np.abs(err).sum(0) if ab is None else ab + np.abs(err).sum(0)
            n += stop - start
            K = pred.shape[1]
            for b, t in enumerate(range(start, stop)):
                h = min(K, T - t)  # steps of the chunk the episode has targets for
                if tokenize is not None:
                    same = tokenize(pred[b, :h]) == tokenize(actions[t : t + h])
                    right, compared = right + int(same.sum()), compared + same.size
                if K > 1:
                    dist = np.linalg.norm(pred[b, :h] - actions[t : t + h], axis=-1)
                    ade += float(dist.mean())
                    fde += float(dist[-1])
                    chunks += 1
    if n == 0:
        raise DataError("validation: no steps to evaluate")
    mse, l1 = sq / n, ab / n
    out: dict[str, Any] = {
        "val_action_mse": float(mse.mean()),
        "val_action_l1": float(l1.mean()),
        "val_action_mse_per_dim": [round(float(x), 6) for x in mse],
        "val_action_l1_per_dim": [round(float(x), 6) for x in l1],
        "val_steps": int(n),
    }
    if chunks:
        out.update(val_chunk_ade=ade / chunks, val_chunk_fde=fde / chunks)
    if compared:
        out["val_token_accuracy"] = right / compared
    return out


def module_actions(module: Any, obs: dict[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """A VLA ``RLModule``'s deterministic actions for a batch (``forward_inference``)."""
    import contextlib

    import torch
    from ray.rllib.core.columns import Columns

    device = next(module.parameters()).device
    if isinstance(obs, dict):
        batch_obs: Any = {k: torch.as_tensor(np.asarray(v), device=device) for k, v in obs.items()}
    else:
        batch_obs = torch.as_tensor(np.asarray(obs), device=device)
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: batch_obs})
        if Columns.ACTIONS in out:
            return out[Columns.ACTIONS].cpu().numpy()
        dist_cls = None
        with contextlib.suppress(ValueError):
            dist_cls = module.get_inference_action_dist_cls()
        if dist_cls is None:
            raise ValueError(f"{type(module).__name__} gives neither actions nor a distribution")
        dist = dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS]).to_deterministic()
        return dist.sample().cpu().numpy()


@lru_cache(maxsize=2)
def _episodes(files: tuple[str, ...]) -> list[Any]:
    return [ep for f in files for ep in read_episodes(f)]


def _learner_metrics(files: tuple[str, ...]) -> Callable[[Any], dict[str, Any]]:
    def run(learner: Any) -> dict[str, Any]:
        from ray.rllib.core import DEFAULT_MODULE_ID

        module = learner.module[DEFAULT_MODULE_ID].unwrapped()  # (DDP-wrapped on several)
        was_training = module.training
        module.eval()
        try:
            return action_metrics(
                lambda o: module_actions(module, o),
                _episodes(files),
                tokenize=token_bins(getattr(module, "vla", None)),
            )
        finally:
            module.train(was_training)

    return run


def iteration_metrics(
    algo: Any, settings: dict[str, Any], iteration: int, *, final: bool = False
) -> dict[str, Any]:
    """Validation metrics of the run's module at ``iteration`` ({} without ``val_fraction``,
    or between ``eval_every`` iterations; always at iteration 1 and the ``final`` one)."""
    frac = settings.get("val_fraction")
    if not frac:
        return {}
    every = int(settings.get("eval_every") or 1)
    if iteration != 1 and iteration % every and not final:
        return {}
    files = algo.config.input_
    val = tuple(_split_of(tuple(files if isinstance(files, list) else [files]), settings))
    results = algo.learner_group.foreach_learner(_learner_metrics(val))
    return next(iter(results)).get()  # the first learner's (all hold the same weights)


def _split_of(train_files: tuple[str, ...], settings: dict[str, Any]) -> list[str]:
    """The validation files beside the train split ``train_files`` (``split_files``' layout)."""
    split = Path(train_files[0]).parent.parent
    if not (split / "split.json").is_file():
        raise DataError(f"validation: {train_files[0]} is not part of a train/validation split")
    return dataset_files(split / "val")


def evaluate_on_data(
    policy: Any,
    data: str | os.PathLike,
    env_id: str | None = None,
    env_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`action_metrics` of a loaded policy (``vla_ray.evaluate.load_policy``) on every
    episode of a dataset in any format, mapped onto ``env_id``'s spaces (default: the
    checkpoint's env and env config); no env is stepped."""
    from vla_ray.data.convert import read_dataset

    if policy.context is not None:
        raise ValueError("eval --data: a sequence policy (Decision Transformer) is not supported")
    env_id = env_id or policy.meta.get("env")
    if not env_id:
        raise ValueError("env: the checkpoint names no env (no vla_ray_meta.json); pass --env")
    cfg = dict(policy.meta.get("env_config", {}) if env_config is None else env_config)
    episodes = read_dataset(data, env_id, cfg)
    result = action_metrics(policy, episodes, tokenize=token_bins(policy.model))
    result.update(data=str(data), env=env_id, episodes=len(episodes))
    return result
