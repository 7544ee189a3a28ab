"""SmolVLA / pi0 checkpoints as the VLA of the training algorithms (``vlm_path`` of a LeRobot
checkpoint): the checkpoint's flow-matching expert is the action head, trained by BC.

The checkpoints are the tiny published-layout ones of ``test_smolvla`` / ``test_pi0``, written
with one 32x32 camera and LangReach's 4-dim state.
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import vla_ray.envs  # noqa: F401
from vla_ray.config import ConfigError

LANGREACH = "vla_ray/LangReach-v0"
ONE_CAMERA = {"observation.images.top": (3, 32, 32)}
STATE4 = dict(STATE_DIM=4, STATE_MEAN=[0.0, 0.0, 0.1, -0.1], STATE_STD=[1.0, 1.0, 0.5, 0.5])


def _write(module, root, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(module, "CAMERAS", ONE_CAMERA)
        for k, v in STATE4.items():
            m.setattr(module, k, v)
        return module.write_checkpoint(root)


@pytest.fixture(scope="module")
def smolvla_ckpt(tmp_path_factory):
    import test_smolvla

    mp = pytest.MonkeyPatch()
    ckpt, _ = _write(test_smolvla, tmp_path_factory.mktemp("smolvla1"), mp)
    return ckpt, ckpt.parent / "vlm"


@pytest.fixture(scope="module")
def pi0_ckpt(tmp_path_factory):
    import test_pi0

    mp = pytest.MonkeyPatch()
    ckpt, tok, _ = _write(test_pi0, tmp_path_factory.mktemp("pi01"), mp)
    return ckpt, tok


def _env(tok):
    return gym.make(LANGREACH, image_size=32, tokenizer=str(tok), instruction_max_length=8)


def _module(ckpt, tok, **model):
    from vla_ray.rl_module import VLAModule

    env = _env(tok)
    try:
        return VLAModule(
            observation_space=env.observation_space,
            action_space=env.action_space,
            model_config={
                "vlm_path": str(ckpt),
                "tokenizer_path": str(tok),
                "head": "flow_matching",
                "value": "none",
                **model,
            },
        ), env
    finally:
        env.close()


def _batch(env, n=4):
    obs = [env.reset(seed=s)[0] for s in range(n)]
    return {k: torch.as_tensor(np.stack([o[k] for o in obs])) for k in obs[0]}


@pytest.mark.parametrize("kind", ["smolvla", "pi0"])
def test_checkpoint_expert_is_the_head_and_bc_updates_it(
    kind, smolvla_ckpt, pi0_ckpt, monkeypatch, tmp_path
):
    from ray.rllib.core.columns import Columns

    if kind == "pi0":  # config.json names gemma_2b / gemma_300m; the tiny sizes come from here
        import test_pi0

        from vla_ray.models import pi0

        monkeypatch.setattr(pi0.Pi0Sizes, "from_config", classmethod(lambda c, cfg: test_pi0.TINY))
    ckpt, tok = smolvla_ckpt if kind == "smolvla" else pi0_ckpt
    module, env = _module(ckpt, tok)
    vla = module.vla
    assert vla.config.backbone == kind and type(vla.head).__name__ == "LeRobotFlowHead"
    env = _env(tok)
    batch = _batch(env)
    env.close()
    out = module.forward_inference({Columns.OBS: batch})
    actions = out[Columns.ACTIONS]
    assert actions.shape == (4, 2) and bool(((actions >= -1) & (actions <= 1)).all())
    again = module.forward_inference({Columns.OBS: batch})[Columns.ACTIONS]
    torch.testing.assert_close(actions, again)  # deterministic: zero noise
    # BC as VLABCLearner computes it: head.loss(features, single-step labels)
    target = torch.as_tensor(
        np.random.default_rng(0).uniform(-1, 1, (4, 1, 2)), dtype=torch.float32
    )
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if "expert" in n}
    losses = []
    for _ in range(3):
        opt.zero_grad()
        features = module.forward_train({Columns.OBS: batch})[Columns.EMBEDDINGS]
        loss = vla.head.loss(features, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    moved = [
        n for n, p in module.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert moved  # the checkpoint's expert trained
    # save_pretrained / from_pretrained keep the trained weights (the architecture from vlm_path)
    from vla_ray.models.vla import VLA

    vla.save_pretrained(tmp_path / "vla")
    again = VLA.from_pretrained(tmp_path / "vla")
    with torch.no_grad():
        torch.testing.assert_close(again.predict(batch), vla.predict(batch))


def test_bad_configs_are_refused(smolvla_ckpt, tmp_path):
    from vla_ray.train import build_algorithm_config, resolve

    ckpt, tok = smolvla_ckpt
    from vla_ray.config import VLAConfig

    # the checkpoint's expert is the head: from vlm_path the head is set to it; given
    # directly, another head is refused
    assert _module(ckpt, tok, head="gaussian")[0].vla.config.head == "flow_matching"
    with pytest.raises(ConfigError, match=r"head: backbone='smolvla'.*'flow_matching'.*'gaussian'"):
        VLAConfig(backbone="smolvla", vlm_path=str(ckpt), head="gaussian")
    with pytest.raises(ConfigError, match=r"vlm_path: backbone='pi0' needs a LeRobot pi0"):
        VLAConfig(backbone="pi0", vlm_path=str(ckpt), head="flow_matching")
    env = gym.make(LANGREACH, image_size=24, tokenizer=str(tok), instruction_max_length=8)
    from vla_ray.rl_module import VLAModule

    with pytest.raises(
        ConfigError, match=r"image_size: the smolvla checkpoint takes \(32, 32\).*\(24, 24\)"
    ):
        VLAModule(
            observation_space=env.observation_space,
            action_space=env.action_space,
            model_config={
                "vlm_path": str(ckpt),
                "tokenizer_path": str(tok),
                "head": "flow_matching",
                "value": "none",
            },
        )
    env.close()
    model = {"vlm_path": str(ckpt), "tokenizer_path": str(tok), "head": "flow_matching"}
    spec = resolve("langreach-ppo", {"model": model, "env_config": {"image_size": 32}})
    with pytest.raises(
        ConfigError, match=r"algorithm: 'ppo' cannot train a smolvla checkpoint.*bc, dagger"
    ):
        build_algorithm_config(spec)


@pytest.mark.slow
def test_bc_trains_a_smolvla_checkpoint_from_demos(ray_session, smolvla_ckpt, tmp_path):
    from vla_ray.data import collect
    from vla_ray.train import resolve, train

    ckpt, tok = smolvla_ckpt
    env_config = {"image_size": 32, "tokenizer": str(tok), "instruction_max_length": 8}
    data = tmp_path / "demos"
    collect(LANGREACH, "expert", 3, data, seed=0, env_config=env_config, progress=False)
    spec = resolve(
        "langreach-bc",
        {
            "model": {"vlm_path": str(ckpt), "tokenizer_path": str(tok), "head": "flow_matching"},
            "env_config": env_config,
            "training": {"train_batch_size_per_learner": 8},
            "eval_every": 2,
            "eval_episodes": 1,
        },
        data=str(data),
    )
    summary = train(spec, tmp_path / "run", stop_iters=2, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["learner"]["total_loss"]) for r in rows)
    assert rows[1]["success_rate"] is not None and summary["iteration"] == 2
