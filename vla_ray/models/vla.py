"""The VLA: vision encoder + projector + language model trunk, and an action head.

Sequence fed to the language model::

    [BOS] instruction | projected vision tokens | fused sensor tokens | state | action query
    '--- prefix ----'   '------------------------- suffix --------------------------'

The instruction prefix is the same for every step of an episode, so its key/value cache is
computed once per distinct instruction in a batch and reused for every sample that shares it;
outside of autograd it is also memoised across calls until the language model's weights change.
The instruction is also pooled (mean of the prefix's last hidden states) into a context vector
that conditions the projector's queries, so the vision tokens are instruction-aware.
Driving sensors (``config.sensors``: lidar, radar, imu, ego, depth; ``vla_ray.models.sensors``)
change every step, so their fused tokens sit in the suffix beside the vision tokens.
The trunk's features are the last hidden state of the action query (plus, optionally, the raw
proprioceptive state), which every action head and value head reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_ray.config import ConfigError, VLAConfig
from vla_ray.fsutil import replace_dir
from vla_ray.model_card import CONFIG_NAME, META_NAME, WEIGHTS_NAME, write_model_card
from vla_ray.models.heads import ActionHead, build_head
from vla_ray.models.language import (
    apply_lora,
    build_language_model,
    cache_keyword,
    decoder_of,
    enable_activation_checkpointing,
    output_cache,
)
from vla_ray.models.lora import autocast, is_adapter_param
from vla_ray.models.prefix import CachedPrefixTrunk, Prefix
from vla_ray.models.projectors import build_projector
from vla_ray.models.sensors import SensorStack, optional_sensor_keys, sensor_obs_shapes
from vla_ray.models.temporal import TemporalModule, build_temporal
from vla_ray.models.vision import HFVisionEncoder, build_vision_encoder
from vla_ray.tokenizer import encode_instructions, load_tokenizer, save_tokenizer

OBS_KEYS = ("image", "state", "instruction", "instruction_mask")
TOKENIZER_DIR = "tokenizer"
IMAGE_PROCESSOR_DIR = "image_processor"
# VLAConfig fields that define the trunk's weights (what a pretrained VLM fixes).
TRUNK_KEYS = (
    "vision",
    "vision_path",
    "vision_config",
    "projector",
    "projector_tokens",
    "projector_config",
    "llm_path",
    "llm_config",
)
# vision_config keys that add training-only parts (initialised fresh) around an unchanged encoder:
# when a pretrained VLM's trunk replaces the RL config's, these stay as the RL config sets them.
RL_VISION_KEYS = ("recon_coeff",)
# Trunk parameters only RL uses (state projection, action query, keypoint decoder): a pretrained
# VLM's copies (untrained, or absent) are not loaded; they start fresh.
RL_ONLY_PREFIXES = (
    "trunk.state_proj",
    "trunk.query",
    "trunk.vision.recon.",
    "trunk.sensors.",
    "trunk.camera_embed",
)


class ObservationError(ValueError):
    """An observation does not match the model's observation contract."""


def expected_obs_shapes(config: VLAConfig) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each observation field."""
    shapes: dict[str, tuple[int, ...]] = {}
    if config.vision != "none":
        h, w = config.image_size
        if config.num_cameras > 1:
            shapes["images"] = (config.num_cameras, h, w, 3)
        else:
            shapes["image"] = (h, w, 3)
    shapes["instruction"] = (config.instruction_max_length,)
    shapes["instruction_mask"] = (config.instruction_max_length,)
    if config.state_dim > 0:
        shapes["state"] = (config.state_dim,)
    shapes.update(sensor_obs_shapes(config.sensors))
    return shapes


def validate_observation(obs: Mapping[str, Any], config: VLAConfig) -> None:
    """Raise ObservationError naming the field, the expected and the given shape on a mismatch."""
    if not isinstance(obs, Mapping):
        raise ObservationError(
            f"observation: expected a dict with keys {sorted(expected_obs_shapes(config))}, "
            f"got {type(obs).__name__}"
        )
    batch_shape = None
    shapes = expected_obs_shapes(config)
    for key, shape in shapes.items():
        if key not in obs:
            raise ObservationError(
                f"observation field {key!r} is missing: expected per-sample shape {shape}; "
                f"given fields: {sorted(obs)}"
            )
        given = tuple(obs[key].shape)
        if len(given) != len(shape) + 1 or given[1:] != shape:
            raise ObservationError(
                f"observation field {key!r}: expected shape (B, {', '.join(map(str, shape))}), "
                f"got {given}"
            )
        if batch_shape is None:
            batch_shape = given[0]
        elif given[0] != batch_shape:
            raise ObservationError(
                f"observation field {key!r}: batch size {given[0]} differs from {batch_shape}"
            )
    for key, shape in optional_sensor_keys(config.sensors).items():  # validity masks and flags
        if key in obs and tuple(obs[key].shape) != (batch_shape, *shape):
            expected = f"(B, {', '.join(map(str, shape))})" if shape else "(B,)"
            raise ObservationError(
                f"observation field {key!r}: expected shape {expected} with B={batch_shape}, "
                f"got {tuple(obs[key].shape)}"
            )
    for key in ("image", "images"):
        if key in shapes and obs[key].dtype not in (torch.uint8, np.uint8):
            raise ObservationError(
                f"observation field {key!r}: expected dtype uint8, got {obs[key].dtype}"
            )


class VLATrunk(CachedPrefixTrunk):
    """Vision encoder, projector and language model: observation dict -> features (B, F)."""

    def __init__(self, config: VLAConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.lm = build_language_model(config.llm_path, config.llm_config, vocab_size)
        if config.lora:
            self.lm = apply_lora(self.lm, config.lora)
        d = int(self.lm.config.hidden_size)
        self.hidden_size = d
        self.vision: nn.Module | None = None
        self.projector: nn.Module | None = None
        if config.vision != "none":
            self.vision = build_vision_encoder(
                config.vision, config.image_size, config.vision_path, config.vision_config, d
            )
            self.projector = build_projector(
                config.projector,
                self.vision.hidden_size,
                d,
                self.vision.num_tokens,
                config.projector_tokens,
                **config.projector_config,
            )
            self.vision.requires_grad_(not config.freeze_vision)
            self.projector.requires_grad_(not config.freeze_projector)
        # several cameras: one shared encoder; a learned embedding per camera on its tokens
        self.camera_embed = (
            nn.Parameter(torch.randn(config.num_cameras, 1, d) * 0.02)
            if self.vision is not None and config.num_cameras > 1
            else None
        )
        self._vision_conditioned = bool(getattr(self.vision, "film", None) is not None)
        # driving sensors (lidar, radar, imu, ego, depth): fused tokens after the vision tokens
        self.sensors: SensorStack | None = None
        if config.sensors:
            self.sensors = SensorStack(config.sensors, config.fusion, config.fusion_config, d)
        self.bos = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.state_proj = nn.Linear(config.state_dim, d) if config.state_dim > 0 else None
        # state standardisation from the config (not in the weights: the config carries it)
        mean, std = config.state_mean, config.state_std
        self.register_buffer(
            "state_mean", None if mean is None else torch.tensor(mean), persistent=False
        )
        self.register_buffer(
            "state_std", None if std is None else torch.tensor(std), persistent=False
        )
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        # attention pooling of the prefix; zero query = uniform weights = the masked mean at init
        self.context_query = (
            nn.Parameter(torch.zeros(d)) if config.context_pool == "attention" else None
        )
        self.feature_dim = (
            d
            + (config.state_dim if config.state_skip else 0)
            + (d * self.projector.num_tokens * config.num_cameras if config.vision_skip else 0)
        )
        if not config.lora:  # with LoRA, peft has frozen the base weights: only adapters train
            self.lm.requires_grad_(not config.freeze_llm)
        self._checkpointing = bool(config.gradient_checkpointing)
        if self._checkpointing:
            lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
            enable_activation_checkpointing(lm)

    # ---- instruction prefix -------------------------------------------------------------------
    def _prefix_params(self) -> list[nn.Parameter]:
        params = [self.bos, *self.lm.parameters()]
        if self.context_query is not None:
            params.append(self.context_query)
        return params

    def _encode_prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> Prefix:
        """Key/values and pooled context of [BOS] + instruction for each row of ``ids`` (U, L)."""
        decoder = decoder_of(self.lm)
        emb = decoder.get_input_embeddings()(ids)
        emb = torch.cat([self.bos.expand(ids.shape[0], -1, -1).to(emb.dtype), emb], dim=1)
        full_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        pos = (full_mask.cumsum(1) - 1).clamp(min=0)
        out = decoder(inputs_embeds=emb, attention_mask=full_mask, position_ids=pos, use_cache=True)
        h = out.last_hidden_state
        if self.context_query is None:
            m = full_mask.unsqueeze(-1).to(h.dtype)
            context = (h * m).sum(1) / m.sum(1)
        else:
            scores = (h @ self.context_query.to(h.dtype)) / math.sqrt(h.shape[-1])
            scores = scores.masked_fill(full_mask == 0, float("-inf"))
            context = (scores.softmax(-1).unsqueeze(-1) * h).sum(1)
        cache = output_cache(out)  # None when checkpointing under autograd (see ``_full``)
        kv = [] if cache is None else [(layer.keys, layer.values) for layer in cache.layers]
        return Prefix(kv, context)

    # ---- full trunk ---------------------------------------------------------------------------
    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Features (B, F); each distinct instruction prefix is encoded once (and memoised)."""
        validate_observation(obs, self.config)
        prefix = self.prefix(obs["instruction"], obs["instruction_mask"].long())
        if self._checkpointing and self.training and torch.is_grad_enabled():
            return self._full(obs, prefix)
        return self._suffix(obs, prefix)

    def forward_functional(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The same features as ``forward`` as a plain function of the inputs: every row's
        prefix is encoded in the graph, with no deduplication and no memo (for export)."""
        mask = obs["instruction_mask"].long()
        prefix = self._encode_prefix(obs["instruction"].long() * mask, mask)
        return self._suffix(obs, prefix)

    def _suffix_tokens(
        self, obs: Mapping[str, torch.Tensor], context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Vision, fused sensor, state and action-query token embeddings (B, S, d), the
        (standardised) state and the vision tokens."""
        B = obs["instruction_mask"].shape[0]
        parts = []
        vis = None
        if self.vision is not None:
            n = self.config.num_cameras
            image = obs["images"].flatten(0, 1) if n > 1 else obs["image"]  # (B * N, H, W, 3)
            context = context.to(image.device)
            if n > 1:
                context = context.repeat_interleave(n, dim=0)
            tokens = self.vision(image, context) if self._vision_conditioned else self.vision(image)
            vis = self.projector(tokens, context)
            if n > 1:  # (B * N, T, d) -> (B, N * T, d), camera by camera
                vis = (vis.unflatten(0, (B, n)) + self.camera_embed.to(vis.dtype)).flatten(1, 2)
            parts.append(vis)
        if self.sensors is not None:
            parts.append(self.sensors(obs, vis, context.to(self.bos.device)))
        state = None
        if self.state_proj is not None:
            state = obs["state"].float()
            if self.state_mean is not None:
                state = (state - self.state_mean) / self.state_std
            parts.append(self.state_proj(state)[:, None])
        parts.append(self.query.expand(B, -1, -1))
        return torch.cat(parts, dim=1), state, vis

    def _suffix(self, obs: Mapping[str, torch.Tensor], prefix: Prefix) -> torch.Tensor:
        """Vision, state and action-query tokens run over the encoded prefix -> features."""
        from transformers import DynamicCache

        mask = obs["instruction_mask"].long()
        B = mask.shape[0]
        suffix, state, vis = self._suffix_tokens(obs, prefix.context)
        cache = DynamicCache()
        for li, (k, v) in enumerate(prefix.kv):
            cache.update(k, v, li)
        S = suffix.shape[1]
        prefix_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        full_mask = torch.cat(
            [prefix_mask, torch.ones(B, S, dtype=mask.dtype, device=mask.device)], 1
        )
        start = prefix_mask.sum(1, keepdim=True)
        pos = start + torch.arange(S, device=mask.device)[None]
        decoder = decoder_of(self.lm)
        out = decoder(
            inputs_embeds=suffix.to(prefix.kv[0][0].dtype),
            attention_mask=full_mask,
            position_ids=pos,
            use_cache=True,
            **{cache_keyword(decoder): cache},
        )
        return self._features(out.last_hidden_state, state, vis)

    def _full(self, obs: Mapping[str, torch.Tensor], prefix: Prefix) -> torch.Tensor:
        """The same features as ``_suffix`` with the whole sequence in one decoder pass: under
        gradient checkpointing the decoder keeps no key/value cache (a recomputed layer would
        write it twice), so only the prefix's pooled context is reused."""
        mask = obs["instruction_mask"].long()
        ids = obs["instruction"].long() * mask
        B = mask.shape[0]
        suffix, state, vis = self._suffix_tokens(obs, prefix.context)
        decoder = decoder_of(self.lm)
        emb = decoder.get_input_embeddings()(ids)
        emb = torch.cat([self.bos.expand(B, -1, -1).to(emb.dtype), emb, suffix.to(emb.dtype)], 1)
        prefix_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        S = suffix.shape[1]
        full_mask = torch.cat([prefix_mask, torch.ones_like(mask[:, :1]).expand(-1, S)], dim=1)
        start = prefix_mask.sum(1, keepdim=True)
        pos = torch.cat(
            [
                (prefix_mask.cumsum(1) - 1).clamp(min=0),
                start + torch.arange(S, device=mask.device)[None],
            ],
            dim=1,
        )
        out = decoder(
            inputs_embeds=emb, attention_mask=full_mask, position_ids=pos, use_cache=False
        )
        return self._features(out.last_hidden_state, state, vis)

    def _features(
        self, hidden: torch.Tensor, state: torch.Tensor | None, vis: torch.Tensor | None
    ) -> torch.Tensor:
        feats = [hidden[:, -1].float()]
        if self.config.vision_skip and vis is not None:
            feats.append(vis.flatten(1).float())
        if self.config.state_skip and state is not None:
            feats.append(state)
        return torch.cat(feats, dim=-1)


class VLA(nn.Module):
    """A complete vision-language-action policy, usable without RLlib.

    ``save_pretrained(dir)`` writes ``vla_config.json``, ``model.safetensors`` and the tokenizer;
    ``VLA.from_pretrained(dir)`` rebuilds it without the original weight sources.
    """

    def __init__(self, config: VLAConfig):
        super().__init__()
        self.config = config
        self.tokenizer = load_vla_tokenizer(config)
        self.trunk = build_trunk(config, self.tokenizer)
        if config.backbone in ("smolvla", "pi0"):  # the checkpoint's flow-matching expert
            from vla_ray.models.lerobot_vla import lerobot_head

            self.head: ActionHead = lerobot_head(self.trunk, config)
            self.tokenizer = self.trunk.policy.tokenizer
            self.temporal = None
            return
        # memory over the per-step features (config.temporal): the heads read its output
        self.temporal: TemporalModule | None = build_temporal(
            config.temporal, config.temporal_config, self.trunk.feature_dim
        )
        self.head = build_head(
            config.head,
            self.trunk.feature_dim if self.temporal is None else self.temporal.out_dim,
            config.action_dim,
            config.chunk_size,
            config.action_low,
            config.action_high,
            **config.head_config,
        )

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Trunk features (B, F)."""
        return self.features(obs)

    def features(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Trunk features (B, F), float32, the trunk run under ``config.autocast``."""
        return run_trunk(self.trunk, self.config, obs)

    @torch.no_grad()
    def predict(self, obs: Mapping[str, Any], deterministic: bool = True) -> torch.Tensor:
        """Action chunks (B, K, A) for a batch of observations (tensors or numpy arrays).
        A temporal VLA needs its state: ``predict_step``."""
        if self.temporal is not None:
            raise ConfigError(
                f"temporal: this VLA has memory (temporal={self.config.temporal!r}); predict() "
                "is per observation. Use predict_step(obs, state) or the RLModule"
            )
        obs_t = {
            k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v
            for k, v in obs.items()
        }
        return self.head.predict(self.features(obs_t), deterministic=deterministic)

    @torch.no_grad()
    def predict_step(
        self,
        obs: Mapping[str, Any],
        state: Mapping[str, torch.Tensor] | None = None,
        deterministic: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Action chunks (B, K, A) for one step of B episodes and the state after it; ``state``
        None starts every episode (``temporal.batch_initial_state``). A VLA without memory
        returns an empty state."""
        obs_t = {
            k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v
            for k, v in obs.items()
        }
        features = self.features(obs_t)
        if self.temporal is None:
            return self.head.predict(features, deterministic=deterministic), {}
        if state is None:
            state = self.temporal.batch_initial_state(features.shape[0])
        out, state = self.temporal(features[:, None], state)
        return self.head.predict(out[:, 0], deterministic=deterministic), state

    def act(
        self,
        image: np.ndarray | None,
        instruction: str,
        state: np.ndarray | None = None,
        deterministic: bool = True,
        sensors: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """One observation -> action chunk (K, A): image uint8 (H, W, 3) ((N, H, W, 3) with
        ``num_cameras`` N > 1; None for a state-only VLA, ``vision="none"``), instruction text, state, and one reading per configured sensor
        (``sensors={"lidar": (points, 4), "lidar_mask": (points,), ...}``, unbatched)."""
        ids, mask = encode_instructions(
            [instruction], self.config.instruction_max_length, self.tokenizer
        )
        obs: dict[str, Any] = {"instruction": ids, "instruction_mask": mask}
        if self.config.vision != "none":  # (N, H, W, 3) with num_cameras N > 1
            key = "images" if self.config.num_cameras > 1 else "image"
            obs[key] = np.asarray(image)[None]
        if self.config.state_dim > 0:
            obs["state"] = np.asarray(state, dtype=np.float32)[None]
        for key, value in (sensors or {}).items():
            obs[key] = np.asarray(value)[None]
        return self.predict(obs, deterministic=deterministic)[0].cpu().numpy()

    # ---- persistence --------------------------------------------------------------------------
    def portable_config(self) -> VLAConfig:
        """This model's config with every part described inline (no external paths)."""
        data = self.config.to_dict()
        if self.config.backbone == "openvla":  # the architecture is read from vlm_path
            data["tokenizer_path"] = None
            return VLAConfig.from_dict(data)
        if self.config.backbone in ("smolvla", "pi0"):  # vlm_path and tokenizer_path stay
            return VLAConfig.from_dict(data)
        if self.config.backbone == "vlm":
            data.update(vlm_config=self.trunk.config_dict(), vlm_path=None)
            data["image_processor_path"] = None  # saved beside the weights
            data["tokenizer_path"] = None
            return VLAConfig.from_dict(data)
        if isinstance(self.trunk.vision, HFVisionEncoder):
            data["vision_config"] = self.trunk.vision.config_dict()
        data["vision_path"] = None
        lm = self.trunk.lm
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        data["llm_config"] = base.config.to_dict()
        data["llm_path"] = None
        data["tokenizer_path"] = None  # the tokenizer is saved beside the weights
        return VLAConfig.from_dict(data)

    def save_pretrained(
        self, directory: str | os.PathLike, meta: Mapping[str, Any] | None = None
    ) -> Path:
        """Write config, safetensors weights, tokenizer and a model card (``README.md``) to
        ``directory`` atomically; ``meta`` (env, preset, ...: what `vla-ray eval` and the card
        read) is saved as ``vla_ray_meta.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.portable_config().save(tmp / CONFIG_NAME)
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(_untie(state), str(tmp / WEIGHTS_NAME))
            save_tokenizer(self.tokenizer, tmp / TOKENIZER_DIR)
            processor = getattr(self.trunk, "image_processor", None)
            if processor is not None:
                processor.save_pretrained(str(tmp / IMAGE_PROCESSOR_DIR))
            if meta:
                (tmp / META_NAME).write_text(json.dumps(dict(meta), indent=2, default=str))
            write_model_card(tmp, meta=meta, config=self.portable_config())
            replace_dir(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> VLA:
        """Load a ``save_pretrained`` directory or a Hugging Face Hub repo id (``ORG/NAME``,
        downloaded once into the Hub cache; ``HF_HUB_OFFLINE=1`` reads the cache only). An
        existing local directory wins over a repo id of the same name. ``overrides`` replace
        config fields."""
        from safetensors.torch import load_file

        directory = resolve_pretrained(
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{directory}: not a VLA directory (no {CONFIG_NAME}); "
                "expected the output of VLA.save_pretrained"
            )
        data = VLAConfig.load(directory / CONFIG_NAME).to_dict()
        # smolvla reads the VLM's config beside its tokenizer: keep the saved tokenizer_path
        if (directory / TOKENIZER_DIR).is_dir() and data.get("backbone") != "smolvla":
            data["tokenizer_path"] = str(directory / TOKENIZER_DIR)
        if (directory / IMAGE_PROCESSOR_DIR).is_dir():
            data["image_processor_path"] = str(directory / IMAGE_PROCESSOR_DIR)
        data.update(overrides)
        model = cls(VLAConfig.from_dict(data))
        saved = load_file(str(directory / WEIGHTS_NAME))
        model.load_state_dict(_with_fresh_adapters(saved, model.state_dict()), strict=True)
        return model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        meta: Mapping[str, Any] | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload VLA policy (vla-ray)",
        create_pr: bool = False,
    ) -> Any:
        """Upload this model to the Hugging Face Hub as a ``save_pretrained`` folder with its
        model card (the repo is created when missing). Returns ``HfApi.upload_folder``'s
        commit info."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="vla-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", meta=meta)
            write_model_card(folder, meta=meta, name=repo_id)  # titled with the repo id
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained_vlm(cls, directory: str | os.PathLike, config: VLAConfig) -> VLA:
        """A VLA with ``config``'s head and I/O whose trunk comes from a pretrained VLM directory.

        The VLM's trunk architecture (vision, projector, language model, tokenizer: the
        ``TRUNK_KEYS`` of its ``vla_config.json``) replaces ``config``'s, except the training-only
        vision options of ``RL_VISION_KEYS`` (e.g. the keypoint reconstruction loss), which stay
        as ``config`` sets them; its weights are loaded into the trunk. The action head, state
        projection, action query and any such training-only part start fresh.
        """
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            if (directory / "config.json").is_file() or not directory.exists():
                # a transformers image-text-to-text checkpoint (or a hub id): the VLM backbone;
                # an OpenVLA checkpoint: the openvla backbone
                backbone = "vlm"
                if (directory / "config.json").is_file():
                    model_type = json.loads((directory / "config.json").read_text()).get(
                        "model_type"
                    )
                    backbone = "openvla" if model_type == "openvla" else "vlm"
                    from vla_ray.models.lerobot_vla import checkpoint_type

                    backbone = checkpoint_type(directory) or backbone  # LeRobot smolvla / pi0
                data = {**config.to_dict(), "backbone": backbone, "vlm_path": str(directory)}
                if backbone in ("smolvla", "pi0"):
                    from vla_ray.models.lerobot_vla import LEROBOT_HEADS

                    # the checkpoint's expert is the head: as it is, or a Gaussian around it
                    head = config.head if config.head in LEROBOT_HEADS else "flow_matching"
                    data.update(head=head, vlm_family=None, vision_skip=False)
                if backbone == "openvla":
                    data.update(vlm_family=None, vlm_config={}, vision_skip=False)
                return cls(VLAConfig.from_dict(data))
            raise FileNotFoundError(
                f"vlm_path {directory}: not a VLM directory (no {CONFIG_NAME} or config.json); "
                "expected the OUTPUT/vlm directory written by `vla-ray pretrain` or a "
                "transformers image-text-to-text checkpoint"
            )
        saved = VLAConfig.load(directory / CONFIG_NAME).to_dict()
        data = config.to_dict()
        data.update({k: saved[k] for k in TRUNK_KEYS})
        data["vision_config"] = {
            **saved["vision_config"],
            **{k: v for k, v in config.vision_config.items() if k in RL_VISION_KEYS},
        }
        data["tokenizer_path"] = (
            str(directory / TOKENIZER_DIR) if (directory / TOKENIZER_DIR).is_dir() else None
        )
        model = cls(VLAConfig.from_dict(data))
        load_trunk_weights(model, directory)
        return model


def resolve_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder for ``name_or_path``: the path itself when it exists, else the Hub repo's
    snapshot (``huggingface_hub.snapshot_download``: cached, offline with ``HF_HUB_OFFLINE=1``)."""
    path = Path(name_or_path)
    if path.exists() or isinstance(name_or_path, Path) or path.is_absolute():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    repo_id = str(name_or_path)
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"{repo_id}: not a local folder, nor a Hugging Face Hub repo id (ORG/NAME)"
        ) from None
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            token=token,
            local_files_only=local_files_only,
            library_name="vla-ray",
        )
    except Exception as err:  # offline without a cached copy, unknown repo, no access
        raise FileNotFoundError(
            f"{repo_id}: not a local folder, and the Hugging Face Hub repo could not be loaded "
            f"({type(err).__name__}: {err}); with HF_HUB_OFFLINE=1 it must be in the Hub cache"
        ) from err
    return Path(folder)


def run_trunk(trunk: nn.Module, config: VLAConfig, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``trunk(obs)`` under ``config.autocast``, as float32 features (B, F)."""
    device = next(trunk.parameters()).device
    with autocast(config.autocast, device):
        return trunk(obs).float()


def load_vla_tokenizer(config: VLAConfig) -> Any:
    """The tokenizer of a VLA built from ``config`` (the VLM's own for backbone='vlm' or
    'openvla')."""
    if config.backbone in ("smolvla", "pi0"):
        return None  # the checkpoint's own tokenizer, loaded with it (trunk.policy.tokenizer)
    if config.backbone == "openvla":
        from vla_ray.models.openvla import load_tokenizer as load_openvla_tokenizer

        return load_openvla_tokenizer(Path(config.tokenizer_path or config.vlm_path))
    if config.backbone == "vlm":
        from vla_ray.models.vlm import vlm_tokenizer

        return vlm_tokenizer(config)
    return load_tokenizer(config.tokenizer_path)


def build_trunk(config: VLAConfig, tokenizer: Any) -> CachedPrefixTrunk:
    """The trunk ``config.backbone`` names: observation dict -> features (B, feature_dim)."""
    if config.backbone == "vlm":
        from vla_ray.models.vlm import VLMTrunk

        return VLMTrunk(config, tokenizer)
    if config.backbone == "openvla":
        return _openvla_trunk(config)
    if config.backbone in ("smolvla", "pi0"):
        from vla_ray.models.lerobot_vla import LeRobotTrunk

        return LeRobotTrunk(config)
    return VLATrunk(config, vocab_size=len(tokenizer))


def _openvla_trunk(config: VLAConfig) -> nn.Module:
    """An OpenVLA checkpoint as the trunk: instruction ids of the checkpoint's tokenizer, images
    at its size; LoRA in its language model and the freeze switches as for the other trunks."""
    from vla_ray.models.language import LM_LORA_TARGETS, inject_lora
    from vla_ray.models.openvla import OpenVLATrunk
    from vla_ray.models.vlm import torch_dtype

    trunk = OpenVLATrunk.from_pretrained(
        config.vlm_path, dtype=torch_dtype(config.dtype), wrap_prompt=True
    )
    size = (trunk.image_size, trunk.image_size)
    if tuple(config.image_size) != size:
        raise ConfigError(
            f"image_size: the OpenVLA checkpoint {config.vlm_path} takes {size} images, the "
            f"env gives {tuple(config.image_size)} (set the env's image size to match)"
        )
    lm = trunk.model.language_model
    if config.lora:
        inject_lora(lm, config.lora, list(config.lora.get("target_modules", LM_LORA_TARGETS)))
        trunk.requires_grad_(False)
        for name, p in trunk.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        lm.requires_grad_(not config.freeze_llm)
    if config.freeze_vision:
        trunk.model.vision_backbone.requires_grad_(False)
    if config.freeze_projector:
        trunk.model.projector.requires_grad_(False)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    return trunk


def load_trunk_weights(vla: VLA, directory: str | os.PathLike) -> None:
    """Copy the trunk weights of a VLM/VLA ``save_pretrained`` directory into ``vla`` (in place).

    LoRA-merged weights load into a LoRA-wrapped LM through the peft base-layer names; the
    RL-only parts (``RL_ONLY_PREFIXES``) keep ``vla``'s own weights.
    """
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / WEIGHTS_NAME))
    target = vla.state_dict()
    mapped = {}
    for key in target:
        if not key.startswith("trunk.") or key.startswith(RL_ONLY_PREFIXES):
            continue
        src = _peft_to_plain(key)
        if src in saved:
            mapped[key] = saved[src]
    missing = [
        k
        for k in target
        if k.startswith("trunk.")
        and k not in mapped
        and "lora_" not in k
        and not k.startswith(RL_ONLY_PREFIXES)
    ]
    if missing:
        raise ValueError(
            f"{directory}: the saved trunk does not match this model; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} (vision, projector and LM must be the same)"
        )
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(target[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(
            f"{directory}: weight {k} has shape {tuple(mapped[k].shape)}, the model expects "
            f"{tuple(target[k].shape)}"
        )
    vla.load_state_dict(mapped, strict=False)


def _peft_to_plain(key: str) -> str:
    """``trunk.lm.base_model.model.X.base_layer.weight`` -> ``trunk.lm.X.weight``."""
    key = key.replace("trunk.lm.base_model.model.", "trunk.lm.")
    return key.replace(".base_layer.", ".")


def _with_fresh_adapters(
    saved: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``saved`` as is when it has LoRA adapters or the model has none; else (a full checkpoint
    loaded with ``lora`` set) its weights under the peft names and the model's fresh adapters."""
    if any(is_adapter_param(k) for k in saved) or not any(is_adapter_param(k) for k in target):
        return saved
    out = {}
    for key, fresh in target.items():
        if is_adapter_param(key):
            out[key] = fresh
        else:
            src = _peft_to_plain(key)
            out[key] = saved[src] if src in saved else saved.get(key, fresh)
    missing = [k for k in target if not is_adapter_param(k) and k not in saved]
    missing = [k for k in missing if _peft_to_plain(k) not in saved]
    if missing:
        raise ValueError(
            f"the saved weights lack {missing[:5]}{' ...' if len(missing) > 5 else ''}: not the "
            "architecture of this config (only lora may be added to a saved VLA)"
        )
    return out


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage (tied embeddings) so safetensors can store them."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out
