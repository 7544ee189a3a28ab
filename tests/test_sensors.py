"""Driving sensors: encoder and fusion shapes in the VLA trunk, errors, gradients, dropout."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vla_ray.config import ConfigError, VLAConfig
from vla_ray.models.sensors import (
    FUSIONS,
    SENSOR_KINDS,
    SensorStack,
    build_sensor_encoder,
    normalise_sensors,
)
from vla_ray.models.vla import VLA, ObservationError
from vla_ray.tokenizer import encode_instructions

B = 3
TINY = {
    "lidar": {"points": 32, "grid": 8},
    "radar": {"points": 8},
    "imu": {"window": 5},
    "ego": {"dim": 4},
    "depth": {"size": [16, 16]},
}
# two sensor sets that between them use every registered encoder
ENCODER_SETS = {
    "pointnet+mlp": {
        "lidar": "pointnet",
        "radar": "pointnet",
        "imu": "mlp",
        "ego": "mlp",
        "depth": "cnn",
    },
    "pillars+conv1d": {
        "lidar": "pillars",
        "radar": "pointnet",
        "imu": "conv1d",
        "ego": "mlp",
        "depth": "cnn",
    },
}


def sensors_of(encoders: dict[str, str]) -> dict[str, dict]:
    return {k: {**TINY[k], "encoder": e} for k, e in encoders.items()}


def sensor_obs(batch: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lidar = torch.randn(batch, 32, 4, generator=g) * 10
    return dict(
        lidar=lidar,
        lidar_mask=torch.rand(batch, 32, generator=g) > 0.2,
        radar=torch.randn(batch, 8, 4, generator=g) * 10,
        imu=torch.randn(batch, 5, 6, generator=g),
        ego=torch.randn(batch, 4, generator=g),
        depth=torch.rand(batch, 16, 16, generator=g) * 60,
    )


def full_obs(batch: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    """Camera, state and instruction (two distinct instructions) plus every sensor."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = encode_instructions(["turn left", "go straight", "turn left"][:batch], 16)
    return dict(
        image=torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8, generator=g),
        state=torch.randn(batch, 4, generator=g),
        instruction=torch.as_tensor(ids),
        instruction_mask=torch.as_tensor(mask),
        **sensor_obs(batch, seed),
    )


def test_every_encoder_is_covered():
    used = {(k, e) for s in ENCODER_SETS.values() for k, e in s.items()}
    assert used == {(k, e) for k, (encs, _) in SENSOR_KINDS.items() for e in encs}


@pytest.mark.parametrize(
    "kind,encoder", [(k, e) for k, (es, _) in SENSOR_KINDS.items() for e in es]
)
def test_encoder_token_shapes(kind, encoder):
    tokens = 4 if (kind, encoder) in {("lidar", "pillars"), ("depth", "cnn")} else 3
    spec = normalise_sensors({kind: {**TINY[kind], "encoder": encoder, "tokens": tokens}})[kind]
    enc = build_sensor_encoder(kind, spec, d=16)
    obs = sensor_obs()
    out = enc(obs[kind], obs.get(f"{kind}_mask"))
    assert out.shape == (B, tokens, 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("encoder", ["pointnet", "pillars"])
def test_point_encoders_ignore_masked_points_and_survive_a_dead_sensor(encoder):
    torch.manual_seed(0)
    spec = normalise_sensors({"lidar": {**TINY["lidar"], "encoder": encoder}})["lidar"]
    enc = build_sensor_encoder("lidar", spec, d=16)
    obs = sensor_obs()
    points, mask = obs["lidar"], obs["lidar_mask"]
    moved = torch.where(mask[..., None], points, points + 5.0)  # only masked-out points move
    assert torch.allclose(enc(points, mask), enc(moved, mask))
    assert not torch.allclose(enc(points, mask), enc(points + 5.0, mask))
    dead = enc(points, torch.zeros_like(mask))  # no valid point: defined, finite tokens
    assert torch.isfinite(dead).all()
    dead.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "fusion,encoders", list(itertools.product(FUSIONS, ENCODER_SETS)), ids=lambda v: str(v)
)
def test_vla_forward_and_gradients_every_encoder_and_fusion(fusion, encoders):
    torch.manual_seed(0)
    cfg = VLAConfig(sensors=sensors_of(ENCODER_SETS[encoders]), fusion=fusion, action_dim=2)
    model = VLA(cfg)
    obs = full_obs()
    n_vision = model.trunk.projector.num_tokens
    prefix = model.trunk.prefix(obs["instruction"], obs["instruction_mask"])
    suffix, _, _ = model.trunk._suffix_tokens(obs, prefix.context)
    n_sensor = model.trunk.sensors.num_tokens
    expected = (
        4
        if fusion == "cross_attention"
        else sum(normalise_sensors(cfg.sensors)[k]["tokens"] for k in cfg.sensors)
    )
    assert n_sensor == expected
    assert suffix.shape == (B, n_vision + n_sensor + 2, model.trunk.hidden_size)  # + state, query
    features = model(obs)
    assert features.shape == (B, model.trunk.feature_dim) and torch.isfinite(features).all()
    assert model.predict(obs).shape == (B, 1, 2)
    model.head.loss(model(obs), torch.rand(B, 1, 2) * 2 - 1).backward()
    for kind, enc in model.trunk.sensors.encoders.items():
        grads = [p.grad for p in enc.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), (kind, fusion)


def test_sensor_readings_change_the_features_unless_flagged_failed():
    torch.manual_seed(0)
    model = VLA(VLAConfig(sensors=sensors_of(ENCODER_SETS["pointnet+mlp"])))
    obs = full_obs()
    base = model(obs)
    for kind in TINY:
        changed = dict(obs, **{kind: obs[kind] * 0.5 + 1.0})
        assert not torch.allclose(model(changed), base, atol=1e-6), kind
        # flagged as failed, the sensor's readings no longer matter
        failed = torch.zeros(B, dtype=torch.bool)
        torch.testing.assert_close(
            model(dict(changed, **{f"{kind}_valid": failed})),
            model(dict(obs, **{f"{kind}_valid": failed})),
        )


def test_missing_sensor_key_names_key_and_expected_shape():
    model = VLA(VLAConfig(sensors=sensors_of(ENCODER_SETS["pointnet+mlp"])))
    obs = full_obs()
    del obs["lidar"]
    with pytest.raises(
        ObservationError, match=r"'lidar' is missing: expected per-sample shape \(32, 4\)"
    ):
        model(obs)


def test_point_cloud_of_wrong_width_names_key_and_shapes():
    model = VLA(VLAConfig(sensors=sensors_of(ENCODER_SETS["pillars+conv1d"])))
    obs = full_obs()
    with pytest.raises(
        ObservationError, match=r"'radar': expected shape \(B, 8, 4\), got \(3, 8, 3\)"
    ):
        model(dict(obs, radar=obs["radar"][..., :3]))
    with pytest.raises(
        ObservationError, match=r"'lidar_mask': expected shape \(B, 32\).*\(3, 31\)"
    ):
        model(dict(obs, lidar_mask=obs["lidar_mask"][:, :31]))
    with pytest.raises(ObservationError, match=r"'imu_valid': expected shape \(B,\) with B=3"):
        model(dict(obs, imu_valid=torch.ones(3, 1)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"sensors": {"sonar": {}}},
            r"sensors: unknown name 'sonar'; valid names are lidar, radar",
        ),
        (
            {"sensors": {"imu": {"encoder": "pillars"}}},
            r"sensors.imu.encoder: unknown name 'pillars'; valid names are mlp, conv1d",
        ),
        ({"sensors": {"lidar": {"point": 3}}}, r"sensors.lidar: unknown key\(s\) \['point'\]"),
        (
            {"sensors": {"lidar": {"points": 0}}},
            r"sensors.lidar.points: expected a positive integer, got 0",
        ),
        ({"sensors": {"depth": {"tokens": 3}}}, r"sensors.depth.tokens: .*square grid.*got 3"),
        ({"sensors": {"ego": {}}, "fusion": "sum"}, r"fusion: unknown name 'sum'"),
        (
            {"sensors": {"ego": {}}, "fusion_config": {"layers": 2}},
            r"fusion_config: unknown key\(s\) \['layers'\] for fusion='concat'",
        ),
        (
            {"sensors": {"ego": {}}, "fusion_config": {"sensor_dropout": 1.0}},
            r"sensor_dropout: expected 0 <= p < 1, got 1.0",
        ),
        ({"fusion": "gated"}, r"fusion/fusion_config: only used with sensors"),
    ],
)
def test_sensor_config_errors_name_field_expected_and_given(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VLAConfig(**kwargs)


def test_config_fills_sensor_defaults_and_round_trips(tmp_path):
    cfg = VLAConfig(sensors={"lidar": {"encoder": "pillars"}, "imu": {"encoder": "conv1d"}})
    assert cfg.sensors["lidar"] == {**SENSOR_KINDS["lidar"][1], "encoder": "pillars"}
    cfg.save(tmp_path / "c.json")
    assert VLAConfig.load(tmp_path / "c.json") == cfg


def test_save_and_load_keep_sensor_weights(tmp_path):
    torch.manual_seed(0)
    model = VLA(
        VLAConfig(sensors=sensors_of(ENCODER_SETS["pillars+conv1d"]), fusion="gated")
    ).eval()
    obs = full_obs()
    loaded = VLA.from_pretrained(model.save_pretrained(tmp_path / "m")).eval()
    assert torch.allclose(loaded(obs), model(obs), atol=1e-6)


def test_no_sensors_adds_no_parameters():
    model = VLA(VLAConfig())
    assert model.trunk.sensors is None
    assert not any(".sensors." in k for k in model.state_dict())


def test_sensor_dropout_replaces_sensors_in_training_only():
    torch.manual_seed(0)
    stack = SensorStack(
        normalise_sensors({"ego": {"dim": 4}, "imu": {"window": 5}}),
        "concat",
        {"sensor_dropout": 0.5},
        d=16,
    )
    with torch.no_grad():
        for p in stack.fusion.absent.values():
            p.fill_(7.0)  # recognisable "absent" tokens
    n = 400
    obs = {"ego": torch.randn(n, 4), "imu": torch.randn(n, 5, 6)}
    context = torch.zeros(n, 16)
    assert stack.fusion.names == ["imu", "ego"]  # SENSOR_KINDS order: one token each
    out = stack(obs, None, context)  # training mode
    ego_type = stack.fusion.type_emb["ego"][0, 0]
    dropped = torch.isclose(out[:, 1], 7.0 + ego_type).all(-1)
    assert 0.4 < dropped.float().mean() < 0.6
    stack.eval()
    out = stack(obs, None, context)
    assert not torch.isclose(out[:, 1], 7.0 + ego_type).all(-1).any()
    # a failed sensor at inference (<key>_valid = 0) gets the same absent tokens
    valid = torch.arange(n) % 2 == 0
    out = stack({**obs, "ego_valid": valid}, None, context)
    assert torch.equal(torch.isclose(out[:, 1], 7.0 + ego_type).all(-1), ~valid)
    assert not torch.isclose(out[:, 0], 7.0 + stack.fusion.type_emb["imu"][0, 0]).all(-1).any()


def driving_spaces(**sensors: tuple[int, ...]):
    import gymnasium as gym
    import numpy as np

    box = lambda shape: gym.spaces.Box(-np.inf, np.inf, shape, np.float32)  # noqa: E731
    return gym.spaces.Dict(
        {
            "image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),
            "state": box((4,)),
            "instruction": gym.spaces.Box(0, 1000, (16,), np.int64),
            "instruction_mask": gym.spaces.Box(0, 1, (16,), np.int64),
            **{k: box(s) for k, s in sensors.items()},
        }
    )


def test_rl_module_reads_sensor_sizes_from_the_env_spaces():
    import gymnasium as gym

    from vla_ray.rl_module import vla_config_from_spaces

    actions = gym.spaces.Box(-1, 1, (2,))
    spaces = driving_spaces(lidar=(100, 4), imu=(8, 6), ego=(3,), depth=(24, 20))
    model_config = {"sensors": {"lidar": {"encoder": "pillars"}, "imu": {}, "ego": {}, "depth": {}}}
    cfg = vla_config_from_spaces(model_config, spaces, actions)
    assert cfg.sensors["lidar"]["points"] == 100 and cfg.sensors["lidar"]["encoder"] == "pillars"
    assert cfg.sensors["imu"]["window"] == 8 and cfg.sensors["ego"]["dim"] == 3
    assert cfg.sensors["depth"]["size"] == [24, 20]
    with pytest.raises(ConfigError, match=r"sensors.radar: the env's observation space has no"):
        vla_config_from_spaces({"sensors": {"radar": {}}}, spaces, actions)
    with pytest.raises(
        ConfigError, match=r"\['lidar'\]: expected per-sample shape \(points, 4\), got \(100, 3\)"
    ):
        vla_config_from_spaces({"sensors": {"lidar": {}}}, driving_spaces(lidar=(100, 3)), actions)
    with pytest.raises(
        ConfigError,
        match=r"sensors.lidar.points: the env's 'lidar' observation has points 100, the model "
        r"config gives 64",
    ):
        vla_config_from_spaces({"sensors": {"lidar": {"points": 64}}}, spaces, actions)


def test_rl_module_with_fused_sensors_forward_and_values():
    import gymnasium as gym
    from ray.rllib.core.columns import Columns

    from vla_ray.rl_module import VLAModule

    torch.manual_seed(0)
    spaces = driving_spaces(lidar=(32, 4), imu=(5, 6), ego=(4,))
    model_config = {"sensors": {"lidar": {"grid": 8}, "imu": {}, "ego": {}}, "fusion": "gated"}
    module = VLAModule(
        observation_space=spaces,
        action_space=gym.spaces.Box(-1, 1, (2,)),
        model_config=model_config,
    )
    obs = {k: v for k, v in full_obs().items() if k not in ("radar", "depth")}
    out = module.forward_train({Columns.OBS: obs})
    assert out[Columns.ACTION_DIST_INPUTS].shape == (B, 4)
    values = module.compute_values({Columns.OBS: obs}, out[Columns.EMBEDDINGS])
    assert values.shape == (B,) and torch.isfinite(values).all()


def test_act_takes_one_unbatched_reading_per_sensor():
    torch.manual_seed(0)
    model = VLA(VLAConfig(sensors={"ego": {"dim": 4}, "lidar": {"points": 32}})).eval()
    obs = full_obs(batch=1)
    sensors = {k: obs[k][0].numpy() for k in ("ego", "lidar", "lidar_mask")}
    chunk = model.act(
        obs["image"][0].numpy(), "turn left", obs["state"][0].numpy(), sensors=sensors
    )
    expected = model.predict({**obs, "lidar_mask": obs["lidar_mask"]})[0]
    np.testing.assert_allclose(chunk, expected.numpy(), atol=1e-5)
    with pytest.raises(ObservationError, match="'lidar' is missing"):
        model.act(obs["image"][0].numpy(), "turn left", obs["state"][0].numpy())


def test_export_refuses_a_sensor_policy_clearly(tmp_path):
    from vla_ray.export import ExportError, export

    folder = VLA(VLAConfig(sensors={"ego": {"dim": 4}})).save_pretrained(tmp_path / "m")
    with pytest.raises(ExportError, match=r"not the driving sensors \['ego'\] yet"):
        export(folder, "onnx", tmp_path / "out", progress=None)
    assert not (tmp_path / "out").exists()
