"""Benchmark: does VLM pretraining help the downstream LangReach policy?

1. Pretrain on the synthetic LangReach-scene VLM data (``vla-ray make-vlm-data``): stage
   ``align`` (projector only), then stage ``instruct`` from the aligned VLM (projector + LM, and
   the vision encoder with ``--train-vision``), each on Ray Train with one worker.
2. Behaviour cloning on scripted-expert demonstrations of ``vla_ray/LangReach-v0`` with the
   ``langreach-ppo`` preset's model (MSE head), starting from (a) random init, (b) the aligned
   VLM, (c) the instruction-tuned VLM: the same demos, seed, optimiser and number of steps.
3. Deterministic evaluation on held-out seeds: success rate per variant.

Prints a table and writes ``OUT/pretrain_downstream.json``.

    python bench/pretrain_downstream.py --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
ENV = "vla_ray/LangReach-v0"


def pretrain_stages(data: Path, work: Path, args) -> dict[str, Path]:
    from vla_ray.pretrain.data import INSTRUCT_FILE, PRETRAIN_FILE
    from vla_ray.pretrain.trainer import PretrainConfig, pretrain

    common = dict(batch_size=args.pretrain_batch, progress=False, checkpoint_every=10**6)
    align = pretrain(
        PretrainConfig(
            stage="align",
            data=str(data / PRETRAIN_FILE),
            output=str(work / "align"),
            max_steps=args.align_steps,
            **common,
        )
    )
    instruct = pretrain(
        PretrainConfig(
            stage="instruct",
            data=str(data / INSTRUCT_FILE),
            output=str(work / "instruct"),
            init=align["vlm"],
            max_steps=args.instruct_steps,
            train_vision=args.train_vision,
            **common,
        )
    )
    return {"align": align, "instruct": instruct}


def collect_demos(episodes: int, noise: float):
    import gymnasium as gym
    import numpy as np

    import vla_ray.envs  # noqa: F401
    from vla_ray.envs.experts import ScriptedExpert

    env = gym.make(ENV)
    expert = ScriptedExpert(noise=noise, seed=0)
    obs_list, actions = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        done = False
        while not done:
            a = expert(env)
            # label with the noise-free expert action, act with the noisy one (DART-style)
            obs_list.append(obs)
            actions.append(env.unwrapped.expert_action())
            obs, _, terminated, truncated, _ = env.step(a)
            done = terminated or truncated
    env.close()
    batch = {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}
    return batch, np.stack(actions).astype(np.float32)


def behaviour_clone(init: str | None, demos, args) -> tuple[object, list[float]]:
    import gymnasium as gym
    import numpy as np
    import torch

    import vla_ray.envs  # noqa: F401
    from vla_ray.models.vla import VLA
    from vla_ray.presets import get_preset
    from vla_ray.rl_module import vla_config_from_spaces

    env = gym.make(ENV)
    spaces = (env.observation_space, env.action_space)
    env.close()
    model_cfg = {**get_preset("langreach-ppo").model, "head": "mlp", "head_config": {}}
    model_cfg.pop("value", None)
    config = vla_config_from_spaces(model_cfg, *spaces)
    # same seed and architecture: the head, state projection and action query start identical
    torch.manual_seed(args.seed)
    vla = VLA.from_pretrained_vlm(init, config) if init else VLA(config)
    obs, actions = demos
    n = len(actions)
    opt = torch.optim.AdamW(vla.parameters(), lr=args.bc_lr)
    gen = np.random.default_rng(args.seed)
    losses = []
    vla.train()
    for _ in range(args.bc_steps):
        idx = gen.integers(0, n, args.bc_batch)
        batch = {k: torch.as_tensor(v[idx]) for k, v in obs.items()}
        target = torch.as_tensor(actions[idx])[:, None]
        loss = vla.head.loss(vla.trunk(batch), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vla.eval()
    return vla, losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset dir from make-vlm-data (default: make one)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--pretrain-batch", type=int, default=64)
    p.add_argument("--align-steps", type=int, default=150)
    p.add_argument("--instruct-steps", type=int, default=250)
    p.add_argument("--train-vision", action="store_true")
    p.add_argument("--demos", type=int, default=100, help="expert episodes")
    p.add_argument("--noise", type=float, default=0.3, help="expert action noise while acting")
    p.add_argument("--bc-steps", type=int, default=1000)
    p.add_argument("--bc-batch", type=int, default=64)
    p.add_argument("--bc-lr", type=float, default=1e-3)
    p.add_argument("--episodes", type=int, default=100, help="evaluation episodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()

    import numpy as np
    import ray

    from vla_ray.evaluate import Policy, evaluate
    from vla_ray.pretrain.data import make_vlm_data
    from vla_ray.train import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-downstream-"))
    results: dict[str, dict] = {}
    try:
        data = Path(args.data) if args.data else work / "data"
        if not args.data:
            make_vlm_data(data, args.n, progress=False)
        init_ray()
        t0 = time.perf_counter()
        stages = pretrain_stages(data, work, args)
        pretrain_s = time.perf_counter() - t0
        ray.shutdown()
        demos = collect_demos(args.demos, args.noise)
        for name, init in [
            ("random init", None),
            ("aligned VLM", stages["align"]["vlm"]),
            ("instruct VLM", stages["instruct"]["vlm"]),
        ]:
            t0 = time.perf_counter()
            vla, losses = behaviour_clone(init, demos, args)

            def act(obs, vla=vla):
                return vla.predict(obs, deterministic=True).flatten(1).cpu().numpy()

            ev = evaluate(Policy(act, {}, name), ENV, {}, episodes=args.episodes, progress=False)
            results[name] = dict(
                success_rate=ev["success_rate"],
                mean_return=ev["mean_return"],
                bc_final_loss=float(np.mean(losses[-50:])),
                bc_s=time.perf_counter() - t0,
            )
            print(name, results[name], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nexpert demos: {args.demos} episodes ({len(demos[1])} steps); BC {args.bc_steps} steps"
    )
    print("| start | eval success | mean return | BC loss (last 50) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['success_rate']:.2f} | {r['mean_return']:.2f} | {r['bc_final_loss']:.4f} |"
        )
    pre = {k: {kk: v[kk] for kk in ("steps", "final_loss", "records")} for k, v in stages.items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pretrain_downstream.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "pretrain": pre,
                "pretrain_s": pretrain_s,
                "demo_steps": len(demos[1]),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {Path(args.out) / 'pretrain_downstream.json'}")


if __name__ == "__main__":
    main()
