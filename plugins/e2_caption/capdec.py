"""CapDec (Nukrai et al., EMNLP 2022 Findings): a prefix decoder trained on text embeddings with
Gaussian noise injected (normalise, add N(0, variance), re-normalise; upstream variance 0.016), then
fed image embeddings at inference. Upstream uses ClipCap's transformer mapper with a prefix of 40 and a
pretrained GPT-2; here GPT-2 is built from a config (random weights) unless ``language_model`` names a
local model, and the prefix length is a config value. ``ClipCap`` is the same code trained on image
embeddings of image-caption pairs, without noise."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .captioner import Captioner
from .decoder import DecoderConfig


def inject_noise(features: torch.Tensor, variance: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Normalise, add Gaussian noise of ``variance`` per coordinate, re-normalise."""
    x = F.normalize(features.float(), dim=-1)
    noise = torch.randn(x.shape, generator=generator).to(x.device) * math.sqrt(variance)
    return F.normalize(x + noise, dim=-1)


class CapDec(Captioner):
    name = "capdec"

    def __init__(self, encoder, config: Optional[DecoderConfig] = None, noise_variance: float = 0.016, **kwargs):
        super().__init__(encoder, config or DecoderConfig(prefix_length=10, mapper="transformer"),
                         noise_variance=noise_variance, **kwargs)

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
