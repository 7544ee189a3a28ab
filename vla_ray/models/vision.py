"""Vision encoders: uint8 images (B, H, W, 3) -> patch tokens (B, N, D)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vla_ray.config import VISION_ENCODERS, check_choice

# Per-family pixel normalisation (mean, std) as in the families' image processors.
_NORM = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cnn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# Tiny configs for building the transformers encoders locally (tests, CPU RL).
TINY_HF_VISION = {
    "siglip": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=8,
    ),
    "clip": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=8,
    ),
    "dinov2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=8,
        mlp_ratio=2,
    ),
}


def images_to_float(images: torch.Tensor, family: str) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = _NORM[family]
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _same_contents(a: torch.Tensor, kept: tuple[torch.Tensor, int]) -> bool:
    """Whether ``a`` views the storage, layout and in-place version of ``kept`` (a tensor and its
    ``_version`` then; holding the tensor keeps its storage from being reused meanwhile)."""
    t, version = kept
    return (a.data_ptr(), a.shape, a.stride(), a.dtype, a._version) == (
        t.data_ptr(),
        t.shape,
        t.stride(),
        t.dtype,
        version,
    )


RECON_SIZE = 16  # side of the image the keypoint decoder reconstructs (recon_coeff > 0)


class CNNEncoder(nn.Module):
    """Small conv net for fast RL from pixels: CoordConv input and a patchify stem.

    ``layers`` lists ``(out_channels, kernel, stride)``; the default maps 64x64 images to an 8x8
    feature grid with about 1.3M multiply-adds per image. ``tokens="patches"`` returns one token
    per grid cell (+ learned position embedding); ``tokens="keypoints"`` returns one token per
    channel, the spatial-softmax expected (x, y) of that channel's activation (Levine et al. 2016,
    as in Diffusion Policy's vision encoder) plus a learned channel embedding.

    ``film=True`` conditions the feature map that enters the last conv layer on the instruction
    (FiLM, Perez et al. 2018; the gated attention of Chaplot et al. 2018): a per-channel scale
    and shift computed from the ``context`` vector passed to ``forward``, initialised to the
    identity. The last layer then sees only what the instruction asks about, so keypoints can
    point at "the red target" directly.

    ``recon_coeff > 0`` (keypoints only) adds a deep-spatial-autoencoder decoder (Finn et al.
    2016): an MLP maps the keypoints to the image at 16x16 with the batch's mean image
    subtracted (what moves from frame to frame: the arm, the targets). ``reconstruction_loss``
    is that error relative to predicting the mean image, times ``recon_coeff``; a learner adds it
    to its loss so every object stays decodable from the keypoints while RL shapes them.
    """

    family = "cnn"

    def __init__(
        self,
        image_size: tuple[int, int],
        layers: tuple[tuple[int, int, int], ...] = ((32, 4, 4), (32, 3, 2), (32, 3, 1)),
        tokens: str = "patches",
        film: bool = False,
        context_dim: int | None = None,
        recon_coeff: float = 0.0,
    ):
        super().__init__()
        check_choice("vision_config.tokens", tokens, ("patches", "keypoints"))
        if recon_coeff and (tokens != "keypoints" or film):
            raise ValueError(
                "vision_config.recon_coeff: the reconstruction decodes instruction-free keypoints; "
                f"needs tokens='keypoints' and film=False, got tokens={tokens!r}, film={film}"
            )
        if film and not context_dim:
            raise ValueError("vision_config.film: needs the instruction context size (context_dim)")
        if film and len(layers) < 2:
            raise ValueError(
                f"vision_config.film: needs at least 2 conv layers, got layers={layers!r}"
            )
        self.tokens = tokens
        h, w = image_size
        mods: list[nn.Module] = []
        in_ch = 5  # RGB + (x, y) coordinates
        for out_ch, kernel, stride in layers:
            pad = (kernel - stride + 1) // 2 if kernel > stride else 0
            mods += [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad), nn.GELU()]
            in_ch = out_ch
        self.net = nn.Sequential(*mods)
        self.film: nn.Linear | None = None
        if film:
            film_ch = layers[-2][0]
            self.film = nn.Linear(int(context_dim), 2 * film_ch)  # -> (scale, shift)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)
        with torch.no_grad():
            grid = self.net(torch.zeros(1, 5, h, w)).shape[-2:]
        self.hidden_size = in_ch
        if tokens == "patches":
            self.num_tokens = int(grid[0] * grid[1])
            # learned position embedding of each output patch
            self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, in_ch))
        else:
            self.num_tokens = in_ch
            gy, gx = torch.meshgrid(
                torch.linspace(-1, 1, grid[0]), torch.linspace(-1, 1, grid[1]), indexing="ij"
            )
            self.register_buffer(
                "grid_xy", torch.stack([gx.flatten(), gy.flatten()], -1), persistent=False
            )
            self.kp_proj = nn.Linear(3, in_ch)  # (x, y, peak activation) -> token
            # channel identity, at the scale of the projected coordinates so the pooling attention
            # can tell channels apart from the start
            self.pos = nn.Parameter(torch.randn(1, in_ch, in_ch) * 0.5)
        self.recon_coeff = float(recon_coeff)
        self.recon: nn.Module | None = None
        self._last_keypoints: tuple[tuple[torch.Tensor, int], torch.Tensor] | None = None
        if self.recon_coeff:
            if h % RECON_SIZE or w % RECON_SIZE:
                raise ValueError(
                    f"vision_config.recon_coeff: image size {h}x{w} is not a multiple of "
                    f"{RECON_SIZE}"
                )
            self.recon = nn.Sequential(
                nn.Linear(3 * in_ch, 256), nn.GELU(), nn.Linear(256, 3 * RECON_SIZE**2)
            )

    def feature_map(
        self, images: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last conv layer's output (B, C, h, w) for uint8 or float images (B, H, W, 3)."""
        x = images_to_float(images, "cnn")
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        if self.film is None:
            return self.net(x)
        if context is None:
            raise ValueError("CNNEncoder(film=True): forward needs the instruction `context`")
        x = self.net[:-2](x)
        scale, shift = self.film(context.to(x.dtype)).chunk(2, dim=-1)
        x = x * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.net[-2:](x)

    def spatial_keypoints(
        self, feature_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per channel of a ``tokens="keypoints"`` encoder's feature map: the spatial softmax
        (B, C, h*w), its expected (x, y) in [-1, 1] (B, C, 2) and the peak activation (B, C, 1)."""
        flat = feature_map.flatten(2)
        attn = flat.softmax(-1)
        return attn, attn @ self.grid_xy, flat.amax(-1, keepdim=True)

    def __getstate__(self) -> dict[str, Any]:
        # the kept keypoints belong to one step's autograd graph: never copied or pickled
        return {**super().__getstate__(), "_last_keypoints": None}

    def reconstruction_loss(self, images: torch.Tensor) -> torch.Tensor:
        """``recon_coeff`` x the keypoints' reconstruction error of the (B, H, W, 3) images at
        16x16, mean image of the batch subtracted, relative to predicting that mean image.

        The keypoints of a training-mode ``forward`` on these same images (same storage, shape,
        strides, dtype and in-place version) are reused, so a learner's policy pass and this loss share one CNN pass."""
        if self.recon is None:
            raise ValueError("reconstruction_loss: this encoder has recon_coeff=0 (no decoder)")
        last, self._last_keypoints = self._last_keypoints, None
        if last is not None and _same_contents(images, last[0]) and torch.is_grad_enabled():
            keypoints = last[1]
        else:
            _, xy, peak = self.spatial_keypoints(self.feature_map(images))
            keypoints = torch.cat([xy, peak], -1)
        pred = self.recon(keypoints.flatten(1))
        x = images_to_float(images, "cnn")
        target = nn.functional.adaptive_avg_pool2d(x, RECON_SIZE).flatten(1)
        target = target - target.mean(0, keepdim=True)
        err = (pred - target).pow(2).mean()
        energy = float(target.pow(2).mean())  # 0 for one image or identical ones: error as is
        return self.recon_coeff * (err / energy if energy > 1e-6 else err)

    def forward(self, images: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.feature_map(images, context)
        if self.tokens == "patches":
            return x.flatten(2).transpose(1, 2) + self.pos
        _, xy, peak = self.spatial_keypoints(x)
        keypoints = torch.cat([xy, peak], -1)
        if self.recon is not None and self.training and torch.is_grad_enabled():
            # kept for this batch's reconstruction_loss (a learner's next call), in the same graph
            self._last_keypoints = ((images, images._version), keypoints)
        return self.kp_proj(keypoints) + self.pos


class FoldedStemCNN(nn.Module):
    """A ``CNNEncoder``'s inference function with its input normalisation and CoordConv
    channels folded into the first convolution (for export; same outputs up to float rounding).

    The first conv is linear and zero-padded, so on ``[(x / 255 - mean) / std, coords]`` it equals
    a conv of the raw RGB values with rescaled weights plus a constant map (the bias, the
    normalisation's shift and the coordinate channels): the exported graph then has no per-call
    divide, subtract, coordinate broadcast or concatenation, and a 3-channel first conv.
    """

    def __init__(self, encoder: CNNEncoder):
        super().__init__()
        self.encoder = encoder
        first = encoder.net[0]
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _NORM[encoder.family])
        self.stem = nn.Conv2d(
            3,
            first.out_channels,
            first.kernel_size,
            stride=first.stride,
            padding=first.padding,
            bias=False,
        )
        with torch.no_grad():
            self.stem.weight.copy_(first.weight[:, :3] / (255.0 * std.view(1, 3, 1, 1)))
            h, w = encoder.coords.shape[-2:]
            shift = (-mean / std).expand(1, 3, h, w)
            offset = first(torch.cat([shift, encoder.coords.to(shift.dtype)], dim=1))
        self.register_buffer("offset", offset, persistent=False)
        self.num_tokens = encoder.num_tokens
        self.hidden_size = encoder.hidden_size
        self.film = encoder.film

    def feature_map(
        self, images: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``CNNEncoder.feature_map`` of uint8 (B, H, W, 3) images."""
        net = self.encoder.net
        x = self.stem(images.permute(0, 3, 1, 2).to(self.offset.dtype)) + self.offset
        if self.film is None:
            return net[1:](x)
        if context is None:
            raise ValueError("CNNEncoder(film=True): forward needs the instruction `context`")
        x = net[1:-2](x)
        scale, shift = self.film(context.to(x.dtype)).chunk(2, dim=-1)
        x = x * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
        return net[-2:](x)

    def forward(self, images: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        enc = self.encoder
        x = self.feature_map(images, context)
        if enc.tokens == "patches":
            return x.flatten(2).transpose(1, 2) + enc.pos
        _, xy, peak = enc.spatial_keypoints(x)
        return enc.kp_proj(torch.cat([xy, peak], -1)) + enc.pos


class HFVisionEncoder(nn.Module):
    """A transformers vision tower (SigLIP, CLIP or DINOv2), built from config or from_pretrained."""

    def __init__(
        self,
        family: str,
        image_size: tuple[int, int],
        path: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        import transformers as tf

        self.family = family
        model_cls = {
            "siglip": tf.SiglipVisionModel,
            "clip": tf.CLIPVisionModel,
            "dinov2": tf.Dinov2Model,
        }[family]
        if path is not None:
            self.model = model_cls.from_pretrained(path)
        else:
            cfg_cls = {
                "siglip": tf.SiglipVisionConfig,
                "clip": tf.CLIPVisionConfig,
                "dinov2": tf.Dinov2Config,
            }[family]
            kwargs = {**TINY_HF_VISION[family], "image_size": max(image_size), **(config or {})}
            self.model = model_cls(cfg_cls(**kwargs))
        cfg = self.model.config
        self.input_size = int(cfg.image_size)
        self.hidden_size = int(cfg.hidden_size)
        grid = self.input_size // int(cfg.patch_size)
        self.num_tokens = grid * grid + (0 if family == "siglip" else 1)  # CLIP/DINOv2 add [CLS]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images_to_float(images, self.family)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear")
        return self.model(pixel_values=x).last_hidden_state

    def config_dict(self) -> dict[str, Any]:
        """The full transformers config, so the encoder can be rebuilt without the source path."""
        return self.model.config.to_dict()


def build_vision_encoder(
    name: str,
    image_size: tuple[int, int],
    path: str | None = None,
    config: dict[str, Any] | None = None,
    context_dim: int | None = None,
) -> nn.Module:
    """Build a vision encoder by name (see ``VISION_ENCODERS``).

    ``context_dim`` is the instruction context size, used by encoders that condition on it
    (``cnn`` with ``film=True``).
    """
    check_choice("vision", name, VISION_ENCODERS)
    if name == "cnn":
        if path is not None:
            raise ValueError("vision_path: the 'cnn' encoder has no pretrained weights to load")
        return CNNEncoder(image_size, context_dim=context_dim, **(config or {}))
    if (config or {}).get("film"):
        raise ValueError(f"vision_config.film: only the 'cnn' encoder supports FiLM, not {name!r}")
    return HFVisionEncoder(name, image_size, path=path, config=config)
