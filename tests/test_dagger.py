"""DAgger against behaviour cloning from the same few expert demonstrations (LangReach).

The learning check: BC and DAgger both start from the same few expert demos of one-target
LangReach (small images, short episodes) and take the same number of gradient steps on the same
batch size; DAgger also rolls out its own policy (beta=0: the expert never acts) and has the
expert relabel every state it visits. Both are evaluated on the same fixed seeds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vla_ray.data import collect
from vla_ray.evaluate import evaluate, load_policy
from vla_ray.train import build_algorithm_config, resolve, train

LANGREACH = "vla_ray/LangReach-v0"
EASY = {"num_targets": 1, "image_size": 32, "max_episode_steps": 20}
DEMOS = 4  # expert episodes, ~8 steps each
BATCH = 32
ITERS = 10  # DAgger iterations
UPDATES_PER_ITER = 50  # gradient steps per DAgger iteration (and once more on the demos first)
UPDATES = (ITERS + 1) * UPDATES_PER_ITER  # BC's gradient steps: one per BC iteration
ROLLOUT_STEPS = 100  # policy steps per DAgger iteration (~5 episodes)
EVAL_EPISODES = 100


def test_dagger_accepts_demos_and_online_algorithms_still_refuse_them(tmp_path):
    demos = tmp_path / "demos"
    collect(LANGREACH, "expert", 1, demos, seed=0, env_config=EASY, progress=False)
    spec = resolve("langreach-dagger", {"env_config": EASY}, data=str(demos))
    cfg = build_algorithm_config(spec)
    assert cfg.demos and all(f.endswith(".parquet") for f in cfg.demos)
    assert build_algorithm_config(resolve("langreach-dagger")).demos is None  # demos optional
    with pytest.raises(ValueError, match="--data"):
        resolve("langreach-ppo", data=str(demos))


def bc_and_dagger(tmp_path: Path, seed: int = 0) -> tuple[dict, dict]:
    """BC and DAgger from the same demos; their evaluation results on the same seeds."""
    demos = tmp_path / "demos"
    collect(LANGREACH, "expert", DEMOS, demos, seed=100 * seed, env_config=EASY, progress=False)
    common = {"seed": seed, "eval_every": 10**6}  # scored below, on the same seeds for both
    bc = resolve(
        "langreach-bc",
        {"env_config": EASY, "training": {"train_batch_size_per_learner": BATCH}, **common},
        data=str(demos),
    )
    train(bc, tmp_path / "bc", stop_iters=UPDATES, progress=False)
    dagger = resolve(
        "langreach-dagger",
        {
            "env_config": {**EASY, "expert_beta": 0.0},
            "training": {
                "beta": 0.0,
                "rollout_steps": ROLLOUT_STEPS,
                "updates_per_iteration": UPDATES_PER_ITER,
                "train_batch_size_per_learner": BATCH,
            },
            # the driver's EnvRunner rolls out: no actor start-up
            "env_runners": {"num_env_runners": 0, "num_envs_per_env_runner": 1},
            **common,
        },
        data=str(demos),
    )
    train(dagger, tmp_path / "dagger", stop_iters=ITERS, progress=False)

    def score(run: str) -> dict:
        policy = load_policy(tmp_path / run / "checkpoints" / "last")
        return evaluate(policy, episodes=EVAL_EPISODES, seed=10_000 + seed, progress=False)

    return score("bc"), score("dagger")


@pytest.mark.slow
def test_dagger_beats_bc_from_the_same_few_demos(ray_session, tmp_path):
    bc, dagger = bc_and_dagger(tmp_path)
    print(
        f"one-target LangReach from {DEMOS} demos, {UPDATES} updates each: success BC "
        f"{bc['success_rate']:.2f} vs DAgger {dagger['success_rate']:.2f}; return "
        f"{bc['mean_return']:.2f} vs {dagger['mean_return']:.2f}"
    )
    # Success (within 0.1 of the target in 20 steps) is too coarse at this size: 0.02-0.06 for
    # BC, 0.08-0.12 for DAgger. The return (10 x distance gained, +5 on success) separates them:
    # observed BC -1.9 to -2.6, DAgger 2.9 to 4.6 (seeds 0-2; 100 episodes each).
    assert dagger["mean_return"] > bc["mean_return"] + 2.5
