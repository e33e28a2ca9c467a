"""Baselines: the reference image alone, the relative captions alone, and their normalised sum."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import CIRMethod, QueryBatch


class ImageOnly(CIRMethod):
    """The reference image's own embedding (ignores the text)."""

    name = "image"
    convention = "cirevl"

    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:
        return F.normalize(batch.reference_features, dim=-1)


class TextOnly(CIRMethod):
    """The relative captions alone (ignores the image)."""

    name = "text"
    convention = "cirevl"

    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:
        return self.encode_prompts(encoder, batch.prompts, None)


class ImageAndText(CIRMethod):
    """The normalised sum of the image and the caption embeddings."""

    name = "image+text"
    convention = "cirevl"

    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:
        text = self.encode_prompts(encoder, batch.prompts, None)
        return F.normalize(F.normalize(batch.reference_features.to(text.device), dim=-1) + text, dim=-1)
