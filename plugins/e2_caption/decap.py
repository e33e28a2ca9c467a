"""DeCap (Li et al., ICLR 2023): a decoder trained from scratch on text only, conditioned on one prefix
token mapped from the normalised text embedding. At inference the image embedding is projected onto a
memory of training-caption text embeddings, ``softmax(sim / tau) @ memory`` re-normalised (upstream
tau = 0.01), so the decoder reads an embedding from the text side of the space."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .captioner import Captioner
from .decoder import DecoderConfig


class DeCap(Captioner):
    name = "decap"

    def __init__(self, encoder, config: Optional[DecoderConfig] = None, tau: float = 0.01, **kwargs):
        super().__init__(encoder, config or DecoderConfig(prefix_length=1, mapper="linear"), tau=tau, **kwargs)
        self.memory: Optional[torch.Tensor] = None

    def prepare(self, captions: Sequence[str], text_features: torch.Tensor) -> None:
        self.memory = F.normalize(text_features.float(), dim=-1)

    def training_inputs(self, text_features, image_features=None):
        return F.normalize(text_features.float(), dim=-1)

    def image_inputs(self, image_features: torch.Tensor) -> torch.Tensor:
        return project_to_memory(image_features, self.memory.to(image_features.device), self.options["tau"])

    def extra_tensors(self) -> Dict[str, torch.Tensor]:
        return {"memory": self.memory}

    def load_extra(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.memory = tensors["memory"]


def project_to_memory(features: torch.Tensor, memory: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax(normalise(features) @ memory.T / tau) @ memory``, re-normalised: a convex combination of
    the memory rows, projected back onto the sphere."""
    weights = torch.softmax(F.normalize(features.float(), dim=-1) @ memory.t() / tau, dim=-1)
    return F.normalize(weights @ memory, dim=-1)
