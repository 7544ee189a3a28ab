"""The VLA model configuration: which parts, their sizes, and what trains."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VISION_ENCODERS = ("cnn", "siglip", "clip", "dinov2")
# ``vision="none"``: no image input (state-only tasks such as MuJoCo locomotion from proprioception)
VISION_CHOICES = (*VISION_ENCODERS, "none")
PROJECTORS = ("mlp", "attention", "perceiver")
ACTION_HEADS = (
    "mlp",
    "gaussian",
    "tanh_gaussian",
    "diffusion",
    "flow_matching",
    "transformer",
)
CONTEXT_POOLS = ("mean", "attention")
VALUE_MODES = ("shared", "separate", "none")
# "vla": separate vision encoder + projector + causal LM; "vlm": one transformers
# image-text-to-text model (``vla_ray.models.vlm``)
# "openvla": an OpenVLA checkpoint in its published layout (``vlm_path``)
# "smolvla", "pi0": a LeRobot SmolVLA / pi0 checkpoint (``vlm_path``), its expert as the head
BACKBONES = ("vla", "vlm", "openvla", "smolvla", "pi0")
DTYPES = ("float32", "bfloat16")
# torch.autocast of the trunk's forward (training and inference): "none" or "bf16"
AUTOCASTS = ("none", "bf16")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, what is allowed and what was given."""


def check_choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(
            f"{field_name}: unknown name {value!r}; valid names are {', '.join(allowed)}"
        )


@dataclass
class VLAConfig:
    """Everything needed to rebuild a VLA: component names, their configs and the I/O shapes.

    ``vision_path`` / ``llm_path`` / ``tokenizer_path`` are ``from_pretrained`` paths or hub ids;
    when None the parts are built from ``vision_config`` / ``llm_config`` (tiny defaults).
    """

    # I/O contract
    image_size: tuple[int, int] = (64, 64)
    # cameras per observation: 1 reads ``image`` (B, H, W, 3); N > 1 reads ``images``
    # (B, N, H, W, 3): the default trunk encodes each camera with the shared encoder and
    # projector and tells them apart by a learned camera embedding; backbone="vlm" gives the
    # VLM N images
    num_cameras: int = 1
    state_dim: int = 4
    action_dim: int = 2
    chunk_size: int = 1
    instruction_max_length: int = 16
    action_low: float = -1.0
    action_high: float = 1.0
    # trunk: "vla" (the parts below) or "vlm" (an integrated image-text-to-text model: a
    # from_pretrained ``vlm_path``, or a small ``vlm_family`` config with ``vlm_config`` overrides)
    backbone: str = "vla"
    vlm_family: str | None = None
    vlm_path: str | None = None
    vlm_config: dict[str, Any] = field(default_factory=dict)
    # the image processor's from_pretrained directory (set when loading a saved VLA)
    image_processor_path: str | None = None
    # weights of the trunk's transformers models; gradient checkpointing in training passes
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    # the trunk's forward under torch.autocast ("bf16": bfloat16 matmuls on fp32 weights, any
    # backbone, learner and inference); the features it returns stay float32
    autocast: str = "none"
    # vision ("none": no image input, the trunk sees instruction + state only)
    vision: str = "cnn"
    vision_path: str | None = None
    vision_config: dict[str, Any] = field(default_factory=dict)
    # projector
    projector: str = "attention"
    projector_tokens: int = 8
    projector_config: dict[str, Any] = field(default_factory=dict)
    # language model
    llm_path: str | None = None
    llm_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_path: str | None = None
    lora: dict[str, Any] | None = None
    # action head
    head: str = "gaussian"
    head_config: dict[str, Any] = field(default_factory=dict)
    # what trains
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    # feed the proprioceptive state to the head beside the trunk features
    state_skip: bool = True
    # standardise the state inside the model, ``(state - state_mean) / state_std`` (e.g. an
    # offline dataset's statistics, ``vla_ray.data.stats.add_state_normalisation``); None: raw state
    state_mean: list[float] | None = None
    state_std: list[float] | None = None
    # feed the projector's (instruction-conditioned) vision tokens to the head as well
    vision_skip: bool = False
    # how the instruction prefix is pooled into one context vector: masked "mean", or
    # "attention" with a learned query (starts as the mean; can learn to weight the key words)
    context_pool: str = "mean"
    # driving sensors beyond the camera (backbone="vla"): observation key -> encoder spec, e.g.
    # {"lidar": {"encoder": "pointnet", "tokens": 4}, "imu": {"encoder": "conv1d"}}; defaults and
    # shapes in ``vla_ray.models.sensors.SENSOR_KINDS``. Their tokens, fused by ``fusion``
    # (concat, self_attention, cross_attention, gated) with ``fusion_config`` (e.g.
    # sensor_dropout), join the sequence after the vision tokens.
    sensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    fusion: str = "concat"
    fusion_config: dict[str, Any] = field(default_factory=dict)
    # memory over the trunk's per-step features (``vla_ray.models.temporal``): "none", "gru" (a
    # recurrent state) or "transformer" (attention over a window of the last ``history`` steps),
    # with ``temporal_config`` (history, hidden, layers, heads). The state travels through
    # RLlib's stateful RLModule API (STATE_IN/STATE_OUT, reset at episode starts; training on
    # sequences of ``history`` steps). Algorithms that train it: ppo and appo (their
    # ``TEMPORAL`` flag); the others refuse it (``vla_ray.run_spec.check_temporal_support``;
    # SAC, CQL and IQL also in their module). A temporal VLA acts through ``predict_step``.
    temporal: str = "none"
    temporal_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]
        check_choice("vision", self.vision, VISION_CHOICES)
        check_choice("projector", self.projector, PROJECTORS)
        check_choice("head", self.head, ACTION_HEADS)
        check_choice("context_pool", self.context_pool, CONTEXT_POOLS)
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("autocast", self.autocast, AUTOCASTS)
        self._check_backbone()
        for name in ("state_dim", "action_dim", "chunk_size", "instruction_max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "state_dim" else 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.vision == "none":
            if self.state_dim == 0:
                raise ConfigError(
                    "vision: 'none' (no image input) needs a proprioceptive state; got state_dim=0"
                )
            if self.vision_skip:
                raise ConfigError("vision_skip: there are no vision tokens with vision='none'")
        self._check_state_normalisation()
        self._check_sensors()
        self._check_temporal()
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise ConfigError(f"image_size: expected (H, W) with H, W >= 8, got {self.image_size}")
        if self.projector_tokens < 1:
            raise ConfigError(f"projector_tokens: expected >= 1, got {self.projector_tokens}")
        if not self.action_low < self.action_high:
            raise ConfigError(
                f"action_low/action_high: expected low < high, got {self.action_low}, {self.action_high}"
            )

    def _check_backbone(self) -> None:
        if not isinstance(self.num_cameras, int) or self.num_cameras < 1:
            raise ConfigError(f"num_cameras: expected a positive integer, got {self.num_cameras!r}")
        if self.backbone == "vla":
            given = [
                k
                for k in ("vlm_family", "vlm_path", "image_processor_path")
                if getattr(self, k) is not None
            ]
            if self.vlm_config:
                given.append("vlm_config")
            if self.dtype != "float32":
                given.append("dtype")
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: only used with backbone='vlm' (dtype also with "
                    "'openvla'); the default trunk trains in float32"
                )
            if self.num_cameras > 1 and self.vision == "none":
                raise ConfigError(
                    f"num_cameras: {self.num_cameras} cameras need a vision encoder; got "
                    "vision='none'"
                )
            return
        from vla_ray.models.vlm import VLM_FAMILIES, family_of_directory

        if self.backbone == "openvla":
            self._check_openvla()
            return
        if self.backbone in ("smolvla", "pi0"):
            from vla_ray.models.lerobot_vla import check_config

            check_config(self)
            return
        if self.vision == "none":
            raise ConfigError("backbone: 'vlm' needs image observations; got vision='none'")
        if self.vision_skip:
            raise ConfigError("vision_skip: not available with backbone='vlm'")
        if self.vlm_path is not None and Path(self.vlm_path).is_dir():
            family = family_of_directory(self.vlm_path)
            if self.vlm_family not in (None, family):
                raise ConfigError(
                    f"vlm_family: {self.vlm_family!r} does not match vlm_path {self.vlm_path} "
                    f"(a {family!r} checkpoint)"
                )
            self.vlm_family = family
        if self.vlm_family is None:
            raise ConfigError(
                "vlm_family: backbone='vlm' needs vlm_path (a from_pretrained directory) or "
                f"vlm_family, one of {', '.join(VLM_FAMILIES)}"
            )
        check_choice("vlm_family", self.vlm_family, VLM_FAMILIES)

    def _check_openvla(self) -> None:
        if self.vlm_path is None or not (Path(self.vlm_path) / "config.json").is_file():
            raise ConfigError(
                f"vlm_path: backbone='openvla' needs an OpenVLA checkpoint directory "
                f"(config.json + safetensors), got {self.vlm_path!r}"
            )
        given = [k for k in ("vlm_family", "image_processor_path") if getattr(self, k)]
        given += ["vlm_config"] if self.vlm_config else []
        given += ["num_cameras"] if self.num_cameras != 1 else []
        given += ["vision_skip"] if self.vision_skip else []
        if given:
            raise ConfigError(f"{', '.join(given)}: not used with backbone='openvla'")

    def _check_sensors(self) -> None:
        if not self.sensors:
            if self.fusion != "concat" or self.fusion_config:
                raise ConfigError(
                    f"fusion/fusion_config: only used with sensors; got fusion={self.fusion!r}, "
                    f"fusion_config={self.fusion_config!r} and no sensors"
                )
            return
        if self.backbone != "vla":
            raise ConfigError(
                f"sensors: only available with backbone='vla', got backbone={self.backbone!r}"
            )
        from vla_ray.models.sensors import check_fusion, normalise_sensors

        self.sensors = normalise_sensors(self.sensors)
        check_fusion(self.fusion, self.fusion_config)

    def _check_temporal(self) -> None:
        from vla_ray.models.temporal import check_temporal

        check_temporal(self.temporal, self.temporal_config)
        if self.temporal != "none" and self.backbone in ("smolvla", "pi0"):
            raise ConfigError(
                f"temporal: {self.temporal!r} needs a head that reads trunk features; the "
                f"{self.backbone} backbone's expert reads the VLM itself (use backbone='vla', "
                "'vlm' or 'openvla', or temporal='none')"
            )

    def _check_state_normalisation(self) -> None:
        if (self.state_mean is None) != (self.state_std is None):
            raise ConfigError("state_mean/state_std: give both, or neither")
        if self.state_mean is None:
            return
        mean = [float(v) for v in self.state_mean]
        std = [float(v) for v in self.state_std]
        if len(mean) != self.state_dim or len(std) != self.state_dim:
            raise ConfigError(
                f"state_mean/state_std: expected {self.state_dim} values each (state_dim), "
                f"got {len(mean)} and {len(std)}"
            )
        if not all(math.isfinite(v) for v in mean) or not all(
            math.isfinite(v) and v > 0 for v in std
        ):
            raise ConfigError(
                "state_mean/state_std: expected finite means and positive finite stds, "
                f"got mean={mean}, std={std}"
            )
        self.state_mean, self.state_std = mean, std

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLAConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown VLA config key(s) {unknown}; valid keys are {', '.join(sorted(names))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> VLAConfig:
        """Read from JSON."""
        return cls.from_dict(json.loads(Path(path).read_text()))
