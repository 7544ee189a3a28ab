"""Diagnosis for the world model's decoder collapse on LangReach (issue 27): where do the
targets get lost? On one fixed offline dataset (behaviour episodes of ``world_model.collect``:
``--train-episodes`` layouts to train on and fit the probes, ``--episodes`` held out), each
experiment reports the held-out R^2 of ridge probes (named target, all targets, agent) and,
where it trains a decoder, the held-out error on target (foreground) pixels next to the mean
frame's:

- ``raw``: ridge probes on the pixels themselves (and on an 8x8 average-pooled image);
- ``ae``: the ``langreach-dreamer`` VLA trunk -> the world model's image decoder, a plain
  autoencoder (no RSSM), ``--updates`` minibatches of 256 frames;
- ``cnnae``: the same with DreamerV3's CNN encoder (``world_model.model.ImageEncoder``) in place of
  the trunk;
- ``wm``: the world model (``--set model.KEY=VALUE`` overrides of the preset's model) trained as
  the ``probe`` stage of ``bench/world_model.py`` trains it (B x T windows of the preset, its
  learning rate), probes on its posterior features ``[h, z]``.

    python bench/world_model_encoders.py ae --updates 400 --out OUT
    python bench/world_model_encoders.py wm --updates 400 --out OUT \\
        --set model.world_model.image_encoder=trunk+cnn --set model.world_model.image_fg_weight=10

Each run appends one JSON line to ``OUT/encoders.jsonl``; the dataset is cached in ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from world_model import (  # noqa: E402
    _episode_batch,
    _ridge_r2,
    collect,
    model_with_settings,
    offline_update,
)


def dataset(out: Path, size: int, train: int, test: int, seed: int) -> dict[str, list]:
    """The cached behaviour episodes (collected once per size, counts and seed)."""
    path = out / f"data{size}_{train}_{test}_seed{seed}.pkl"
    if not path.is_file():
        data = {"train": collect(train, seed, size), "test": collect(test, 1000 + seed, size)}
        path.write_bytes(pickle.dumps(data))
    return pickle.loads(path.read_bytes())


def frames(eps: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """All frames of ``eps`` as one batch, and the probe targets per frame."""
    obs = {k: torch.as_tensor(np.concatenate([e["obs"][k] for e in eps])) for k in eps[0]["obs"]}

    def per_frame(key: str) -> torch.Tensor:
        rows = [np.repeat(e[key][None], len(e["actions"]) + 1, 0) for e in eps]
        return torch.as_tensor(np.concatenate(rows)).float()

    ys = dict(goal=per_frame("goal"), targets=per_frame("targets"), agent=obs["state"][:, :2])
    return obs, ys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp", choices=("raw", "ae", "cnnae", "wm"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--updates", type=int, default=400)
    parser.add_argument("--train-episodes", type=int, default=400)
    parser.add_argument("--episodes", type=int, default=100, help="held-out episodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4, help="ae, cnnae, wm: Adam's rate")
    parser.add_argument("--fg", type=float, default=1.0, help="ae, cnnae: foreground weight")
    parser.add_argument(
        "--probe-at", nargs="*", type=int, default=[], help="wm: also probe after these updates"
    )
    parser.add_argument("--B", type=int, help="wm: windows per update (default: the preset's)")
    parser.add_argument("--T", type=int, help="wm: steps per window (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    data = dataset(args.out, args.size, args.train_episodes, args.episodes, args.seed)
    otr, ytr = frames(data["train"])
    ote, yte = frames(data["test"])

    from vla_ray.world_model.losses import weighted_image_error
    from vla_ray.world_model.model import ImageDecoder, ImageEncoder, image_target

    def r2(ftr: torch.Tensor, fte: torch.Tensor, alpha: float = 10.0) -> dict[str, float]:
        return {
            k: round(_ridge_r2(ftr.float(), ytr[k], fte.float(), yte[k], alpha), 3) for k in ytr
        }

    mean_frame = image_target(otr["image"]).mean(0)
    background = image_target(otr["image"]).median(0).values

    def pixels(pred: torch.Tensor, obs: dict[str, torch.Tensor]) -> dict[str, float]:
        target = image_target(obs["image"])
        err = weighted_image_error(pred, target, background=background)
        base = weighted_image_error(mean_frame.expand_as(target), target, background=background)
        return dict(
            fg_mse=round(float(err["fg_mse"].mean()), 4),
            bg_mse=round(float(err["bg_mse"].mean()), 5),
            mean_frame_fg_mse=round(float(base["fg_mse"].mean()), 4),
        )

    out: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    t0 = time.time()
    if args.exp == "raw":
        flat = lambda o: image_target(o["image"]).flatten(1)  # noqa: E731
        pool = lambda o: nn.functional.avg_pool2d(  # noqa: E731
            image_target(o["image"]).permute(0, 3, 1, 2), args.size // 8
        ).flatten(1)
        for alpha in (1.0, 10.0, 100.0):
            out[f"r2_pixels_alpha{alpha:g}"] = r2(flat(otr), flat(ote), alpha)
        out["r2_pooled_8x8"] = r2(pool(otr), pool(ote), 1.0)
    else:
        import gymnasium as gym

        import vla_ray.envs  # noqa: F401
        from vla_ray.presets import PRESETS
        from vla_ray.world_model.replay import SequenceReplay
        from vla_ray.world_model.rl_module import WorldModelModule

        preset = PRESETS["langreach-dreamer"]
        env = gym.make(preset.env, **{**preset.env_config, "image_size": args.size})
        model = model_with_settings(preset.model, args.set)
        module = WorldModelModule(
            observation_space=env.observation_space,
            action_space=env.action_space,
            model_config=model,
        )
        env.close()
        wm = module.world_model
        if args.exp == "cnnae":
            cnn = ImageEncoder((args.size, args.size))
            encoder, dim = (lambda o: cnn(o["image"])), cnn.out_dim
            params = list(cnn.parameters())
        else:
            encoder, dim = wm.trunk, wm.trunk.feature_dim
            params = list(wm.trunk.parameters())

        def embed(obs: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                n = len(obs["image"])
                return torch.cat(
                    [encoder({k: v[i : i + 512] for k, v in obs.items()}) for i in range(0, n, 512)]
                )

        out["r2_encoder_init"] = r2(embed(otr), embed(ote))
        rng = np.random.default_rng(args.seed)
        log = []
        if args.exp in ("ae", "cnnae"):
            decoder = ImageDecoder(dim, (args.size, args.size))
            params += list(decoder.parameters())
            opt = torch.optim.Adam(params, lr=args.lr)
            n = len(otr["image"])
            for i in range(args.updates):
                idx = torch.as_tensor(rng.choice(n, 256))
                obs = {k: v[idx] for k, v in otr.items()}
                err = weighted_image_error(
                    decoder(encoder(obs)), image_target(obs["image"]), args.fg, background
                )
                loss = err["loss"].mean()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 100.0)
                opt.step()
                if (i + 1) % 100 == 0:
                    log.append(dict(update=i + 1, s=round(time.time() - t0), loss=loss.item()))
                    print(log[-1], flush=True)
            out["r2_encoder_trained"] = r2(embed(otr), embed(ote))
            with torch.no_grad():
                out["heldout_pixels"] = pixels(decoder(embed(ote)), ote)
        else:

            def latent(eps: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
                feats, preds = [], []
                for ep in eps:  # one at a time: episodes have different lengths
                    f = wm.filter(_episode_batch([ep])).features()[0]
                    feats.append(f)
                    with torch.no_grad():
                        preds.append(wm.decoders["image"](f))
                return torch.cat(feats), torch.cat(preds)

            def latent_probe() -> dict[str, Any]:
                ftr, _ = latent(data["train"])
                fte, pte = latent(data["test"])
                return dict(
                    r2_encoder_trained=r2(embed(otr), embed(ote)),
                    r2_latent=r2(ftr, fte),
                    heldout_pixels=pixels(pte, ote),
                )

            replay = SequenceReplay()
            for ep in data["train"]:
                replay.add(ep["obs"], ep["actions"], ep["rewards"], ep["terminated"])
            opt = torch.optim.Adam(wm.parameters(), lr=args.lr, eps=1e-8)
            B = args.B or preset.training["batch_size_B"]
            T = args.T or preset.training["batch_length_T"]
            for i in range(args.updates):
                metrics = offline_update(wm, opt, replay, B, T, rng)
                if (i + 1) % 100 == 0:
                    row = {"update": i + 1, "s": round(time.time() - t0)}
                    row.update({k: round(v, 4) for k, v in metrics.items()})
                    log.append(row)
                    print(row, flush=True)
                if i + 1 in args.probe_at and i + 1 < args.updates:
                    wm.eval()
                    row = {"update": i + 1, **latent_probe()}
                    wm.train()
                    out.setdefault("probes", []).append(row)
                    print(json.dumps(row), flush=True)

            out.update(latent_probe())
        out["log"] = log
    out["s"] = round(time.time() - t0, 1)
    print(json.dumps({k: v for k, v in out.items() if k != "log"}), flush=True)
    with open(args.out / "encoders.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
