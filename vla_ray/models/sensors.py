"""Driving sensors: encoders that turn one observation key into trunk-width tokens, and fusion.

Each sensor kind is an observation key with a per-sample shape and a registry of encoders:

=========  ================================================  =========================
key        per-sample shape                                  encoders
=========  ================================================  =========================
``lidar``  (points, 4): x, y, z, intensity                   ``pointnet``, ``pillars``
``radar``  (points, 4): x, y, z, radial velocity             ``pointnet``
``imu``    (window, 6): 3 accelerations, 3 angular rates     ``mlp``, ``conv1d``
``ego``    (dim,): speed, yaw rate, route-relative pose      ``mlp``
``depth``  (H, W): metres                                    ``cnn``
=========  ================================================  =========================

Point clouds may come with a validity mask ``<key>_mask`` (B, points) (nonzero = valid; all
points are valid without it), so that padding and a failed sensor (all points invalid) give
defined tokens. Any sensor may come with ``<key>_valid`` (B,): where 0 (the sensor failed), the
fusion sees that sensor's learned "absent" tokens, the same ones sensor dropout trains with.
The encoders' tokens of all sensors go through one fusion module (``FUSIONS``), whose output
tokens join the trunk's sequence beside the vision tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vla_ray.config import ConfigError, check_choice

POINT_WIDTH = 4
IMU_CHANNELS = 6

# kind -> (encoders, default spec). A spec's keys are exactly its defaults' keys.
SENSOR_KINDS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "lidar": (
        ("pointnet", "pillars"),
        dict(encoder="pointnet", points=256, tokens=4, hidden=64, range=32.0, grid=16),
    ),
    "radar": (("pointnet",), dict(encoder="pointnet", points=64, tokens=2, hidden=32, range=64.0)),
    "imu": (("mlp", "conv1d"), dict(encoder="mlp", window=10, tokens=1, hidden=64)),
    "ego": (("mlp",), dict(encoder="mlp", dim=5, tokens=1, hidden=64)),
    "depth": (("cnn",), dict(encoder="cnn", size=[32, 32], tokens=4, hidden=32, max_depth=100.0)),
}
FUSIONS = ("concat", "self_attention", "cross_attention", "gated")
# fusion -> its fusion_config keys and defaults (sensor_dropout applies to every fusion)
FUSION_DEFAULTS: dict[str, dict[str, Any]] = {
    "concat": dict(sensor_dropout=0.0),
    "self_attention": dict(sensor_dropout=0.0, layers=1, heads=4),
    "cross_attention": dict(sensor_dropout=0.0, tokens=4, heads=4),
    "gated": dict(sensor_dropout=0.0),
}
_SQUARE_TOKENS = {("lidar", "pillars"), ("depth", "cnn")}  # tokens are a side x side grid


def normalise_sensors(sensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each sensor's spec with its defaults filled in, in ``SENSOR_KINDS`` order; ConfigError
    naming the field otherwise."""
    if not isinstance(sensors, Mapping):
        raise ConfigError(f"sensors: expected a dict of sensor name -> spec, got {sensors!r}")
    out: dict[str, dict[str, Any]] = {}
    for kind, spec in sensors.items():
        check_choice("sensors", kind, tuple(SENSOR_KINDS))
        encoders, defaults = SENSOR_KINDS[kind]
        spec = {} if spec is None else spec
        if not isinstance(spec, Mapping):
            raise ConfigError(f"sensors.{kind}: expected a dict spec, got {spec!r}")
        unknown = sorted(set(spec) - set(defaults))
        if unknown:
            raise ConfigError(
                f"sensors.{kind}: unknown key(s) {unknown}; valid keys are "
                f"{', '.join(sorted(defaults))}"
            )
        full = {**defaults, **spec}
        check_choice(f"sensors.{kind}.encoder", full["encoder"], encoders)
        for name in ("points", "tokens", "hidden", "window", "dim", "grid"):
            if name in full and (
                not isinstance(full[name], int) or isinstance(full[name], bool) or full[name] < 1
            ):
                raise ConfigError(
                    f"sensors.{kind}.{name}: expected a positive integer, got {full[name]!r}"
                )
        for name in ("range", "max_depth"):
            if name in full and not (isinstance(full[name], int | float) and full[name] > 0):
                raise ConfigError(
                    f"sensors.{kind}.{name}: expected a positive number, got {full[name]!r}"
                )
            if name in full:
                full[name] = float(full[name])
        if "size" in full:
            size = list(full["size"]) if isinstance(full["size"], list | tuple) else None
            if (
                size is None
                or len(size) != 2
                or not all(isinstance(s, int) and s >= 4 for s in size)
            ):
                raise ConfigError(
                    f"sensors.{kind}.size: expected [H, W] with H, W >= 4, got {full['size']!r}"
                )
            full["size"] = size
        if (kind, full["encoder"]) in _SQUARE_TOKENS and math.isqrt(full["tokens"]) ** 2 != full[
            "tokens"
        ]:
            raise ConfigError(
                f"sensors.{kind}.tokens: the {full['encoder']!r} encoder gives a square grid of "
                f"tokens (1, 4, 9, ...), got {full['tokens']}"
            )
        out[kind] = full
    # a fixed order (SENSOR_KINDS'), so the token order survives a JSON round trip (sorted keys)
    return {k: out[k] for k in SENSOR_KINDS if k in out}


def check_fusion(fusion: str, fusion_config: Mapping[str, Any]) -> dict[str, Any]:
    """``fusion_config`` with the fusion's defaults filled in; ConfigError naming the field."""
    check_choice("fusion", fusion, FUSIONS)
    defaults = FUSION_DEFAULTS[fusion]
    unknown = sorted(set(fusion_config) - set(defaults))
    if unknown:
        raise ConfigError(
            f"fusion_config: unknown key(s) {unknown} for fusion={fusion!r}; valid keys are "
            f"{', '.join(sorted(defaults))}"
        )
    full = {**defaults, **fusion_config}
    p = full["sensor_dropout"]
    if not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise ConfigError(f"fusion_config.sensor_dropout: expected 0 <= p < 1, got {p!r}")
    for name in ("layers", "heads", "tokens"):
        if name in full and (not isinstance(full[name], int) or full[name] < 1):
            raise ConfigError(
                f"fusion_config.{name}: expected a positive integer, got {full[name]!r}"
            )
    return full


def sensor_obs_shapes(sensors: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each sensor's observation key (normalised specs)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for kind, spec in sensors.items():
        if kind in ("lidar", "radar"):
            shapes[kind] = (spec["points"], POINT_WIDTH)
        elif kind == "imu":
            shapes[kind] = (spec["window"], IMU_CHANNELS)
        elif kind == "ego":
            shapes[kind] = (spec["dim"],)
        else:
            shapes[kind] = tuple(spec["size"])
    return shapes


def sensor_spec_from_shape(kind: str, shape: tuple[int, ...], spec: Mapping[str, Any]) -> dict:
    """``spec`` with its size keys (points, window, dim, size) read from the per-sample
    ``shape`` of observation ``kind`` (an env's space); ConfigError naming the key, the expected
    and the given shape when the shape does not fit the sensor, or a size key in ``spec``
    disagrees with it."""
    check_choice("sensors", kind, tuple(SENSOR_KINDS))
    shape = tuple(int(s) for s in shape)
    expected = {
        "lidar": ("(points, 4)", len(shape) == 2 and shape[-1] == POINT_WIDTH),
        "radar": ("(points, 4)", len(shape) == 2 and shape[-1] == POINT_WIDTH),
        "imu": ("(window, 6)", len(shape) == 2 and shape[-1] == IMU_CHANNELS),
        "ego": ("(dim,)", len(shape) == 1),
        "depth": ("(H, W)", len(shape) == 2),
    }[kind]
    if not expected[1]:
        raise ConfigError(
            f"observation_space[{kind!r}]: expected per-sample shape {expected[0]}, got {shape}"
        )
    if kind in ("lidar", "radar"):
        derived: dict[str, Any] = {"points": shape[0]}
    elif kind == "imu":
        derived = {"window": shape[0]}
    elif kind == "ego":
        derived = {"dim": shape[0]}
    else:
        derived = {"size": list(shape)}
    for key, value in derived.items():
        given = spec.get(key)
        if given is not None and (list(given) if key == "size" else given) != value:
            raise ConfigError(
                f"sensors.{kind}.{key}: the env's {kind!r} observation has {key} {value}, "
                f"the model config gives {given!r}"
            )
    return {**spec, **derived}


def optional_sensor_keys(sensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The optional observation keys -> per-sample shape: ``<key>_mask`` (points,) of the
    point-cloud sensors, and ``<key>_valid`` () of every sensor (0: the sensor failed)."""
    keys: dict[str, tuple[int, ...]] = {}
    for k, s in sensors.items():
        if k in ("lidar", "radar"):
            keys[f"{k}_mask"] = (s["points"],)
        keys[f"{k}_valid"] = ()
    return keys


# ---- encoders: (B, *shape) [+ mask (B, N)] -> (B, tokens, d) ------------------------------------
def _masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Max over dim 1 of the valid rows (B, N, C) -> (B, C); zeros where no row is valid."""
    if mask is None:
        return x.amax(1)
    valid = mask.bool()
    pooled = x.masked_fill(~valid[..., None], float("-inf")).amax(1)
    return torch.where(valid.any(1, keepdim=True), pooled, torch.zeros_like(pooled))


class PointNetEncoder(nn.Module):
    """Shared per-point MLP, then a masked max-pool per token (PointNet, Qi et al. 2017).

    Each token max-pools its own slice of the per-point features, so tokens can specialise.
    Coordinates are divided by ``range`` (metres) so that they are of order one.
    """

    def __init__(self, d: int, tokens: int, hidden: int, range: float, width: int = POINT_WIDTH):
        super().__init__()
        self.tokens, self.hidden, self.range = tokens, hidden, range
        self.point_mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, tokens * hidden)
        )
        self.out = nn.Linear(hidden, d)
        self.pos = nn.Parameter(torch.zeros(1, tokens, d))

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = points.float()
        x = torch.cat([x[..., :3] / self.range, x[..., 3:]], dim=-1)
        pooled = _masked_max(self.point_mlp(x), mask)
        return self.out(pooled.view(-1, self.tokens, self.hidden)) + self.pos


class PillarsEncoder(nn.Module):
    """PointPillars-style (Lang et al. 2019): per-point features scattered (max) into a
    ``grid`` x ``grid`` bird's-eye-view grid over [-range, range]^2 metres, a small CNN, and
    the feature map average-pooled to a side x side grid of tokens (row-major, x forward)."""

    def __init__(self, d: int, tokens: int, hidden: int, range: float, grid: int):
        super().__init__()
        self.hidden, self.range, self.grid = hidden, range, grid
        self.side = math.isqrt(tokens)
        # point: (x, y, z) / range, intensity, offset (dx, dy) from its cell's centre in cells
        self.point_mlp = nn.Sequential(nn.Linear(POINT_WIDTH + 2, hidden), nn.GELU())
        self.cnn = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.out = nn.Linear(hidden, d)
        self.pos = nn.Parameter(torch.zeros(1, tokens, d))

    def bev(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scattered bird's-eye-view grid (B, hidden, grid, grid); empty cells are zero."""
        B, N, _ = points.shape
        x = points.float()
        g = self.grid
        cell = (x[..., :2] + self.range) / (2 * self.range) * g  # (B, N, 2) in cells
        idx = cell.floor().long()
        inside = ((idx >= 0) & (idx < g)).all(-1)
        valid = inside if mask is None else inside & mask.bool()
        offset = cell - idx.float() - 0.5
        feats = self.point_mlp(torch.cat([x[..., :3] / self.range, x[..., 3:], offset], -1))
        # invalid / out-of-range points go to a spare cell g*g that is dropped afterwards
        flat = torch.where(
            valid, idx[..., 0] * g + idx[..., 1], torch.full_like(idx[..., 0], g * g)
        )
        grid = feats.new_zeros(B, g * g + 1, self.hidden)
        index = flat[..., None].expand(-1, -1, self.hidden)
        grid = grid.scatter_reduce(1, index, feats, reduce="amax", include_self=False)
        return grid[:, : g * g].transpose(1, 2).reshape(B, self.hidden, g, g)

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        fmap = F.adaptive_avg_pool2d(self.cnn(self.bev(points, mask)), self.side)
        return self.out(fmap.flatten(2).transpose(1, 2)) + self.pos


class MLPEncoder(nn.Module):
    """The flattened input through a two-layer MLP into ``tokens`` tokens."""

    def __init__(self, d: int, tokens: int, hidden: int, in_dim: int):
        super().__init__()
        self.tokens, self.d = tokens, d
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * d)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x.float().flatten(1)).view(-1, self.tokens, self.d)


class Conv1dEncoder(nn.Module):
    """A window (B, T, C) through two temporal convolutions, average-pooled to ``tokens``."""

    def __init__(self, d: int, tokens: int, hidden: int, channels: int = IMU_CHANNELS):
        super().__init__()
        self.tokens = tokens
        self.net = nn.Sequential(
            nn.Conv1d(channels, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv1d(hidden, hidden, 3, padding=1),
            nn.GELU(),
        )
        self.out = nn.Linear(hidden, d)
        self.pos = nn.Parameter(torch.zeros(1, tokens, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.adaptive_avg_pool1d(self.net(x.float().transpose(1, 2)), self.tokens)
        return self.out(h.transpose(1, 2)) + self.pos


class DepthCNNEncoder(nn.Module):
    """A depth map (B, H, W) in metres, clipped to ``max_depth`` and scaled to [0, 1], through a
    small strided CNN, average-pooled to a side x side grid of tokens."""

    def __init__(self, d: int, tokens: int, hidden: int, max_depth: float):
        super().__init__()
        self.max_depth, self.side = max_depth, math.isqrt(tokens)
        self.cnn = nn.Sequential(
            nn.Conv2d(1, hidden, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.out = nn.Linear(hidden, d)
        self.pos = nn.Parameter(torch.zeros(1, tokens, d))

    def forward(self, depth: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.nan_to_num(depth.float(), nan=0.0, posinf=self.max_depth)
        x = x.clamp(0.0, self.max_depth)[:, None] / self.max_depth
        fmap = F.adaptive_avg_pool2d(self.cnn(x), self.side)
        return self.out(fmap.flatten(2).transpose(1, 2)) + self.pos


def build_sensor_encoder(kind: str, spec: Mapping[str, Any], d: int) -> nn.Module:
    """The encoder ``spec["encoder"]`` for sensor ``kind`` (a normalised spec), width ``d``."""
    enc, tokens, hidden = spec["encoder"], spec["tokens"], spec["hidden"]
    if kind in ("lidar", "radar"):
        if enc == "pillars":
            return PillarsEncoder(d, tokens, hidden, spec["range"], spec["grid"])
        return PointNetEncoder(d, tokens, hidden, spec["range"])
    if kind == "imu":
        if enc == "conv1d":
            return Conv1dEncoder(d, tokens, hidden)
        return MLPEncoder(d, tokens, hidden, spec["window"] * IMU_CHANNELS)
    if kind == "ego":
        return MLPEncoder(d, tokens, hidden, spec["dim"])
    return DepthCNNEncoder(d, tokens, hidden, spec["max_depth"])


# ---- fusion: {sensor: (B, T_i, d)}, vision (B, M, d) | None, context (B, d) -> (B, T, d) --------
class Fusion(nn.Module):
    """Base of the fusion modules: a learned type embedding per sensor, and sensor dropout.

    With ``sensor_dropout`` p > 0, in training each sensor of each sample is replaced, with
    probability p, by that sensor's learned "absent" tokens, so that the policy learns to act
    when a sensor fails (its tokens are then uninformative) rather than depending on it.
    """

    def __init__(self, sensor_tokens: Mapping[str, int], d: int, sensor_dropout: float = 0.0):
        super().__init__()
        self.names = list(sensor_tokens)
        self.sensor_dropout = float(sensor_dropout)
        self.type_emb = nn.ParameterDict(
            {k: nn.Parameter(torch.randn(1, 1, d) * 0.02) for k in self.names}
        )
        self.absent = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(1, n, d)) for k, n in sensor_tokens.items()}
        )
        self.num_tokens = sum(sensor_tokens.values())

    def embed(
        self,
        tokens: Mapping[str, torch.Tensor],
        valid: Mapping[str, torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor]:
        """Each sensor's tokens with its type embedding; the "absent" tokens where ``valid``
        (B,) is 0 and, in training, where sensor dropout drops the sensor."""
        out = []
        for k in self.names:
            t = tokens[k]
            absent = torch.zeros(t.shape[0], 1, 1, dtype=torch.bool, device=t.device)
            flag = None if valid is None else valid.get(k)
            if flag is not None:
                absent = absent | ~flag.to(t.device).bool().view(-1, 1, 1)
            if self.training and self.sensor_dropout > 0:
                absent = absent | (
                    torch.rand(t.shape[0], 1, 1, device=t.device) < self.sensor_dropout
                )
            t = torch.where(absent, self.absent[k].to(t.dtype).expand_as(t), t)
            out.append(t + self.type_emb[k].to(t.dtype))
        return out

    def forward(
        self,
        tokens: Mapping[str, torch.Tensor],
        vision: torch.Tensor | None,
        context: torch.Tensor,
        valid: Mapping[str, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - every fusion overrides


class ConcatFusion(Fusion):
    """All sensor tokens side by side; the language model attends over them."""

    def forward(self, tokens, vision, context, valid=None):
        return torch.cat(self.embed(tokens, valid), dim=1)


class SelfAttentionFusion(Fusion):
    """Transformer encoder layers over all sensor tokens together (same number out)."""

    def __init__(self, sensor_tokens, d, sensor_dropout=0.0, layers=1, heads=4):
        super().__init__(sensor_tokens, d, sensor_dropout)
        layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=2 * d, batch_first=True, norm_first=True, dropout=0.0
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens, vision, context, valid=None):
        return self.encoder(torch.cat(self.embed(tokens, valid), dim=1))


class CrossAttentionFusion(Fusion):
    """``tokens`` learned queries, conditioned on the instruction context and the mean vision
    token, attend to all sensor tokens: what the fused tokens read depends on the instruction
    and the camera."""

    def __init__(self, sensor_tokens, d, sensor_dropout=0.0, tokens=4, heads=4):
        super().__init__(sensor_tokens, d, sensor_dropout)
        self.queries = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.from_context = nn.Linear(d, d)
        self.from_vision = nn.Linear(d, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.num_tokens = tokens

    def forward(self, tokens, vision, context, valid=None):
        kv = torch.cat(self.embed(tokens, valid), dim=1)
        q = self.queries + self.from_context(context.to(kv.dtype))[:, None]
        if vision is not None:
            q = q + self.from_vision(vision.mean(1).to(kv.dtype))[:, None]
        x = q + self.attn(q, kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm(x))


class GatedFusion(Fusion):
    """Each sensor's tokens scaled by a learned gate in (0, 1) computed from that sensor's mean
    token and the instruction context, so the policy can turn a sensor down when it is
    uninformative (or, with ``sensor_dropout``, absent)."""

    def __init__(self, sensor_tokens, d, sensor_dropout=0.0):
        super().__init__(sensor_tokens, d, sensor_dropout)
        self.gates = nn.ModuleDict({k: nn.Linear(2 * d, 1) for k in self.names})

    def forward(self, tokens, vision, context, valid=None):
        out = []
        for k, t in zip(self.names, self.embed(tokens, valid), strict=True):
            gate = torch.sigmoid(self.gates[k](torch.cat([t.mean(1), context.to(t.dtype)], -1)))
            out.append(t * gate[:, None])
        return torch.cat(out, dim=1)


FUSION_CLASSES: dict[str, type[Fusion]] = {
    "concat": ConcatFusion,
    "self_attention": SelfAttentionFusion,
    "cross_attention": CrossAttentionFusion,
    "gated": GatedFusion,
}


def build_fusion(name: str, sensor_tokens: Mapping[str, int], d: int, **kwargs: Any) -> Fusion:
    """The fusion module ``name`` (see ``FUSIONS``) over sensors with ``sensor_tokens`` tokens
    each."""
    check_choice("fusion", name, FUSIONS)
    return FUSION_CLASSES[name](sensor_tokens, d, **kwargs)


class SensorStack(nn.Module):
    """Every configured sensor's encoder and the fusion: observation -> tokens (B, T, d)."""

    def __init__(
        self,
        sensors: Mapping[str, Mapping[str, Any]],
        fusion: str,
        fusion_config: Mapping[str, Any],
        d: int,
    ):
        super().__init__()
        sensors = normalise_sensors(sensors)
        self.encoders = nn.ModuleDict(
            {k: build_sensor_encoder(k, s, d) for k, s in sensors.items()}
        )
        self.fusion = build_fusion(
            fusion,
            {k: s["tokens"] for k, s in sensors.items()},
            d,
            **check_fusion(fusion, fusion_config),
        )
        self.num_tokens = self.fusion.num_tokens

    def forward(
        self,
        obs: Mapping[str, torch.Tensor],
        vision: torch.Tensor | None,
        context: torch.Tensor,
    ) -> torch.Tensor:
        tokens = {k: enc(obs[k], obs.get(f"{k}_mask")) for k, enc in self.encoders.items()}
        valid = {k: obs.get(f"{k}_valid") for k in self.encoders}
        return self.fusion(tokens, vision, context, valid)
