"""LangDrive: an instruction-following policy vs a language-blind control, equal budget.

Per seed and arm (``--conditions text blind``): ``--episodes`` scripted-expert episodes of
``vla_ray/LangDriveState-v0`` (``--action`` space; the env executes the expert's action plus
Gaussian noise of std ``--noise``, DART, while the labels stay noise-free) are cloned (``vla_ray.clone.clone``, in
process) for ``--updates`` Adam updates; then ``--rounds`` DAgger rounds: the clone drives
``--round-episodes`` episodes (the expert acts instead with probability ``--beta``, halved each
round), the env's privileged expert labels every visited state, and the clone trains
``--round-updates`` more updates on all frames so far. The blind arm gets the same pipeline with
``instruction_mode="blind"`` (its first frames are the same expert frames with the blind
instruction; the expert, and so the labels, still follow the hidden manoeuvre). Both are
evaluated on ``--eval-episodes`` held-out episodes: success, per-manoeuvre success, collision
rate, route completion, driving score, infractions. The budget is counted in updates and
episodes, not wall clock, so the result does not depend on the machine's load. Writes
``driving.json`` and ``driving.png`` to ``--out``; ``--merge`` combines per-arm JSONs.

    python bench/driving.py --seeds 0 1 2 --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ENV_ID = "vla_ray/LangDriveState-v0"


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The state-only VLA both arms clone: a Qwen2-style trunk of ``--layers`` layers of width
    ``--hidden``, a Gaussian head whose log-std starts at ``--init-log-std``."""
    return dict(
        vision="none",
        head="gaussian",
        head_config={"init_log_std": args.init_log_std},
        llm_config=dict(
            num_hidden_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=2 * args.hidden,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
    )


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


def concat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def train(
    seed: int, condition: str, expert: dict[str, np.ndarray], args: argparse.Namespace
) -> tuple[Any, dict[str, Any]]:
    """BC on the expert's frames, then ``args.rounds`` DAgger rounds: the clone drives
    ``args.round_episodes`` episodes (the expert's action with probability ``beta``, halved each
    round), every visited state is labelled by the expert and added, and the clone trains
    ``args.round_updates`` more updates on the aggregate."""
    from vla_ray.clone import clone, expert_frames

    env_config = {"instruction_mode": condition, "action": args.action}
    data = expert if condition == "text" else blind(expert)
    model = model_config(args)
    vla, rows = clone(
        model,
        data,
        ENV_ID,
        updates=args.updates,
        seed=seed,
        log_every=10**9,
        env_config={"action": args.action},
    )
    log: dict[str, Any] = dict(bc_loss=rows[-1]["learner"]["total_loss"], rounds=[])
    for r in range(args.rounds):

        def act(obs, vla=vla):
            batch = {k: np.asarray(v)[None] for k, v in obs.items()}
            return vla.predict(batch, deterministic=True).flatten().cpu().numpy()

        t0 = time.time()
        new = expert_frames(
            ENV_ID,
            args.round_episodes,
            seed=10_000 * seed + 1_000 * (r + 1),
            progress=False,
            env_config=env_config,
            policy=act,
            beta=args.beta * 0.5**r,
        )
        data = concat(data, new)
        vla, rows = clone(
            model,
            data,
            ENV_ID,
            updates=args.round_updates,
            init=vla,
            env_config={"action": args.action},
            seed=seed * 100 + r,
            log_every=10**9,
        )
        log["rounds"].append(
            dict(frames=int(len(new["action"])), rollout_s=round(time.time() - t0, 1))
        )
        print(json.dumps({"seed": seed, condition: log["rounds"][-1], "round": r}), flush=True)
    log["frames"] = int(len(data["action"]))
    log["final_loss"] = rows[-1]["learner"]["total_loss"]
    return vla, log


def run(seed: int, args: argparse.Namespace, conditions: list[str]) -> dict[str, Any]:
    import torch

    from vla_ray.clone import expert_frames
    from vla_ray.evaluate import Policy, evaluate

    torch.set_num_threads(1)
    t0 = time.time()
    expert = expert_frames(
        ENV_ID,
        args.episodes,
        seed=10_000 * seed,
        progress=False,
        noise=args.noise,
        env_config={"action": args.action},
    )
    out: dict[str, Any] = dict(
        seed=seed, expert_frames=int(len(expert["action"])), expert_s=time.time() - t0
    )
    for condition in conditions:
        t1 = time.time()
        vla, log = train(seed, condition, expert, args)

        def act(obs, vla=vla):
            return vla.predict(obs, deterministic=True).flatten(1).cpu().numpy()

        result = evaluate(
            Policy(act, {}, "bench", model=vla),
            ENV_ID,
            {"instruction_mode": condition, "action": args.action},
            episodes=args.eval_episodes,
            seed=100_000 + 1000 * seed,
            progress=False,
        )
        out[condition] = dict(
            **log,
            wall_s=round(time.time() - t1, 1),
            success_rate=result["success_rate"],
            success_by_manoeuvre=result.get("success_by_target", {}),
            **{
                k: result["driving"].get(k)
                for k in (
                    "collision_rate",
                    "driving_score",
                    "route_completion",
                    "mean_speed",
                    "infractions_per_episode",
                )
            },
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
    ax.set_title(f"LangDriveState-v0, BC + DAgger, {len(results)} seeds: instruction vs blind")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summarise(results: list[dict[str, Any]], out: Path, record: dict[str, Any]) -> None:
    """Mean and sd over seeds of each arm's metrics into ``driving.json``, the plot into
    ``driving.png``."""
    conditions = [c for c in ("text", "blind") if all(c in r for r in results)]
    record["summary_mean_std"] = {
        c: {
            m: (
                float(np.mean([r[c][m] for r in results])),
                float(np.std([r[c][m] for r in results])),
            )
            for m in ("success_rate", "collision_rate", "driving_score", "route_completion")
        }
        for c in conditions
    }
    record["runs"] = results
    (out / "driving.json").write_text(json.dumps(record, indent=1))
    if conditions == ["text", "blind"]:
        plot(results, out / "driving.png")
    print(json.dumps(record["summary_mean_std"], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", default=["text", "blind"])
    parser.add_argument("--episodes", type=int, default=40, help="expert episodes per seed")
    parser.add_argument("--updates", type=int, default=2000, help="BC updates on them")
    parser.add_argument("--rounds", type=int, default=4, help="DAgger rounds")
    parser.add_argument("--round-episodes", type=int, default=15, help="clone episodes a round")
    parser.add_argument("--round-updates", type=int, default=1000, help="updates a round")
    parser.add_argument("--beta", type=float, default=0.5, help="expert share, first round")
    parser.add_argument(
        "--noise",
        type=float,
        default=0.05,
        help="DART: std of the Gaussian noise added to the executed expert actions of the first "
        "frames (labels stay noise-free)",
    )
    parser.add_argument("--hidden", type=int, default=32, help="trunk width")
    parser.add_argument("--layers", type=int, default=1, help="trunk layers")
    parser.add_argument(
        "--init-log-std", type=float, default=-0.5, help="the Gaussian head's initial log-std"
    )
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--action", choices=["controls", "waypoints"], default="waypoints")
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument(
        "--merge", nargs="+", help="partial JSONs (runs of one seed/arm each) to summarise"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        runs: dict[int, dict[str, Any]] = {}
        for part in parts:
            for r in part["runs"]:
                runs.setdefault(r["seed"], {}).update(r)
        drop = ("seeds", "conditions", "out", "merge")
        settings = {k: v for k, v in parts[0]["args"].items() if k not in drop}
        if any({k: v for k, v in p["args"].items() if k not in drop} != settings for p in parts):
            raise SystemExit("--merge: the parts were run with different settings")
        record = dict(args=settings, model=parts[0]["model"], merged_from=args.merge)
        summarise([runs[s] for s in sorted(runs)], out, record)
        return
    t0 = time.time()
    results = [run(seed, args, args.conditions) for seed in args.seeds]
    record = dict(args=vars(args), model=model_config(args), wall_s=time.time() - t0)
    summarise(results, out, record)


if __name__ == "__main__":
    main()
