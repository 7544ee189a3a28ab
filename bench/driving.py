"""LangDrive: an instruction-following cloned policy vs a language-blind control, equal budget.

Per seed: ``--episodes`` scripted-expert episodes of ``vla_ray/LangDriveState-v0`` (controls
actions) give the frames; the text policy is cloned (``vla_ray.clone.clone``, in process) on
them as they are, the blind control on the same frames with every instruction replaced by the
env's blind instruction (the expert, and so the labels, still follow the hidden manoeuvre). Both
train for ``--seconds`` of wall clock and are evaluated on ``--eval-episodes`` held-out episodes
(the blind one in the env's ``instruction_mode="blind"``): success, collision rate, per-manoeuvre
success, driving score. Writes ``driving.json`` and ``driving.png`` to ``--out``.

    flock /work/cpu.lock python bench/driving.py --seeds 0 1 2 --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ENV_ID = "vla_ray/LangDriveState-v0"
# a state-only VLA with a 1-layer hidden-32 Qwen2-style trunk (clones in a few minutes on CPU)
MODEL: dict[str, Any] = dict(
    vision="none",
    head="gaussian",
    llm_config=dict(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
)


def frames_for(seed: int, episodes: int) -> dict[str, np.ndarray]:
    from vla_ray.clone import expert_frames

    return expert_frames(ENV_ID, episodes, seed=10_000 * seed, progress=False)


def blind(frames: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same frames with the blind instruction in every row."""
    import gymnasium as gym

    env = gym.make(ENV_ID, instruction_mode="blind")
    obs, _ = env.reset(seed=0)
    env.close()
    n = len(frames["action"])
    return dict(
        frames,
        instruction=np.repeat(obs["instruction"][None], n, 0),
        instruction_mask=np.repeat(obs["instruction_mask"][None], n, 0),
    )


def run(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vla_ray.clone import clone
    from vla_ray.evaluate import Policy, evaluate

    torch.set_num_threads(1)
    t0 = time.time()
    frames = frames_for(seed, args.episodes)
    out: dict[str, Any] = dict(
        seed=seed, frames=int(len(frames["action"])), frames_s=time.time() - t0
    )
    for condition, data, env_config in (
        ("text", frames, {}),
        ("blind", blind(frames), {"instruction_mode": "blind"}),
    ):
        vla, rows = clone(MODEL, data, ENV_ID, seconds=args.seconds, seed=seed, log_every=10**9)

        def act(obs, vla=vla):
            return vla.predict(obs, deterministic=True).flatten(1).cpu().numpy()

        result = evaluate(
            Policy(act, {}, "bench", model=vla),
            ENV_ID,
            env_config,
            episodes=args.eval_episodes,
            seed=100_000 + 1000 * seed,
            progress=False,
        )
        out[condition] = dict(
            updates=rows[-1]["iteration"],
            final_loss=rows[-1]["learner"]["total_loss"],
            success_rate=result["success_rate"],
            success_by_manoeuvre=result.get("success_by_target", {}),
            **{k: result["driving"][k] for k in ("collision_rate", "driving_score")},
            route_completion=result["driving"]["route_completion"],
        )
        print(json.dumps({"seed": seed, condition: out[condition]}), flush=True)
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    metrics = ("success_rate", "collision_rate", "driving_score")
    for i, condition in enumerate(("text", "blind")):
        vals = np.array([[r[condition][m] for m in metrics] for r in results])
        x = np.arange(len(metrics)) + (i - 0.5) * 0.35
        ax.bar(x, vals.mean(0), 0.35, yerr=vals.std(0), label=condition, capsize=3)
        for row in vals:
            ax.scatter(x, row, color="k", s=8, zorder=3)
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.set_ylim(0, 1)
    ax.set_title(f"LangDrive cloning, {len(results)} seeds: instruction vs blind")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=60, help="expert episodes per seed")
    parser.add_argument("--seconds", type=float, default=90.0, help="cloning wall clock")
    parser.add_argument("--eval-episodes", type=int, default=30)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = [run(seed, args) for seed in args.seeds]
    summary = {
        c: {
            m: (
                float(np.mean([r[c][m] for r in results])),
                float(np.std([r[c][m] for r in results])),
            )
            for m in ("success_rate", "collision_rate", "driving_score", "route_completion")
        }
        for c in ("text", "blind")
    }
    record = dict(args=vars(args), model=MODEL, wall_s=time.time() - t0, runs=results)
    record["summary_mean_std"] = summary
    (out / "driving.json").write_text(json.dumps(record, indent=1))
    plot(results, out / "driving.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
