"""The Ray Data side of pretraining: the collate function run in each Ray Train worker.

Kept apart from ``trainer`` so the model, step and config helpers there import without Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from vla_ray.pretrain.data import collate


class CollateBatch(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate function: decode images and tokenise in the worker."""

    def __init__(self, tokenizer: Any, num_image_tokens: int, image_size, max_length: int):
        self.args = (tokenizer, num_image_tokens, tuple(image_size), max_length)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = collate(batch, *self.args)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
