"""Benchmark: VLA-Dreamer on LangReach, against PPO at equal env steps, and planning vs the actor.

Stages (each reads what the ones before wrote under ``--runs``):

- ``learn``: trains ``langreach-dreamer`` and ``langreach-ppo`` for ``--steps`` env steps each
  (or ``--max-minutes``), one run per ``--seeds`` seed; a learning run (its success does not
  depend on speed, so no cpu.lock);
- ``plan``: evaluates each run's last checkpoint on ``--episodes`` held-out seeds: PPO's policy,
  Dreamer's actor alone and with the CEM and MPPI planners;
- ``latency``: milliseconds per action of the actor, CEM and MPPI on the first Dreamer run's
  checkpoint (timed: run it under ``flock /work/cpu.lock``);
- ``throughput``: training env steps per second of each algorithm over ``--seconds`` (timed:
  under ``flock /work/cpu.lock``), the wall-clock axis at equal load;
- ``probe``: whether a world model represents the targets: its decoded image's error on target
  (foreground) and background pixels, and ridge probes of target and agent positions from the
  latent, on held-out episodes (offline-trained with ``--fg-weights``, or ``--checkpoints``);
- ``report``: prints the table, writes ``OUT/world_model.json`` and ``OUT/world_model.png``
  (training success vs env steps and vs wall-clock, both algorithms, with the documented
  30-minute ``langreach-ppo`` curve from ``--ppo-reference``).

    python bench/world_model.py learn --algos dreamer --seeds 0 1 --steps 16000 --runs RUNS
    python bench/world_model.py learn --algos ppo --seeds 0 1 --steps 16000 --runs RUNS
    python bench/world_model.py learn --algos dreamer --seeds 0 --blind --steps 16000 --runs RUNS
    python bench/world_model.py probe --runs P --checkpoints RUNS/dreamer_seed0/checkpoints/last
    python bench/world_model.py plan --runs RUNS --episodes 20
    flock /work/cpu.lock python bench/world_model.py latency --runs RUNS
    flock /work/cpu.lock python bench/world_model.py throughput --runs RUNS --seconds 150
    python bench/world_model.py report --runs RUNS --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

PRESETS = {"dreamer": "langreach-dreamer", "ppo": "langreach-ppo"}


def learn(
    algo: str,
    seed: int,
    steps: int,
    runs: Path,
    runners: int,
    max_minutes: float | None,
    blind: bool = False,
    settings: list[str] | None = None,
) -> dict[str, Any]:
    """Train ``algo``'s LangReach preset for ``steps`` env steps (or ``max_minutes``, whichever
    comes first); ``blind``: the language-blind control (``instruction_mode=blind``, as
    ``bench/langreach_ppo.py``'s), in ``RUNS/<algo>-blind_seed<seed>``; ``settings``: ``--set``
    style ``KEY=VALUE`` overrides of the preset. Returns its summary."""
    from vla_ray.train import _merge, parse_overrides, resolve, train

    run_dir = runs / f"{algo}{'-blind' if blind else ''}_seed{seed}"
    overrides: dict[str, Any] = {"seed": seed, "env_runners": {"num_env_runners": runners}}
    if blind:
        overrides["env_config"] = {"instruction_mode": "blind"}
    overrides = _merge(overrides, parse_overrides(settings or []))
    spec = resolve(PRESETS[algo], overrides)
    t0 = time.time()
    seconds = None if max_minutes is None else 60.0 * max_minutes
    summary = train(spec, run_dir, stop_timesteps=steps, stop_seconds=seconds, progress=False)
    summary["bench_wall_s"] = round(time.time() - t0, 1)
    summary["bench_overrides"] = overrides
    (run_dir / "bench_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def curve(run_dir: Path) -> list[dict[str, Any]]:
    """Per-iteration env steps, wall time and training success of a run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        dict(
            env_steps=r["env_steps"],
            time_s=r["time_s"],
            success_rate=r.get("success_rate"),
            episodes=r.get("episodes_this_iter", r.get("num_episodes")),
        )
        for r in rows
    ]


PLANNERS = ("none", "cem", "mppi")


def _checkpoint(run_dir: Path) -> str:
    return json.loads((run_dir / "bench_summary.json").read_text())["last_checkpoint"]


def plan_eval(run_dir: Path, episodes: int, planners: tuple[str, ...]) -> dict[str, Any]:
    """Held-out success, return and length of one checkpoint's policy alone ("none") and with
    each planner (CEM, MPPI: Dreamer's checkpoints only)."""
    from vla_ray.evaluate import evaluate, load_policy

    ckpt = _checkpoint(run_dir)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "episodes": episodes}
    for planner in planners:
        result = evaluate(load_policy(ckpt, planner=planner), episodes=episodes, progress=False)
        out[planner] = {k: result[k] for k in ("success_rate", "mean_return", "mean_length")}
        print(run_dir.name, planner, out[planner], flush=True)
    return out


def latency(run_dir: Path, steps: int) -> dict[str, Any]:
    """Seconds per action of the actor alone, CEM and MPPI (one observation at a time, the
    env's step excluded; ``steps`` timed actions after 3 untimed ones)."""
    import gymnasium as gym
    import numpy as np

    import vla_ray.envs  # noqa: F401
    from vla_ray.evaluate import load_policy

    ckpt = _checkpoint(run_dir)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "steps": steps}
    for planner in PLANNERS:
        policy = load_policy(ckpt, planner=planner)
        env = gym.make(policy.meta["env"], **policy.meta.get("env_config", {}))
        obs, _ = env.reset(seed=123_456)
        policy.reset()
        times = []
        for i in range(steps + 3):
            batch = {k: np.asarray(v)[None] for k, v in obs.items()}
            t0 = time.perf_counter()
            action = policy(batch)[0]
            if i >= 3:
                times.append(time.perf_counter() - t0)
            obs, _, term, trunc, _ = env.step(action)
            if term or trunc:
                obs, _ = env.reset()
                policy.reset()
        env.close()
        out[planner] = dict(
            ms_median=round(1000 * float(np.median(times)), 2),
            ms_p90=round(1000 * float(np.percentile(times, 90)), 2),
        )
        print(run_dir.name, planner, out[planner], flush=True)
    return out


def throughput(algo: str, seconds: float, runners: int) -> dict[str, Any]:
    """Env steps per second of training (sampling + updates; the first iteration, which
    includes start-up, excluded) over ``seconds`` of ``algo``'s preset."""
    import tempfile

    from vla_ray.train import resolve, train

    with tempfile.TemporaryDirectory() as tmp:
        spec = resolve(PRESETS[algo], {"env_runners": {"num_env_runners": runners}})
        train(spec, Path(tmp) / "run", stop_seconds=seconds, progress=False)
        rows = curve(Path(tmp) / "run")
    first, last = rows[0], rows[-1]
    rate = (last["env_steps"] - first["env_steps"]) / max(1e-9, last["time_s"] - first["time_s"])
    out = dict(
        algo=algo,
        iterations=len(rows),
        env_steps=last["env_steps"],
        seconds=last["time_s"],
        env_steps_per_s=round(rate, 2),
    )
    print(out, flush=True)
    return out


def collect(
    episodes: int, seed: int, image_size: int, expert_prob: float = 0.5
) -> list[dict[str, Any]]:
    """LangReach episodes (``image_size`` pixels) of a behaviour policy that takes the privileged
    expert's action with probability ``expert_prob`` and a uniform one otherwise: each is
    ``obs`` (T+1 rows per field), ``actions``, ``rewards``, ``terminated`` and the named
    target's and every target's position (for the latent probe)."""
    import gymnasium as gym
    import numpy as np

    import vla_ray.envs  # noqa: F401

    env = gym.make("vla_ray/LangReach-v0", image_size=image_size)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(episodes):
        obs, info = env.reset(seed=seed * 10_000 + i)
        base = env.unwrapped
        rows, actions, rewards, term = [obs], [], [], False
        while True:
            if rng.random() < expert_prob:
                action = base.expert_action() + rng.normal(0, 0.3, 2).astype(np.float32)
            else:
                action = rng.uniform(-1, 1, 2).astype(np.float32)
            action = np.clip(action, -1, 1)
            obs, reward, term, trunc, _ = env.step(action)
            rows.append(obs)
            actions.append(action)
            rewards.append(reward)
            if term or trunc:
                break
        targets = base.target_positions
        out.append(
            dict(
                obs={k: np.stack([r[k] for r in rows]) for k in rows[0]},
                actions=np.stack(actions),
                rewards=np.asarray(rewards, np.float32),
                terminated=bool(term),
                goal=targets[base._goal].astype(np.float32),
                targets=targets.reshape(-1).astype(np.float32),
            )
        )
    env.close()
    return out


def _ridge_r2(x_train, y_train, x_test, y_test, alpha: float = 10.0) -> float:
    """Held-out R^2 (mean over outputs) of a ridge regression on centred features (not
    scaled: near-constant one-hot columns would blow up)."""
    import torch

    mu = x_train.mean(0)
    a, b = x_train - mu, x_test - mu
    a = torch.cat([a, torch.ones(len(a), 1)], 1)
    b = torch.cat([b, torch.ones(len(b), 1)], 1)
    eye = torch.eye(a.shape[1])
    eye[-1, -1] = 0
    w = torch.linalg.solve(a.T @ a + alpha * eye, a.T @ y_train)
    resid = ((b @ w - y_test) ** 2).sum(0)
    total = ((y_test - y_test.mean(0)) ** 2).sum(0)
    return float((1 - resid / total).mean())


def _episode_batch(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole episodes of equal length as one (B, T) world-model batch (no replay windows)."""
    import numpy as np
    import torch

    B, T = len(episodes), len(episodes[0]["actions"]) + 1
    prev = np.zeros((B, T, 2), np.float32)
    rew = np.zeros((B, T), np.float32)
    for i, ep in enumerate(episodes):
        prev[i, 1:] = ep["actions"]
        rew[i, 1:] = ep["rewards"]
    first = np.zeros((B, T), np.float32)
    first[:, 0] = 1
    obs = {
        k: torch.as_tensor(np.stack([ep["obs"][k] for ep in episodes])) for k in episodes[0]["obs"]
    }
    return dict(
        obs=obs,
        prev_actions=torch.as_tensor(prev),
        rewards=torch.as_tensor(rew),
        continues=torch.ones(B, T),
        is_first=torch.as_tensor(first),
    )


def offline_update(wm, opt, replay, B: int, T: int, rng: Any) -> dict[str, float]:
    """One world-model update (Adam ``opt``) on (B, T) windows drawn from ``replay`` with the
    numpy generator ``rng``, gradients clipped at 100; the loss's metrics."""
    import torch

    sample = replay.sample(B, T, rng)
    batch = {
        k: ({kk: torch.as_tensor(vv) for kk, vv in v.items()} if k == "obs" else torch.as_tensor(v))
        for k, v in sample.items()
    }
    loss, metrics, _ = wm.loss(batch)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(wm.parameters(), 100.0)
    opt.step()
    return metrics


def model_with_settings(model: dict[str, Any], settings: list[str] | None) -> dict[str, Any]:
    """A copy of a preset's ``model`` dict with ``--set`` style ``model.KEY=VALUE`` settings
    merged in (the preset's dict is not changed); ValueError naming any other section."""
    import copy

    from vla_ray.train import _merge, parse_overrides

    overrides = parse_overrides(settings or [])
    unknown = sorted(set(overrides) - {"model"})
    if unknown:
        raise ValueError(f"--set: only model.* settings apply here, got sections {unknown}")
    return _merge(copy.deepcopy(model), overrides.get("model", {}))


def probe(
    fg_weight: float,
    updates: int,
    train_episodes: int,
    test_episodes: int,
    seed: int,
    checkpoint: str | None = None,
    settings: list[str] | None = None,
) -> dict[str, Any]:
    """Whether a world model represents LangReach's targets: the ``langreach-dreamer`` world
    model (``image_fg_weight`` = ``fg_weight``; ``settings``: ``--set`` style ``model.KEY=VALUE``
    overrides of the preset's model) trained offline for ``updates`` updates (the
    preset's B x T windows and learning rate) on behaviour episodes, or a trained run's
    ``checkpoint`` as it is; then, on held-out episodes, the posterior reconstruction's error on
    foreground (target and agent) and background pixels, and the held-out R^2 of ridge probes
    from the latent features to the named target's position, to all targets' positions and
    (the probe's control) to the agent's position, fitted on the behaviour episodes."""
    import gymnasium as gym
    import numpy as np
    import torch

    import vla_ray.envs  # noqa: F401
    from vla_ray.presets import PRESETS
    from vla_ray.world_model.model import image_target
    from vla_ray.world_model.replay import SequenceReplay
    from vla_ray.world_model.rl_module import WorldModelModule

    preset = PRESETS["langreach-dreamer"]
    size = preset.env_config["image_size"]
    torch.manual_seed(seed)
    env = gym.make(preset.env, **preset.env_config)
    model = model_with_settings(preset.model, settings)
    model["world_model"] = {**model["world_model"], "image_fg_weight": fg_weight}
    if checkpoint is None:
        module = WorldModelModule(
            observation_space=env.observation_space,
            action_space=env.action_space,
            model_config=model,
        )
    else:
        from ray.rllib.core.rl_module.rl_module import RLModule

        from vla_ray.checkpoint import MODULE_SUBDIR

        module = RLModule.from_checkpoint(str((Path(checkpoint) / MODULE_SUBDIR).resolve()))
        fg_weight = module.wm_config.image_fg_weight
        updates = 0
    env.close()
    wm = module.world_model
    train_eps = collect(train_episodes, seed, size)
    test_eps = collect(test_episodes, 1000 + seed, size)
    replay = SequenceReplay()
    for ep in train_eps:
        replay.add(ep["obs"], ep["actions"], ep["rewards"], ep["terminated"])
    opt = torch.optim.Adam(wm.parameters(), lr=preset.training["lr"], eps=1e-8)
    rng = np.random.default_rng(seed)
    B, T = preset.training["batch_size_B"], preset.training["batch_length_T"]
    t0 = time.time()
    log = []
    for i in range(updates):
        metrics = offline_update(wm, opt, replay, B, T, rng)
        if (i + 1) % 50 == 0 or i == 0:
            row = {"update": i + 1, "s": round(time.time() - t0, 1)}
            row.update({k: round(v, 5) for k, v in metrics.items() if k.startswith("image")})
            log.append(row)
            print(fg_weight, row, flush=True)

    from vla_ray.world_model.losses import weighted_image_error

    frames = image_target(torch.as_tensor(np.concatenate([ep["obs"]["image"] for ep in train_eps])))
    mean_frame = frames.mean(0)
    # the training data's static background (one episode alone would count its targets)
    background = frames.median(0).values

    def features(eps: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, float]]:
        feats, errs = [], []
        for ep in eps:  # one at a time: episodes that end on success are shorter
            batch = _episode_batch([ep])
            target = image_target(batch["obs"]["image"])
            with torch.no_grad():
                feat = wm.filter(batch).features()
                img = weighted_image_error(
                    wm.decoders["image"](feat), target, background=background
                )
                base = weighted_image_error(
                    mean_frame.expand_as(target), target, background=background
                )
            feats.append(feat[0])
            errs.append({k: v[0] for k, v in img.items() if k != "loss"})
            errs[-1].update({f"mean_frame_{k}": base[k][0] for k in ("mse", "fg_mse", "bg_mse")})
        mean = {k: float(torch.cat([e[k] for e in errs]).mean()) for k in errs[0]}
        return torch.cat(feats), {f"image_{k}": round(v, 5) for k, v in mean.items()}

    f_train, _ = features(train_eps)
    f_test, errs = features(test_eps)

    def targets(eps: list[dict[str, Any]], key: str) -> torch.Tensor:
        rows = [np.repeat(ep[key][None], len(ep["actions"]) + 1, axis=0) for ep in eps]
        return torch.as_tensor(np.concatenate(rows))

    out = dict(
        checkpoint=checkpoint,
        settings=settings or [],
        image_fg_weight=fg_weight,
        updates=updates,
        train_episodes=train_episodes,
        test_episodes=test_episodes,
        seed=seed,
        train_s=round(time.time() - t0, 1),
        log=log,
        heldout=errs,
        probe_r2_named_target=round(
            _ridge_r2(f_train, targets(train_eps, "goal"), f_test, targets(test_eps, "goal")), 4
        ),
        probe_r2_all_targets=round(
            _ridge_r2(f_train, targets(train_eps, "targets"), f_test, targets(test_eps, "targets")),
            4,
        ),
        # the probe's control: the agent's position is in the state the model also decodes
        probe_r2_agent=round(
            _ridge_r2(
                f_train,
                torch.as_tensor(np.concatenate([ep["obs"]["state"][:, :2] for ep in train_eps])),
                f_test,
                torch.as_tensor(np.concatenate([ep["obs"]["state"][:, :2] for ep in test_eps])),
            ),
            4,
        ),
    )
    print(json.dumps({k: v for k, v in out.items() if k != "log"}), flush=True)
    return out


BIN = 2048  # env steps per point of the curves (PPO's batch)


def binned(rows: list[dict[str, Any]], width: int = BIN) -> list[dict[str, float]]:
    """Training success averaged over bins of ``width`` env steps (iterations that ended no
    episode skipped): the bin's last env steps and wall time, and the mean success."""
    bins: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        bins.setdefault((r["env_steps"] - 1) // width, []).append(r)
    out = []
    for _, group in sorted(bins.items()):
        ys = [r["success_rate"] for r in group if r["success_rate"] is not None]
        if ys:
            last = group[-1]
            out.append(
                dict(env_steps=last["env_steps"], time_s=last["time_s"], success=sum(ys) / len(ys))
            )
    return out


def report(runs: Path, out: Path, ppo_reference: Path | None) -> dict[str, Any]:
    """Table + JSON + PNG from the runs under ``runs``."""
    results: dict[str, Any] = {
        "machine": "2-core AMD EPYC CPU, no GPU (shared with other sessions; see docs)",
        "python": platform.python_version(),
        "runs": {},
    }
    for run_dir in sorted(p for p in runs.iterdir() if (p / "bench_summary.json").is_file()):
        summary = json.loads((run_dir / "bench_summary.json").read_text())
        entry: dict[str, Any] = dict(
            env_steps=summary.get("env_steps"),
            wall_s=summary.get("bench_wall_s"),
            overrides=summary.get("bench_overrides"),
            # a run whose metrics.jsonl is missing keeps its summary and evaluations
            curve=curve(run_dir) if (run_dir / "metrics.jsonl").is_file() else [],
        )
        if (run_dir / "plan_eval.json").is_file():
            entry["plan_eval"] = json.loads((run_dir / "plan_eval.json").read_text())
        results["runs"][run_dir.name] = entry
    for name in ("latency", "throughput"):
        if (runs / f"{name}.json").is_file():
            results[name] = json.loads((runs / f"{name}.json").read_text())
    if ppo_reference is not None and ppo_reference.is_file():
        ref = json.loads(ppo_reference.read_text())
        variants = ref.get("variants") or ref.get("results") or []
        # the documented PPO run and its language-blind control
        for variant, key in (("instruction", "ppo_reference"), ("blind", "ppo_reference_blind")):
            ref = next((v for v in variants if v.get("variant") == variant), None)
            if ref is None:
                continue
            rows = [
                dict(env_steps=c["env_steps"], time_s=c["time_s"], success_rate=c["success_rate"])
                for c in ref["curve"]
            ]
            first_80 = next((r["env_steps"] for r in rows if r["success_rate"] >= 0.8), None)
            results[key] = dict(
                source=str(ppo_reference), first_80pct_env_steps=first_80, curve=rows
            )
    print(
        f"{'run':<16} {'env steps':>9} {'wall s':>7} {'train success, last bin':>24}  "
        "held-out eval (success / return) by planner"
    )
    for name, entry in results["runs"].items():
        entry["binned"] = binned(entry["curve"])
        last = entry["binned"][-1]["success"] if entry["binned"] else None
        entry["train_success_last_bin"] = last
        evals = "  ".join(
            f"{planner} {row['success_rate']:.2f} / {row['mean_return']:.2f}"
            for planner, row in (entry.get("plan_eval") or {}).items()
            if isinstance(row, dict)
        )
        shown = "-" if last is None else f"{last:.3f}"
        print(f"{name:<16} {entry['env_steps']:>9} {entry['wall_s']:>7} {shown:>24}  {evals}")
    for planner, row in (results.get("latency") or {}).items():
        if isinstance(row, dict):
            print(f"latency {planner:<5} median {row['ms_median']} ms  p90 {row['ms_p90']} ms")
    out.mkdir(parents=True, exist_ok=True)
    (out / "world_model.json").write_text(json.dumps(results, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return results
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {
        "dreamer": "tab:blue",
        "dreamer-blind": "tab:gray",
        "ppo": "tab:orange",
        "ppo-blind": "tab:brown",
    }
    for name, entry in results["runs"].items():
        algo = name.split("_")[0]
        for ax, x in zip(axes, ("env_steps", "time_s"), strict=True):
            pts = [(b[x], b["success"]) for b in entry["binned"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=colors.get(algo), label=name, alpha=0.8)
    max_steps = max([e["env_steps"] or 0 for e in results["runs"].values()] or [0])
    for key, style, label in (
        ("ppo_reference", "k--", "langreach-ppo 2026-12-05 (docs)"),
        ("ppo_reference_blind", "k:", "langreach-ppo blind control (docs)"),
    ):
        ref = results.get(key)
        pts = [(c["env_steps"], c["success_rate"]) for c in (ref or {}).get("curve", [])]
        near = [(x, y) for x, y in pts if x <= 1.5 * max_steps]
        if near:
            axes[0].plot(*zip(*near, strict=True), style, label=label, alpha=0.7)
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("wall-clock s (shared 2-core CPU, unlocked: load-sensitive)")
    for ax in axes:
        ax.set_ylabel(f"training success (mean per {BIN} env steps)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.suptitle("LangReach: VLA-Dreamer vs PPO at equal env steps")
    fig.tight_layout()
    fig.savefig(out / "world_model.png", dpi=90)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "stage", choices=("learn", "plan", "latency", "throughput", "probe", "report")
    )
    parser.add_argument("--runs", type=Path, required=True, help="folder of the training runs")
    parser.add_argument("--algos", nargs="+", default=["dreamer", "ppo"], choices=list(PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=16_000, help="env steps per run")
    parser.add_argument("--runners", type=int, default=0, help="EnvRunners per run")
    parser.add_argument("--max-minutes", type=float, help="learn: stop a run after this long")
    parser.add_argument(
        "--blind", action="store_true", help="learn: the language-blind control (no colour named)"
    )
    parser.add_argument("--episodes", type=int, default=20, help="plan: episodes per planner")
    parser.add_argument(
        "--planners", nargs="+", default=list(PLANNERS), choices=PLANNERS, help="plan: Dreamer's"
    )
    parser.add_argument("--latency-steps", type=int, default=30, help="latency: timed actions")
    parser.add_argument("--glob", default="*_seed*", help="plan: which runs under --runs")
    parser.add_argument("--seconds", type=float, default=150, help="throughput: per algorithm")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument(
        "--fg-weights", nargs="+", type=float, default=[1.0, 20.0], help="probe: image_fg_weight"
    )
    parser.add_argument("--updates", type=int, default=400, help="probe: world-model updates")
    parser.add_argument("--train-episodes", type=int, default=60, help="probe: behaviour data")
    parser.add_argument(
        "--checkpoints", nargs="+", help="probe: trained runs' checkpoints instead of training"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="learn, probe (model.* only): a setting of the preset, as `vla-ray train --set`",
    )
    parser.add_argument("--ppo-reference", type=Path, default=Path("docs/bench/langreach_ppo.json"))
    args = parser.parse_args()
    if args.stage == "learn":
        for algo in args.algos:
            for seed in args.seeds:
                summary = learn(
                    algo,
                    seed,
                    args.steps,
                    args.runs,
                    args.runners,
                    args.max_minutes,
                    args.blind,
                    args.set,
                )
                print(algo, seed, summary.get("env_steps"), summary["bench_wall_s"], flush=True)
    elif args.stage == "plan":
        for run_dir in sorted(args.runs.glob(args.glob)):
            planners = tuple(args.planners) if run_dir.name.startswith("dreamer") else ("none",)
            result = plan_eval(run_dir, args.episodes, planners)
            (run_dir / "plan_eval.json").write_text(json.dumps(result, indent=2))
    elif args.stage == "latency":
        run_dir = sorted(args.runs.glob("dreamer_seed*"))[0]
        (args.runs / "latency.json").write_text(
            json.dumps(latency(run_dir, args.latency_steps), indent=2)
        )
    elif args.stage == "throughput":
        rows = [throughput(algo, args.seconds, args.runners) for algo in args.algos]
        (args.runs / "throughput.json").write_text(json.dumps(rows, indent=2))
    elif args.stage == "probe":
        args.runs.mkdir(parents=True, exist_ok=True)
        rows = [
            probe(
                w, args.updates, args.train_episodes, args.episodes, args.seeds[0], ckpt, args.set
            )
            for w in args.fg_weights
            for ckpt in (args.checkpoints or [None])
        ]
        (args.runs / "probe.json").write_text(json.dumps(rows, indent=2))
    else:
        report(args.runs, args.out, args.ppo_reference)


if __name__ == "__main__":
    main()
