"""Every algorithm declares the typed interface of ``vla_ray.algorithm_spec``, and its
capability flags are what ``resolve`` enforces (no Ray)."""

from __future__ import annotations

import pytest
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.rl_module.rl_module import RLModule

from vla_ray.algorithm_spec import OfflineVLAAlgorithmConfig, VLAAlgorithmConfig
from vla_ray.algorithms import ALGORITHMS, get_algorithm
from vla_ray.config import ACTION_HEADS, ConfigError
from vla_ray.env_factory import ALGORITHM_WRAPPERS
from vla_ray.presets import PRESETS
from vla_ray.setting_keys import ENV_FACTORY_KEYS, known_setting_keys
from vla_ray.train import resolve

# one preset per algorithm (the first one listed)
PRESET_OF = {a: next(p.name for p in PRESETS.values() if p.algorithm == a) for a in ALGORITHMS}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_config_class_declares_the_interface(name):
    cls = get_algorithm(name)
    assert issubclass(cls, VLAAlgorithmConfig) and issubclass(cls, AlgorithmConfig)
    # the mixin comes first: its hooks (module spec, data, evaluation) precede RLlib's
    assert cls.__mro__.index(VLAAlgorithmConfig) < cls.__mro__.index(AlgorithmConfig)
    assert name == cls.NAME
    assert isinstance(cls.HEADS, tuple) and cls.HEADS and set(cls.HEADS) <= set(ACTION_HEADS)
    assert cls.MODEL_DEFAULTS["head"] in cls.HEADS
    for flag in (
        "OFFLINE",
        "NEEDS_DATA",
        "ACCEPTS_DATA",
        "ACTION_CHUNKS",
        "EVALUATES",
        "EXPORTS_VLA",
    ):
        assert isinstance(getattr(cls, flag), bool), flag
    assert issubclass(cls, OfflineVLAAlgorithmConfig) == cls.OFFLINE
    if cls.OFFLINE:  # trains from --data only; the EnvRunners evaluate
        assert cls.NEEDS_DATA and cls.EVALUATES
    if cls.NEEDS_DATA:
        assert cls.ACCEPTS_DATA
    cfg = cls()
    assert issubclass(cls.module_class(), RLModule)
    assert issubclass(cfg.learner_class, Learner)
    # the defaults are set on the config itself and are keys its training() takes
    defaults = cls.training_defaults()
    assert defaults
    keys = known_setting_keys(name, None)["training"]
    assert keys is None or set(defaults) <= keys, set(defaults) - keys
    for key, value in defaults.items():
        if key not in ("lambda_", "replay_buffer_config", "expert"):
            assert getattr(cfg, key) == value, key
    assert cls.training_defaults() is not cls.training_defaults()  # a fresh copy each time


def test_get_algorithm_names_the_valid_algorithms():
    with pytest.raises(ValueError, match="algorithm: unknown name 'ppo2'; valid names are ppo, "):
        get_algorithm("ppo2")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_data_flags_are_what_resolve_enforces(name):
    cls = get_algorithm(name)
    preset = PRESET_OF[name]
    if cls.NEEDS_DATA:
        with pytest.raises(ValueError, match=f"--data: {name} trains from a dataset; give --data"):
            resolve(preset)
    else:
        assert resolve(preset).settings.get("data") is None
    if cls.ACCEPTS_DATA:
        assert resolve(preset, data="demos").settings["data"] == "demos"
    else:
        with pytest.raises(ValueError, match=f"--data: {name} is an online algorithm"):
            resolve(preset, data="demos")
    spec = resolve(preset, data="demos" if cls.NEEDS_DATA else None)
    assert spec.settings["training"] == {**cls.training_defaults(), **PRESETS[preset].training}
    # evaluation settings only for the algorithms that evaluate (offline: every 25 iterations)
    assert ("eval_every" in spec.settings) == cls.EVALUATES
    if cls.EVALUATES:
        assert spec.settings["eval_every"] == (25 if cls.OFFLINE else 1)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_action_chunk_flag_is_what_resolve_enforces(name):
    cls = get_algorithm(name)
    preset = PRESET_OF[name]
    data = "demos" if cls.NEEDS_DATA else None
    overrides = {"model": {"chunk_size": 2}}
    if cls.ACTION_CHUNKS:
        spec = resolve(preset, overrides, data=data)
        assert spec.settings["env_config"]["action_chunk"]["size"] == 2
    else:
        with pytest.raises(ConfigError, match=f"model.chunk_size: {name} learns single-step"):
            resolve(preset, overrides, data=data)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_declared_env_wrappers_import_and_their_keys_are_env_settings(name):
    import importlib

    cls = get_algorithm(name)
    for wrapper in cls.ENV_WRAPPERS:
        module, _, attr = wrapper.wrap.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        assert set(wrapper.keys) <= set(ENV_FACTORY_KEYS)  # ``--set env.KEY`` takes them
        assert wrapper in ALGORITHM_WRAPPERS  # declared once, in the env factory


def test_env_factory_applies_an_algorithms_wrapper_only_when_its_key_is_set():
    from vla_ray.algorithms.grpo import GroupSeeding
    from vla_ray.env_factory import EnvFactory
    from vla_ray.envs import LANGREACH_STATE_ID
    from vla_ray.envs.experts import ExpertMixing

    dagger = EnvFactory(LANGREACH_STATE_ID, get_algorithm("dagger").ENV_WRAPPERS)
    env = dagger({"expert_beta": 0.5, "expert": "env", "max_episode_steps": 5})
    assert isinstance(env, ExpertMixing) and env.expert_beta == 0.5
    assert not isinstance(dagger({"max_episode_steps": 5}), ExpertMixing)
    grpo = EnvFactory(LANGREACH_STATE_ID, get_algorithm("grpo").ENV_WRAPPERS)
    assert isinstance(grpo({"group_seeding": True}), GroupSeeding)
    assert not isinstance(grpo({"group_seeding": False}), GroupSeeding)  # key taken, no wrapper
    # without the algorithm's wrapper, its key is not an env argument
    with pytest.raises(TypeError, match="expert_beta"):
        EnvFactory(LANGREACH_STATE_ID)({"expert_beta": 0.5})
