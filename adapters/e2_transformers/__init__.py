"""E2 in Hugging Face transformers: a ``CLIPModel``-compatible model, its vision and text parts, and a
``CLIPProcessor`` with open_clip's exact tokenizer.

Example:
    >>> import e2_core, e2_transformers
    >>> model = e2_core.adapt("demo:e2", "transformers")             # E2CLIPModel  # doctest: +SKIP
    >>> processor = e2_transformers.clip_processor(e2_core.load_encoder("demo:e2"))  # doctest: +SKIP
    >>> model.save_pretrained("e2-hf"); processor.save_pretrained("e2-hf")  # doctest: +SKIP
    >>> model = transformers.AutoModel.from_pretrained("e2-hf")      # after `import e2_transformers`  # doctest: +SKIP

Importing this package registers the E2 configs and models with transformers' Auto classes.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from e2_core.registry import Adapter

from .modeling import (FEATURES_AS_OUTPUT, E2CLIPConfig, E2CLIPModel, E2VisionConfig, E2VisionModelWithProjection,
                       HiddenStates, clip_model, clip_text_model)
from .processing import clip_image_processor, clip_processor, clip_tokenizer

for _config, _model in ((E2CLIPConfig, E2CLIPModel), (E2VisionConfig, E2VisionModelWithProjection)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
AutoModelForZeroShotImageClassification.register(E2CLIPConfig, E2CLIPModel, exist_ok=True)  # as CLIPModel is

PARTS = ("model", "vision", "text", "processor")


def to_transformers(encoder, part: str = "model"):
    """The encoder as transformers objects.

    Args:
        encoder: an :class:`e2_core.Encoder` (E2 or CLIP).
        part: ``model`` (E2: :class:`E2CLIPModel`; CLIP: transformers' ``CLIPModel``), ``vision`` (E2:
            :class:`E2VisionModelWithProjection`; CLIP: ``CLIPVisionModelWithProjection``), ``text``
            (``CLIPTextModelWithProjection``) or ``processor`` (``CLIPProcessor``).
    """
    if part == "model":
        return E2CLIPModel.from_encoder(encoder) if encoder.has_regions else clip_model(encoder)
    if part == "vision":
        if encoder.has_regions:
            return E2VisionModelWithProjection.from_encoder(encoder)
        from transformers import CLIPVisionModelWithProjection

        full = clip_model(encoder)
        vision = CLIPVisionModelWithProjection(full.config.vision_config)
        vision.vision_model.load_state_dict(full.vision_model.state_dict())
        vision.visual_projection.load_state_dict(full.visual_projection.state_dict())
        return vision.to(encoder.device).eval()
    if part == "text":
        return clip_text_model(encoder)
    if part == "processor":
        return clip_processor(encoder)
    raise ValueError(f"part={part!r}: choose one of {', '.join(PARTS)}")


ADAPTER = Adapter(name="transformers", adapt=to_transformers, requires="transformers",
                  install="pip install transformers",
                  description="Hugging Face transformers: CLIPModel-compatible E2, its vision/text parts, CLIPProcessor")

__all__ = ["ADAPTER", "E2CLIPConfig", "E2CLIPModel", "E2VisionConfig", "E2VisionModelWithProjection", "FEATURES_AS_OUTPUT",
           "HiddenStates",
           "PARTS", "clip_image_processor", "clip_model", "clip_processor", "clip_text_model", "clip_tokenizer",
           "to_transformers"]
