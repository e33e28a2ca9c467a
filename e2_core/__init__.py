"""E2: CLIP plus selection tokens, fusion blocks and regional heads for expressive fashion embeddings.

Example:
    >>> import e2_core
    >>> encoder = e2_core.load_encoder("runs/e2/stage2/best")                    # doctest: +SKIP
    >>> image_features = encoder.encode_image(encoder.preprocess(image)[None], normalize=True)  # doctest: +SKIP
    >>> text_features = encoder.encode_text(encoder.tokenizer(["a wool coat"]), normalize=True)  # doctest: +SKIP
    >>> model = e2_core.create_e2("ViT-B-32", pretrained="openai")  # a new E2 on CLIP, to train  # doctest: +SKIP
"""
from .architecture import list_models
from .checkpoint import save_pretrained
from .config import E2Config, FASHIONGEN_ENTITIES
from .encoder import CONTRACT, Encoder, as_encoder
from .errors import CheckpointError
from .factory import adapt, create_e2, create_e2_and_transforms, get_tokenizer, load_encoder
from .fusion import FusionBlock, SelectionTokens, TemperatureSchedule
from .heads import RegionalHeads
from .loss import RegionalContrastiveLoss, contrastive_loss
from .model import E2Model, E2VisionOutput, E2VisionTransformer
from .texts import AMAZON_FASHION, FASHIONGEN, EntityTokens, TextSpec, build_texts, tokenize_entities, trim_padding

__version__ = "0.1.0"

__all__ = [
    "AMAZON_FASHION", "CONTRACT", "CheckpointError", "E2Config", "E2Model", "E2VisionOutput", "E2VisionTransformer",
    "Encoder", "EntityTokens", "FASHIONGEN", "FASHIONGEN_ENTITIES", "FusionBlock", "RegionalContrastiveLoss",
    "RegionalHeads", "SelectionTokens", "TemperatureSchedule", "TextSpec", "adapt", "as_encoder", "build_texts",
    "contrastive_loss", "create_e2", "create_e2_and_transforms", "get_tokenizer", "list_models", "load_encoder",
    "save_pretrained", "tokenize_entities", "trim_padding",
]
