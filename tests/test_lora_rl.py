"""LoRA RL: PPO and GRPO update only the adapters and the fully trained parts; GRPO's reference
is the same module with adapters off; bf16 autocast; gradient checkpointing with LoRA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from vla_ray.config import ConfigError
from vla_ray.models.lora import adapters_disabled, fold_adapters, has_lora, is_adapter_param
from vla_ray.models.vla import VLA
from vla_ray.rl_module import VLAModule
from vla_ray.train import _export_vla, build_algorithm_config, resolve

LORA = {"lora": {"r": 4}, "freeze_vision": True}
ENV = {"max_episode_steps": 8, "image_size": 32}
PPO_SMALL = {
    "model": LORA,
    "env_config": ENV,
    "training": {"train_batch_size_per_learner": 64, "minibatch_size": 32, "num_epochs": 1},
    "env_runners": {"num_envs_per_env_runner": 2},
}
GRPO_SMALL = {
    "model": LORA,
    "env_config": ENV,
    "training": {"group_size": 2, "groups_per_iteration": 2, "num_epochs": 1, "minibatch_size": 64},
    "env_runners": {"num_envs_per_env_runner": 2},
}


def _learner(algo):
    return algo.learner_group._learner


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _obs_batch(n: int = 4) -> dict:
    import gymnasium as gym

    env = gym.make("vla_ray/LangReach-v0", **ENV)
    obs = [env.reset(seed=s)[0] for s in range(n)]
    env.close()
    return {Columns.OBS: {k: torch.as_tensor(np.stack([o[k] for o in obs])) for k in obs[0]}}


def _check_only_trainable_moved(module, before: dict[str, torch.Tensor]) -> None:
    """Every frozen tensor bit-identical; the adapters and the head moved; the optimizer holds
    exactly the trainable parameters."""
    after = module.state_dict()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the update changed nothing"
    assert changed <= trainable, sorted(changed - trainable)[:5]
    lm_base = [k for k in before if ".lm." in k and not is_adapter_param(k)]
    assert lm_base and not changed & set(lm_base)
    assert any(".lm." in k and "lora_B" in k for k in changed)  # adapters on the LM moved
    assert any(k.startswith("vla.head.") for k in changed)
    assert not any(k.startswith("vla.trunk.vision.") for k in changed)  # freeze_vision


def _check_optimizer_holds_trainable_only(learner, module) -> None:
    in_opt = {
        id(p)
        for opt in learner._named_optimizers.values()
        for g in opt.param_groups
        for p in g["params"]
    }
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert in_opt == trainable


def test_lora_ppo_updates_only_adapters_and_trained_parts(ray_session, tmp_path):
    """PPO with LoRA + gradient checkpointing: one update changes adapters, head, value head
    and the unfrozen small parts; every base LM weight and the frozen vision encoder are
    bit-identical; EnvRunners get the adapters; the ``vla/`` export reloads them."""
    spec = resolve(
        "langreach-ppo",
        {**PPO_SMALL, "model": {**LORA, "gradient_checkpointing": True}},
        num_env_runners=0,
    )
    algo = build_algorithm_config(spec).build_algo()
    try:
        learner = _learner(algo)
        module = learner.module["default_policy"].unwrapped()
        assert has_lora(module) and module.vla.trunk._checkpointing
        _check_optimizer_holds_trainable_only(learner, module)
        before = _state(module)
        algo.train()
        _check_only_trainable_moved(module, before)
        assert any(
            k.startswith("vf.") and not torch.equal(before[k], v)
            for k, v in module.state_dict().items()
        )
        # weight sync: the EnvRunner's (inference-only) module has the learner's adapters
        runner = algo.env_runner_group.local_env_runner.module
        learned = module.state_dict()
        for k, v in runner.state_dict().items():
            assert torch.equal(v, learned[k]), k
        # the checkpoint's vla/ export: unmerged adapter weights, LoRA in its config
        _export_vla(algo, tmp_path / "vla")
        vla = VLA.from_pretrained(tmp_path / "vla")
        assert vla.config.lora == LORA["lora"]
        obs = _obs_batch()[Columns.OBS]
        with torch.no_grad():
            expected = runner.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        torch.testing.assert_close(vla.predict(obs).flatten(1), expected[:, :2], rtol=0, atol=0)
    finally:
        algo.stop()


def test_lora_grpo_reference_is_the_adapters_off_start_without_a_second_copy(ray_session, tmp_path):
    """The langreach-lora-grpo preset from a full (no-LoRA) saved policy, as from a BC run."""
    import gymnasium as gym

    from vla_ray.presets import get_preset

    env = gym.make("vla_ray/LangReach-v0", **ENV)
    torch.manual_seed(1)
    full = VLAModule(
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=get_preset("langreach-grpo").model,
    ).vla
    env.close()
    full.save_pretrained(tmp_path / "bc")
    # the CNN frozen too: its weights must stay bit-identical through the update below
    model = {"pretrained_path": str(tmp_path / "bc"), "freeze_vision": True}
    spec = resolve("langreach-lora-grpo", {**GRPO_SMALL, "model": model}, num_env_runners=0)
    algo = build_algorithm_config(spec).build_algo()
    try:
        learner = _learner(algo)
        module = learner.module["default_policy"].unwrapped()
        _check_optimizer_holds_trainable_only(learner, module)
        # no second copy: no reference module, and the kept tensors are exactly the trainable
        # non-adapter ones (no LM weight among them)
        with pytest.raises(KeyError):
            learner.reference_module("default_policy")
        parts = learner._reference_parts["default_policy"]
        assert set(parts) == {
            n for n, p in module.named_parameters() if p.requires_grad and not is_adapter_param(n)
        }
        assert not any(".lm." in n for n in parts)
        lm_numel = sum(p.numel() for p in module.vla.trunk.lm.parameters())
        assert (
            sum(t.numel() for t in parts.values())
            < sum(p.numel() for p in module.parameters()) - lm_numel
        )

        start = copy.deepcopy(module)
        before = _state(module)
        algo.train()
        _check_only_trainable_moved(module, before)

        batch = _obs_batch()
        with torch.no_grad():
            # the policy's forward first: its memoised instruction prefixes (adapters on) must
            # not be reused by the reference
            policy = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
            ref = learner.reference_dist_inputs("default_policy", batch)
            with adapters_disabled(start):
                start_off = start.forward_train(batch)[Columns.ACTION_DIST_INPUTS]
            start_on = start.forward_train(batch)[Columns.ACTION_DIST_INPUTS]
            again = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        torch.testing.assert_close(ref, start_off, rtol=0, atol=0)
        torch.testing.assert_close(ref, start_on, rtol=0, atol=1e-6)  # fresh adapters: zero update
        with torch.no_grad():  # ... so the reference is the saved full policy
            saved = full.head.dist_inputs(full.features(batch[Columns.OBS]))
        torch.testing.assert_close(ref, saved, rtol=0, atol=1e-6)
        assert module.vla.config.lora == {"r": 8} and module.vla.config.freeze_vision
        assert not torch.allclose(policy, ref, atol=1e-6)  # the policy moved away from it
        torch.testing.assert_close(again, policy, rtol=0, atol=0)  # adapters back on
        # the adapters train again after the reference pass
        assert all(p.requires_grad for n, p in module.named_parameters() if is_adapter_param(n))
        # the reference's kept tensors are part of the learner's checkpoint state
        state = learner.get_state()
        for t in parts.values():
            t.zero_()
        learner.set_state(state)
        torch.testing.assert_close(
            learner.reference_dist_inputs("default_policy", batch), ref, rtol=0, atol=0
        )
    finally:
        algo.stop()


def test_state_lora_grpo_preset_trains_adapters_from_a_state_bc_save(ray_session, tmp_path):
    """langreach-state-lora-grpo from a langreach-state-bc policy: LoRA on the LM, its base
    weights bit-identical after an update, the adapters and the head moved."""
    import gymnasium as gym

    from vla_ray.presets import get_preset

    env = gym.make("vla_ray/LangReachState-v0", max_episode_steps=8)
    bc = VLAModule(
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=get_preset("langreach-state-bc").model,
    ).vla
    env.close()
    bc.save_pretrained(tmp_path / "bc")
    small = {k: v for k, v in GRPO_SMALL.items() if k not in ("model", "env_config")}
    overrides = {
        **small,
        "env_config": {"max_episode_steps": 8},
        "model": {"pretrained_path": str(tmp_path / "bc"), "start_log_std": -1.2},
    }
    algo = build_algorithm_config(
        resolve("langreach-state-lora-grpo", overrides, num_env_runners=0)
    ).build_algo()
    try:
        learner = _learner(algo)
        module = learner.module["default_policy"].unwrapped()
        assert module.vla.config.lora == {"r": 8} and module.vla.config.vision == "none"
        _check_optimizer_holds_trainable_only(learner, module)
        before = _state(module)
        algo.train()
        after = module.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        lm_base = [k for k in before if ".lm." in k and not is_adapter_param(k)]
        assert lm_base and not changed & set(lm_base)
        assert any(".lm." in k and "lora_B" in k for k in changed)
        assert any(k.startswith("vla.head.") for k in changed)
    finally:
        algo.stop()


def _module(spaces, **mc) -> VLAModule:
    obs_space, act_space = spaces
    return VLAModule(observation_space=obs_space, action_space=act_space, model_config=mc)


SMOLVLM = {"backbone": "vlm", "vlm_family": "smolvlm"}


@pytest.mark.parametrize("trunk", [{}, SMOLVLM], ids=["default", "smolvlm"])
def test_adapters_disabled_and_folding(trunk, langreach_spaces, langreach_obs_batch):
    torch.manual_seed(0)
    module = _module(langreach_spaces, head="gaussian", **trunk, **LORA)
    batch = {Columns.OBS: {k: torch.as_tensor(v) for k, v in langreach_obs_batch.items()}}
    with torch.no_grad():
        fresh = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
        trained = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        with adapters_disabled(module):
            off = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        assert not torch.allclose(trained, fresh, atol=1e-4)
        torch.testing.assert_close(off, fresh, rtol=0, atol=0)  # the base model
        assert fold_adapters(module) == 14  # 7 projections x 2 LM layers
        folded = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        with adapters_disabled(module):
            folded_off = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(folded, trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(folded_off, trained, rtol=0, atol=1e-5)
    plain = _module(langreach_spaces, head="gaussian")
    with (
        pytest.raises(ConfigError, match="lora: the model has no LoRA adapters"),
        adapters_disabled(plain),
    ):
        pass


def test_lora_can_be_added_to_a_full_checkpoint(langreach_spaces, langreach_obs_batch, tmp_path):
    """A full (no-LoRA) saved VLA loaded with ``lora`` (e.g. GRPO with LoRA from a BC run): the
    same function, fresh zero-update adapters, base weights frozen."""
    torch.manual_seed(0)
    full = _module(langreach_spaces, head="gaussian").vla
    full.save_pretrained(tmp_path / "vla")
    module = _module(
        langreach_spaces,
        head="gaussian",
        value="none",
        pretrained_path=str(tmp_path / "vla"),
        **LORA,
    )
    assert module.vla.config.lora == LORA["lora"] and has_lora(module)
    assert not any(p.requires_grad for p in module.vla.trunk.vision.parameters())
    torch.testing.assert_close(
        module.vla.predict(langreach_obs_batch), full.predict(langreach_obs_batch), rtol=0, atol=0
    )


def test_start_log_std_replaces_only_the_loaded_log_std(langreach_spaces, tmp_path):
    """``start_log_std`` with ``pretrained_path``: the head's log-std is the given value, every
    other tensor is the checkpoint's; named errors without a start or with a bad value."""
    torch.manual_seed(0)
    full = _module(langreach_spaces, head="gaussian", head_config={"init_log_std": -0.3}).vla
    full.save_pretrained(tmp_path / "vla")
    start = {"head": "gaussian", "value": "none", "pretrained_path": str(tmp_path / "vla")}
    module = _module(langreach_spaces, **start, start_log_std=-1.5)
    assert torch.equal(module.vla.head.log_std, torch.full_like(full.head.log_std, -1.5))
    saved = full.state_dict()
    loaded = module.vla.state_dict()
    assert set(loaded) == set(saved)
    moved = sorted(k for k in saved if not torch.equal(saved[k], loaded[k]))
    assert moved == ["head.log_std"]
    with pytest.raises(ConfigError, match="start_log_std.*pretrained_path"):
        _module(langreach_spaces, head="gaussian", start_log_std=-1.0)
    with pytest.raises(ConfigError, match=r"start_log_std: expected a float in \[-5, 2\]"):
        _module(langreach_spaces, **start, start_log_std="small")


def test_bf16_autocast_runs_with_float32_outputs(langreach_spaces, langreach_obs_batch):
    torch.manual_seed(0)
    fp32 = _module(langreach_spaces, head="gaussian", value="separate")
    torch.manual_seed(0)
    bf16 = _module(langreach_spaces, head="gaussian", value="separate", autocast="bf16")
    bf16.load_state_dict(fp32.state_dict())
    batch = {Columns.OBS: {k: torch.as_tensor(v) for k, v in langreach_obs_batch.items()}}
    out = bf16.forward_train(batch)
    values = bf16.compute_values(batch)
    for t in (out[Columns.ACTION_DIST_INPUTS], out[Columns.EMBEDDINGS], values):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    ref = fp32.forward_train(batch)[Columns.ACTION_DIST_INPUTS]
    diff = (out[Columns.ACTION_DIST_INPUTS] - ref).abs().max().item()
    assert 0.0 < diff < 0.1  # bf16 matmuls ran (not bit-equal), close to float32
    values.sum().backward()  # gradients flow through the autocast trunk
    assert bf16.vf_trunk.query.grad is not None
    with torch.no_grad():
        inference = bf16.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    assert inference.dtype == torch.float32
    assert bf16.vla.predict(langreach_obs_batch).dtype == torch.float32
    with pytest.raises(ConfigError, match="autocast: unknown name 'fp16'"):
        _module(langreach_spaces, head="gaussian", autocast="fp16")
    with pytest.raises(ConfigError, match=r"lora: unknown key\(s\) \['rank'\]"):
        _module(langreach_spaces, head="gaussian", lora={"rank": 8})


def test_gradient_checkpointing_with_lora_gives_the_same_features_and_gradients(
    langreach_spaces, langreach_obs_batch
):
    torch.manual_seed(0)
    plain = _module(langreach_spaces, head="gaussian", **LORA)
    torch.manual_seed(0)
    ckpt = _module(langreach_spaces, head="gaussian", gradient_checkpointing=True, **LORA)
    ckpt.load_state_dict(plain.state_dict())
    layers = ckpt.vla.trunk.lm.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    batch = {Columns.OBS: {k: torch.as_tensor(v) for k, v in langreach_obs_batch.items()}}
    grads = []
    for m in (plain, ckpt):
        m.train()
        with torch.no_grad():  # put a nonzero update in the adapters
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        out = m.forward_train(batch)[Columns.ACTION_DIST_INPUTS]
        out.square().sum().backward()
        grads.append(
            (out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        )
    (o1, g1), (o2, g2) = grads
    torch.testing.assert_close(o2, o1, rtol=0, atol=1e-5)
    assert set(g1) == set(g2) and any(is_adapter_param(n) for n in g1)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-5, msg=n)


def test_vlm_trunk_with_lora_bf16_autocast_and_checkpointing_trains_only_adapters(
    langreach_spaces, langreach_obs_batch
):
    module = _module(
        langreach_spaces,
        head="gaussian",
        autocast="bf16",
        gradient_checkpointing=True,
        **SMOLVLM,
        **LORA,
    )
    module.train()
    batch = {Columns.OBS: {k: torch.as_tensor(v) for k, v in langreach_obs_batch.items()}}
    out = module.forward_train(batch)
    values = module.compute_values(batch, embeddings=out[Columns.EMBEDDINGS])
    assert out[Columns.ACTION_DIST_INPUTS].dtype == torch.float32 and values.dtype == torch.float32
    (out[Columns.ACTION_DIST_INPUTS].square().sum() + values.square().sum()).backward()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    inside_vlm = {n for n in with_grad if ".vlm." in n}
    assert inside_vlm and all(is_adapter_param(n) for n in inside_vlm)
    assert {"vla.trunk.query", "vla.head.net.0.weight", "vf.0.weight"} <= with_grad
