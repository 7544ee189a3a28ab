"""The VLA trunk run as a vision-language model (LLaVA-style) for pretraining.

Input sequence to the language model::

    [BOS] user : <img_1 ... img_M> describe the image . assistant : a red disc ... [EOS] ...

``[BOS]`` is the trunk's learned BOS embedding (the same one the RL policy puts before the
instruction); the ``M`` image positions receive the projector's output tokens. The loss is the
next-token cross entropy on positions whose label is not -100 (assistant answers).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vla_ray.models.language import decoder_of
from vla_ray.models.vla import VLATrunk
from vla_ray.pretrain.data import IGNORE_INDEX

STAGES = ("align", "instruct")


class VisionLanguageModel(nn.Module):
    """Wraps a ``VLATrunk``: (images, token ids with image positions) -> summed token loss."""

    def __init__(self, trunk: VLATrunk):
        super().__init__()
        self.trunk = trunk

    @property
    def num_image_tokens(self) -> int:
        """How many positions one ``<image>`` placeholder expands to."""
        return int(self.trunk.projector.num_tokens)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> projected vision tokens (B, M, D)."""
        trunk = self.trunk
        if trunk._vision_conditioned:  # FiLM CNN: no instruction here, identity-initialised context
            context = torch.zeros(images.shape[0], trunk.hidden_size, device=images.device)
            tokens = trunk.vision(images, context)
        else:
            tokens = trunk.vision(images)
        return trunk.projector(tokens, None)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        image_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss over labelled positions, and the number of those positions."""
        trunk = self.trunk
        embed = decoder_of(trunk.lm).get_input_embeddings()
        emb = embed(input_ids)
        vis = self.image_tokens(images).to(emb.dtype)
        expected = vis.shape[0] * vis.shape[1]
        if int(image_mask.sum()) != expected:
            raise ValueError(
                f"image_mask: expected {vis.shape[1]} image positions per sample "
                f"({expected} in the batch), got {int(image_mask.sum())}"
            )
        emb = emb.masked_scatter(image_mask.unsqueeze(-1), vis.reshape(-1, vis.shape[-1]))
        B = emb.shape[0]
        emb = torch.cat([trunk.bos.expand(B, -1, -1).to(emb.dtype), emb], dim=1)
        mask = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], dim=1)
        logits = trunk.lm(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
        # position t predicts token t (shifted by the BOS): logits[:, :-1] vs labels
        logits = logits[:, :-1].float()
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss_sum, (labels != IGNORE_INDEX).sum()


def set_trainable(trunk: VLATrunk, stage: str, train_vision: bool = False) -> list[str]:
    """Freeze everything but what ``stage`` trains; returns the trainable parameter names.

    ``align``: the projector only. ``instruct``: projector + language model (+ BOS), or the
    projector + LoRA adapters when the LM carries peft adapters. The vision encoder stays frozen
    (``train_vision=True`` trains it in stage instruct, for encoders built from scratch);
    the RL-only parts (state projection, action query) and the projector's instruction-context
    layer (no instruction in VLM data) receive no gradient and are frozen too.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: unknown name {stage!r}; valid names are {', '.join(STAGES)}")
    trunk.requires_grad_(False)
    trunk.projector.requires_grad_(True)
    context = getattr(trunk.projector, "context", None)
    if isinstance(context, nn.Module):
        context.requires_grad_(False)
    if stage == "instruct":
        trunk.bos.requires_grad_(True)
        if hasattr(trunk.lm, "peft_config"):
            for name, p in trunk.lm.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            trunk.lm.requires_grad_(True)
        if train_vision:
            trunk.vision.requires_grad_(True)
            film = getattr(trunk.vision, "film", None)
            if isinstance(film, nn.Module):
                film.requires_grad_(False)  # no instruction context in VLM data
    return [n for n, p in trunk.named_parameters() if p.requires_grad]
