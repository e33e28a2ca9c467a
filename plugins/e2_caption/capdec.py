"""CapDec (Nukrai et al., EMNLP 2022 Findings): a prefix decoder trained on text embeddings with
Gaussian noise injected (normalise, add N(0, variance), re-normalise; CapDec's README trains with variance
0.016), then fed normalised image embeddings at inference. The ``paper`` preset is CapDec's code: ClipCap's
transformer mapper (8 blocks, 8 heads, 40 projected tokens, a 40-token prefix), GPT-2 base fine-tuned (a
local GPT-2 folder when given, else one of its shape from scratch), beam search of 5. ``ClipCap`` is the
same code trained on image embeddings of image-caption pairs, without noise."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .captioner import Captioner, Preset, Training
from .decoder import DecoderConfig


def inject_noise(features: torch.Tensor, variance: float, generator: Optional[torch.Generator] = None,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalise, add Gaussian noise of ``variance`` per coordinate (``noise``: a given N(0, 1) draw,
    scaled here), re-normalise."""
    x = F.normalize(features.float(), dim=-1)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator)
    return F.normalize(x + noise.to(x.device) * math.sqrt(variance), dim=-1)


class CapDec(Captioner):
    name = "capdec"

    def __init__(self, encoder, config: Optional[DecoderConfig] = None, noise_variance: float = 0.016, **kwargs):
        super().__init__(encoder, config, noise_variance=noise_variance, **kwargs)

    @classmethod
    def preset(cls, name: str) -> Preset:
        """demo: a small decoder with a 10-token prefix; paper: CapDec's code (:meth:`DecoderConfig.paper`,
        :meth:`Training.paper`), beam search of 5, at most 67 tokens."""
        if name == "paper":
            return Preset(DecoderConfig.paper("capdec"), Training.paper("capdec"), beams=5, max_tokens=67)
        return Preset(DecoderConfig(prefix_length=10, mapper="transformer"))

    def training_inputs(self, text_features, image_features=None):
        return inject_noise(text_features, self.options["noise_variance"])

    def image_inputs(self, image_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_features.float(), dim=-1)


class ClipCap(CapDec):
    """Trained on the images' embeddings (image-caption pairs), no noise."""

    name = "clipcap"
    pairs = True

    def __init__(self, encoder, config: Optional[DecoderConfig] = None, **kwargs):
        super().__init__(encoder, config, noise_variance=0.0, **kwargs)

    def training_inputs(self, text_features, image_features=None):
        if image_features is None:
            raise ValueError("clipcap trains on image embeddings: give image_features")
        return F.normalize(image_features.float(), dim=-1)
