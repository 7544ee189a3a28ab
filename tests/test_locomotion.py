"""Control tasks under the VLA observation contract, and the state-only VLA (vision='none')."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

import vla_ray.envs  # noqa: F401  (registers the ids)
from vla_ray.config import ConfigError, VLAConfig
from vla_ray.envs.locomotion import TASKS, env_ids
from vla_ray.export import FP32_TOLERANCE, export, load_runner, random_inputs, reference_actions
from vla_ray.models.vla import VLA, ObservationError
from vla_ray.rl_module import VLAModule
from vla_ray.serve.schema import RequestError, RequestParser
from vla_ray.tokenizer import load_tokenizer

STATE_DIMS = {"HalfCheetah-v5": 17, "Hopper-v5": 11, "Walker2d-v5": 17, "Pendulum-v1": 3}


@pytest.mark.parametrize("task", sorted(STATE_DIMS))
def test_state_only_envs_follow_the_contract(task):
    env = gym.make(f"vla_ray/{task}")
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"state", "instruction", "instruction_mask"}
    assert obs["state"].shape == (STATE_DIMS[task],) and obs["state"].dtype == np.float32
    assert env.observation_space.contains(obs)
    text = load_tokenizer().decode(obs["instruction"][obs["instruction_mask"] == 1].tolist())
    assert text == TASKS[task][1]
    for _ in range(3):
        obs, reward, *_ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and np.isfinite(reward)
    env.close()


def test_pixel_variant_renders_images():
    env = gym.make("vla_ray/HopperPixels-v5", image_size=(32, 48))
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (32, 48, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 0  # a rendered scene, not a blank frame
    assert env.observation_space.contains(obs)
    env.close()
    blind = gym.make("vla_ray/HopperPixels-v5", include_state=False, image_size=(32, 32))
    assert set(blind.observation_space.spaces) == {"image", "instruction", "instruction_mask"}
    blind.close()


def test_every_id_is_registered():
    for env_id in env_ids():
        assert env_id in gym.registry
    with pytest.raises(ValueError, match="task: unknown name"):
        vla_ray.envs.locomotion.make("Ant-v9")


def test_state_only_module_forward_and_errors():
    env = gym.make("vla_ray/Hopper-v5")
    spaces = (env.observation_space, env.action_space)
    module = VLAModule(observation_space=spaces[0], action_space=spaces[1], model_config={})
    assert module.vla.config.vision == "none" and module.vla.trunk.vision is None
    obs, _ = env.reset(seed=1)
    batch = {Columns.OBS: {k: torch.as_tensor(np.stack([v, v])) for k, v in obs.items()}}
    out = module.forward_train(batch)
    assert out[Columns.ACTION_DIST_INPUTS].shape == (2, 6)
    assert module.compute_values(batch, out[Columns.EMBEDDINGS]).shape == (2,)
    with pytest.raises(ConfigError, match="vision: 'cnn' needs an 'image' observation"):
        VLAModule(
            observation_space=spaces[0], action_space=spaces[1], model_config={"vision": "cnn"}
        )
    with pytest.raises(ConfigError, match="needs a proprioceptive state"):
        VLAConfig(vision="none", state_dim=0)
    with pytest.raises(ObservationError, match="'state' is missing"):
        module.vla.trunk({k: v for k, v in batch[Columns.OBS].items() if k != "state"})
    env.close()


def test_state_only_vla_save_act_export_and_serve_schema(tmp_path):
    torch.manual_seed(0)
    vla = VLA(VLAConfig(vision="none", state_dim=11, action_dim=3)).eval()
    state = np.linspace(-1, 1, 11).astype(np.float32)
    action = vla.act(None, "hop forward", state)
    assert action.shape == (1, 3)
    src = vla.save_pretrained(tmp_path / "vla")
    again = VLA.from_pretrained(src).eval()
    np.testing.assert_allclose(again.act(None, "hop forward", state), action, atol=1e-6)

    # the split prefix/suffix graphs of a state-only model: test_export's normalisation test
    summary = export(src, "onnx", tmp_path / "out", prefix_cache=False, progress=None)
    assert summary["formats"]["onnx"]["max_abs_diff"] < FP32_TOLERANCE
    spec = json.loads((tmp_path / "out" / "onnx" / "spec.json").read_text())
    assert [i["name"] for i in spec["inputs"]] == ["state", "instruction", "instruction_mask"]
    inputs = random_inputs(again.config, len(again.tokenizer), 3)
    np.testing.assert_allclose(
        load_runner(tmp_path / "out" / "onnx")(inputs),
        reference_actions(again, inputs),
        atol=FP32_TOLERANCE,
    )
    parser = RequestParser(spec, again.tokenizer)
    parsed = parser.parse(json.dumps({"instruction": "hop forward", "state": [0.0] * 11}).encode())
    assert set(parsed.inputs) == {"state", "instruction", "instruction_mask"}
    with pytest.raises(RequestError, match="state-only") as err:
        parser.parse(
            json.dumps({"instruction": "hop", "state": [0.0] * 11, "image": "AAAA"}).encode()
        )
    assert err.value.field == "image" and err.value.status == 422
