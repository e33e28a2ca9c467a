"""E2: CLIP plus selection tokens, fusion blocks and regional heads for expressive fashion embeddings.

Example:
    >>> import e2_core
    >>> model, _, preprocess = e2_core.create_e2_and_transforms("ViT-B-32", pretrained="openai")  # doctest: +SKIP
    >>> tokenizer = e2_core.get_tokenizer("ViT-B-32")                                             # doctest: +SKIP
    >>> image_features = model.encode_image(preprocess(image)[None], normalize=True)             # doctest: +SKIP
"""
from .checkpoint import CheckpointError, load_checkpoint, save_pretrained
from .config import E2Config, FASHIONGEN_ENTITIES
from .factory import (create_clip, create_e2, create_e2_and_transforms, get_tokenizer, image_transforms,
                      import_reference_checkpoint, list_models, load_encoder)
from .fusion import FusionBlock, SelectionTokens, TemperatureSchedule
from .heads import RegionalHeads
from .loss import RegionalContrastiveLoss, contrastive_loss
from .model import E2Model, E2VisionOutput, E2VisionTransformer
from .texts import AMAZON_FASHION, FASHIONGEN, EntityTokens, TextSpec, build_texts, tokenize_entities, trim_padding

__version__ = "0.1.0"

__all__ = [
    "AMAZON_FASHION", "CheckpointError", "E2Config", "EntityTokens", "E2Model", "E2VisionOutput", "E2VisionTransformer",
    "FASHIONGEN", "FASHIONGEN_ENTITIES", "FusionBlock", "RegionalContrastiveLoss", "RegionalHeads",
    "SelectionTokens", "TemperatureSchedule", "TextSpec", "build_texts", "contrastive_loss", "create_clip", "create_e2",
    "create_e2_and_transforms", "get_tokenizer", "image_transforms", "import_reference_checkpoint", "list_models",
    "load_checkpoint", "load_encoder", "save_pretrained", "tokenize_entities", "trim_padding",
]
