"""DeCap (Li et al., ICLR 2023): a decoder trained from scratch on text only, conditioned on one prefix
token mapped from the normalised text embedding. At inference the image embedding is projected onto a
memory of training-caption text embeddings, ``softmax(sim / tau) @ memory`` re-normalised (DeCap's
notebook: ``sim * 100``, tau = 0.01, a memory of 500,000 sampled training captions), so the decoder reads
an embedding from the text side of the space."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .captioner import Captioner, Preset, Training
from .decoder import DecoderConfig


class DeCap(Captioner):
    """``memory_size``: training captions kept in the memory, sampled (0: all; None: the preset's, paper
    500,000)."""

    name = "decap"

    def __init__(self, encoder, config: Optional[DecoderConfig] = None, tau: float = 0.01,
                 memory_size: Optional[int] = None, **kwargs):
        if memory_size is None:
            memory_size = 500_000 if kwargs.get("preset") == "paper" else 0
        super().__init__(encoder, config, tau=tau, memory_size=memory_size, **kwargs)
        self.memory: Optional[torch.Tensor] = None

    @classmethod
    def preset(cls, name: str) -> Preset:
        """demo: a small decoder; paper: DeCap's code (:meth:`DecoderConfig.paper`, :meth:`Training.paper`),
        greedy decoding of at most 30 tokens."""
        if name == "paper":
            return Preset(DecoderConfig.paper("decap"), Training.paper("decap"), beams=1, max_tokens=30)
        return Preset(DecoderConfig(prefix_length=1, mapper="linear"))

    def prepare(self, captions: Sequence[str], text_features: torch.Tensor) -> None:
        keep = self.options.get("memory_size", 0)
        if keep and len(text_features) > keep:
            sample = torch.randperm(len(text_features), generator=torch.Generator().manual_seed(0))[:keep]
            text_features = text_features[sample]
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
