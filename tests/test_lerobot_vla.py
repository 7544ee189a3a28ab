"""SmolVLA / pi0 checkpoints as the VLA of the training algorithms (``vlm_path`` of a LeRobot
checkpoint): the checkpoint's flow-matching expert is the action head, trained by BC, by PPO
and GRPO as the mean of a Gaussian with a learned log-std, and by SAC as the mean of a
tanh-squashed one with twin Q MLPs on the VLM's pooled prefix states.

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


def _tiny_pi0(kind, monkeypatch):
    """pi0's config.json names gemma_2b / gemma_300m; the tiny sizes come from here (in this
    process: the RLlib runs below keep their EnvRunner and learner local)."""
    if kind == "pi0":
        import test_pi0

        from vla_ray.models import pi0

        monkeypatch.setattr(pi0.Pi0Sizes, "from_config", classmethod(lambda c, cfg: test_pi0.TINY))


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

    _tiny_pi0(kind, monkeypatch)
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

    # the checkpoint's expert is the head: from vlm_path another head becomes the expert, and
    # "gaussian" the Gaussian around it; given directly, another head is refused
    assert _module(ckpt, tok, head="mlp")[0].vla.config.head == "flow_matching"
    with pytest.raises(ConfigError, match=r"head: backbone='smolvla'.*'flow_matching'.*'mlp'"):
        VLAConfig(backbone="smolvla", vlm_path=str(ckpt), head="mlp")
    with pytest.raises(ConfigError, match=r"head_config: \['hidden'\].*\['init_log_std'\]"):
        VLAConfig(
            backbone="smolvla", vlm_path=str(ckpt), head="gaussian", head_config={"hidden": 8}
        )
    with pytest.raises(ConfigError, match=r"value: 'separate' would load a second copy"):
        _module(ckpt, tok, head="gaussian", value="separate")
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
    with pytest.raises(ConfigError, match=r"model.head: ppo needs.*head='gaussian'.*'flow_m"):
        build_algorithm_config(spec)
    model["head"] = "gaussian"
    spec = resolve("langreach-sac", {"model": model, "env_config": {"image_size": 32}})
    with pytest.raises(ConfigError, match=r"model.head: sac needs.*'tanh_gaussian'.*'gaussian'"):
        build_algorithm_config(spec)
    from vla_ray.models.lerobot_vla import check_algorithm

    with pytest.raises(
        ConfigError,
        match=r"algorithm: 'iql' cannot train.*supported algorithms: bc, dagger, ppo, grpo, sac",
    ):
        check_algorithm("iql", model)
    from vla_ray.sac_module import VLAIQLModule

    env = _env(tok)
    with pytest.raises(ConfigError, match=r"vlm_path: VLAIQLModule would give every critic"):
        VLAIQLModule(
            observation_space=env.observation_space,
            action_space=env.action_space,
            model_config={**model, "head": "tanh_gaussian", "twin_q": True},
        )
    env.close()


def test_gaussian_head_freeze_switches_and_save_load(pi0_ckpt, monkeypatch, tmp_path):
    """pi0's tiny checkpoint trains everything; freeze_projector / freeze_llm freeze those
    parts; the expert, the log-std and the value head still train. save_pretrained /
    from_pretrained keep the Gaussian head and its log-std."""
    from ray.rllib.core.columns import Columns

    from vla_ray.models.vla import VLA

    _tiny_pi0("pi0", monkeypatch)
    module, _ = _module(
        *pi0_ckpt, head="gaussian", value="shared", freeze_projector=True, freeze_llm=True
    )
    trunk = module.vla.trunk
    assert not any(p.requires_grad for p in trunk.projector.parameters())
    assert not any(p.requires_grad for p in trunk.language_model.parameters())
    assert all(p.requires_grad for p in trunk.vision.parameters())  # not frozen here
    expert = trunk.policy.model.paligemma_with_expert.gemma_expert
    assert all(p.requires_grad for p in expert.parameters())
    assert module.vla.head.log_std.requires_grad
    assert all(p.requires_grad for p in module.vf.parameters())
    with torch.no_grad():
        module.vla.head.log_std.copy_(torch.tensor([-0.3, -1.2]))
    module.vla.save_pretrained(tmp_path / "vla")
    again = VLA.from_pretrained(tmp_path / "vla")
    assert again.config.head == "gaussian" and type(again.head).__name__ == "LeRobotGaussianHead"
    env = _env(pi0_ckpt[1])
    batch = _batch(env)
    env.close()
    with torch.no_grad():
        want = module.forward_inference({Columns.OBS: batch})[Columns.ACTION_DIST_INPUTS]
        torch.testing.assert_close(again.head.dist_inputs(again.features(batch)), want)
    assert want[0, 2:].tolist() == pytest.approx([-0.3, -1.2])


def _logp_gap(learner, module_id, batch, fwd_out) -> float:
    """max |learner logp - EnvRunner logp| of the batch's sampled actions (loss-masked rows)."""
    from ray.rllib.core.columns import Columns

    module = learner.module[module_id].unwrapped()
    dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
    gap = (dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP]).abs().detach()
    mask = batch.get(Columns.LOSS_MASK)
    return float((gap[mask.bool()] if mask is not None else gap).max())


def _recording(learner_cls):
    """``learner_cls`` that records ``_logp_gap`` of every minibatch in ``logp_gaps``."""

    class Recording(learner_cls):
        def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
            self.__dict__.setdefault("logp_gaps", []).append(
                _logp_gap(self, module_id, batch, fwd_out)
            )
            return super().compute_loss_for_module(
                module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
            )

    return Recording


def _run(preset, overrides, learner_cls, iterations):
    """Build ``preset`` locally (EnvRunner and learner in this process), record the learner's
    logp gaps (``learner_cls`` given; else the algorithm's own learner), train ``iterations``;
    -> (learner, its module, the module's state before, results)."""
    from vla_ray.train import build_algorithm_config, resolve

    spec = resolve(preset, overrides, local=True)
    config = build_algorithm_config(spec)
    if learner_cls is not None:
        config = config.learners(learner_class=_recording(learner_cls))
    algo = config.build_algo()
    try:
        learner = algo.learner_group._learner
        module = learner.module["default_policy"].unwrapped()
        before = {k: v.detach().clone() for k, v in module.state_dict().items()}
        results = [algo.train() for _ in range(iterations)]
        return learner, module, before, results
    finally:
        algo.stop()


def _moved(module, before):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("kind", ["smolvla", "pi0"])
def test_ppo_and_grpo_train_the_expert_as_a_gaussian_mean(
    kind, ray_session, smolvla_ckpt, pi0_ckpt, monkeypatch
):
    """PPO (2 iterations, chunks of 2) and GRPO (1 iteration) through RLlib with head='gaussian':
    the learner's log-probs of the sampled actions equal the EnvRunner's at the first update;
    the log-std, the expert and the value head move, the frozen vision tower does not; the mean
    is the expert's zero-noise chunk and the value reads the VLM's prefix in the same pass."""
    from ray.rllib.core.columns import Columns

    from vla_ray.algorithms.grpo import GRPOTorchLearner
    from vla_ray.algorithms.ppo import VLAPPOLearner

    _tiny_pi0(kind, monkeypatch)
    ckpt, tok = smolvla_ckpt if kind == "smolvla" else pi0_ckpt
    env_config = {
        "image_size": 32,
        "tokenizer": str(tok),
        "instruction_max_length": 8,
        "max_episode_steps": 4,
    }
    model = {
        "vlm_path": str(ckpt),
        "tokenizer_path": str(tok),
        "head_config": {"init_log_std": -0.7},
        "freeze_vision": True,
        "vf_hidden": 16,
    }
    ppo = {
        "model": {**model, "chunk_size": 2},
        "env_config": env_config,
        "training": {"train_batch_size_per_learner": 8, "minibatch_size": 8, "num_epochs": 1},
    }
    learner, module, before, results = _run("langreach-ppo", ppo, VLAPPOLearner, 2)
    head, trunk = module.vla.head, module.vla.trunk
    assert type(head).__name__ == "LeRobotGaussianHead" and head.out_dim == 4  # 2 steps x 2
    assert module.vf[0].in_features == trunk.width  # the value reads the VLM's width
    assert learner.logp_gaps[0] < 1e-4  # sampling and training forwards agree: ratio 1
    assert results[-1]["training_iteration"] == 2
    moved = _moved(module, before)
    assert "vla.head.log_std" in moved and any(k.startswith("vf.") for k in moved)
    assert any("expert" in k for k in moved)  # the policy gradient reached the expert
    vision = [f"vla.trunk.{k}" for k in trunk.state_dict() if k.startswith(_vision_prefix(kind))]
    assert vision and not moved & set(vision)  # freeze_vision: bit-identical
    assert not any(p.requires_grad for p in trunk.vision.parameters())
    # the distribution's mean is the expert's zero-noise chunk (in the env's [-1, 1] bounds);
    # one VLM pass gives it and the value, equal to the value of a fresh pass
    env = _env(tok)
    batch = {Columns.OBS: _batch(env)}
    env.close()
    calls = _count_prefix_passes(kind, trunk, monkeypatch)
    out = module.forward_train(batch)
    values = module.compute_values(batch, embeddings=out[Columns.EMBEDDINGS])
    assert len(calls) == 1 and values.shape == (4,)
    torch.testing.assert_close(values, module.compute_values(batch))
    mean, log_std = out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(
            mean.clamp(-1, 1), module.vla.predict(batch[Columns.OBS]).flatten(1)
        )
    torch.testing.assert_close(log_std, module.vla.head.log_std.expand_as(log_std))

    grpo = {
        "model": model,
        "env_config": env_config,
        "training": {"group_size": 2, "groups_per_iteration": 1, "num_epochs": 1},
    }
    learner, module, before, _ = _run("langreach-grpo", grpo, GRPOTorchLearner, 1)
    assert learner.logp_gaps[0] < 1e-4
    moved = _moved(module, before)
    assert "vla.head.log_std" in moved and any("expert" in k for k in moved)
    assert not moved & {k for k in before if k.startswith("vla.trunk." + _vision_prefix(kind))}


def _vision_prefix(kind: str) -> str:
    if kind == "smolvla":
        return "policy.model.vlm_with_expert.vlm.model.vision_model."
    return "policy.model.paligemma_with_expert.paligemma.model.vision_tower."


def _count_prefix_passes(kind, trunk, monkeypatch) -> list[int]:
    """A list that grows by one at every VLM pass over the prefix."""
    m = trunk.policy.model
    vlm = m.vlm_with_expert if kind == "smolvla" else m.paligemma_with_expert
    calls: list[int] = []
    original = vlm.prefix_kv

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(vlm, "prefix_kv", counted)
    return calls


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


@pytest.mark.parametrize("kind", ["smolvla", "pi0"])
def test_sac_trains_the_expert_as_a_squashed_gaussian_mean_with_mlp_critics(
    kind, ray_session, smolvla_ckpt, pi0_ckpt, monkeypatch
):
    """SAC (2 iterations after an 8-step warm-up) through RLlib with head='tanh_gaussian': the
    twin Q MLPs read the actor's pooled VLM prefix states (detached) and the action, so the
    module holds the checkpoint once; the critics, the log-std and the expert move, the frozen
    vision tower does not; the Polyak targets are separate networks that lag the online ones.
    One training forward runs the VLM once per observation batch (obs, next obs); the critic
    loss reaches no VLA parameter, the actor's Q term reaches the expert through the Euler
    steps and not the critics."""
    from ray.rllib.algorithms.sac.sac_learner import QF_PREDS, QF_TWIN_PREDS
    from ray.rllib.core.columns import Columns

    _tiny_pi0(kind, monkeypatch)
    ckpt, tok = smolvla_ckpt if kind == "smolvla" else pi0_ckpt
    sac = {
        "model": {
            "vlm_path": str(ckpt),
            "tokenizer_path": str(tok),
            "freeze_vision": True,
            "q_hidden": 16,
        },
        "env_config": {
            "image_size": 32,
            "tokenizer": str(tok),
            "instruction_max_length": 8,
            "max_episode_steps": 4,
        },
        "training": {
            "train_batch_size_per_learner": 4,
            "num_steps_sampled_before_learning_starts": 8,
            "replay_buffer_config": {"type": "EpisodeReplayBuffer", "capacity": 100},
        },
        "env_runners": {"rollout_fragment_length": 8},
    }
    _, module, before, results = _run("langreach-sac", sac, None, 2)
    head, trunk = module.vla.head, module.vla.trunk
    assert type(head).__name__ == "LeRobotTanhGaussianHead"
    # the checkpoint once (under vla.); the critics and their targets are MLPs on the VLM width
    assert {k.split(".")[0] for k in before} == {
        "vla",
        "qf",
        "qf_twin",
        "target_qf",
        "target_qf_twin",
    }
    assert not list(module.qf_encoder.parameters()) and not list(
        module.target_qf_encoder.parameters()
    )
    assert module.qf[0].in_features == trunk.width + 2
    stats = results[-1]["learners"]["default_policy"]
    assert np.isfinite(stats["qf_loss"]) and np.isfinite(stats["policy_loss"])
    moved = _moved(module, before)
    assert any(k.startswith("qf.") for k in moved) and any(k.startswith("qf_twin.") for k in moved)
    assert "vla.head.log_std" in moved and any("expert" in k for k in moved)
    vision = [f"vla.trunk.{k}" for k in trunk.state_dict() if k.startswith(_vision_prefix(kind))]
    assert vision and not moved & set(vision)  # freeze_vision: bit-identical
    # Polyak targets: own tensors, moved towards the online critics but lagging them
    for online, target in ((module.qf, module.target_qf), (module.qf_twin, module.target_qf_twin)):
        assert target is not online and not target[0].weight.requires_grad
        assert target[0].weight.data_ptr() != online[0].weight.data_ptr()
        assert not torch.equal(target[0].weight, online[0].weight)
    assert any(k.startswith("target_qf.") for k in moved)
    # one VLM pass per observation batch; what each loss term reaches
    env = _env(tok)
    obs, next_obs = _batch(env), _batch(env)
    env.close()
    actions = torch.zeros(4, 2)
    batch = {Columns.OBS: obs, Columns.NEXT_OBS: next_obs, Columns.ACTIONS: actions}
    calls = _count_prefix_passes(kind, trunk, monkeypatch)
    out = module.forward_train(batch)
    assert len(calls) == 2
    vla_params = [p for p in module.vla.parameters() if p.requires_grad]
    critic = list(module.qf.parameters()) + list(module.qf_twin.parameters())
    grads = torch.autograd.grad(
        (out[QF_PREDS] + out[QF_TWIN_PREDS]).sum(), vla_params + critic, allow_unused=True
    )
    assert all(g is None for g in grads[: len(vla_params)])  # the critics do not train the VLM
    assert all(g is not None for g in grads[len(vla_params) :])
    expert = [p for n, p in module.vla.named_parameters() if "expert" in n and p.requires_grad]
    grads = torch.autograd.grad(out["q_curr"].sum(), expert + critic, allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads[: len(expert)])
    assert all(g is None for g in grads[len(expert) :])  # the actor's term trains no critic
    # the squashed Gaussian's mean is the expert's zero-noise action
    loc = out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)[0]
    with torch.no_grad():
        want = module.vla.predict(obs).flatten(1)
    torch.testing.assert_close(torch.tanh(loc).detach(), want, atol=1e-3, rtol=0)


def test_export_refuses_a_lerobot_policy_by_name(smolvla_ckpt, tmp_path):
    from vla_ray.export import ExportError, export

    module, _ = _module(*smolvla_ckpt)
    module.vla.save_pretrained(tmp_path / "vla")
    with pytest.raises(ExportError, match=r"onnx cannot hold a backbone='smolvla' policy"):
        export(tmp_path / "vla", "onnx", tmp_path / "out", progress=None)
    assert not (tmp_path / "out").exists()
