"""E2 behind open_clip's own API: change ``import open_clip`` to ``import e2_open_clip as open_clip`` and a
script written for open_clip runs unchanged, with an E2 wherever it names a model.

A model name may be any :func:`e2_core.load_encoder` source (``"demo:e2"``, a checkpoint directory, a
reference ``best.pth``), or an open_clip architecture with ``pretrained=`` such a checkpoint. Anything else
(an open_clip name with a pretrained tag or weights file, and every other attribute of the module) is open_clip's
own, so the swapped import never breaks a plain CLIP.

Example:
    >>> import e2_open_clip as open_clip
    >>> model, _, preprocess = open_clip.create_model_and_transforms("demo:e2")   # doctest: +SKIP
    >>> tokenizer = open_clip.get_tokenizer("demo:e2")                           # doctest: +SKIP
    >>> text_features = model.encode_text(tokenizer(["a red dress"]))            # doctest: +SKIP
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional, Tuple

import open_clip
import torch
from open_clip.model import CLIP

from e2_core import Encoder, load_encoder
from e2_core.checkpoint import is_checkpoint
from e2_core.reference import is_reference_checkpoint
from e2_core.registry import Adapter

_PRECISIONS = {"fp32": torch.float32, "amp": torch.float32, "amp_bf16": torch.float32, "fp16": torch.float16,
               "pure_fp16": torch.float16, "bf16": torch.bfloat16, "pure_bf16": torch.bfloat16}
_tokenizers: Dict[str, Any] = {}  # source -> tokenizer of a model already loaded (get_tokenizer need not load it)


def to_open_clip(encoder: Encoder) -> CLIP:
    """The encoder's model as open_clip's ``CLIP`` (an E2 is one): ``encode_image`` (E2's global embedding),
    ``encode_text``, ``logit_scale``, the text-tower attributes, and ``model(image, text)`` returning open_clip's
    tuple ``(image_features, text_features, logit_scale)``. Shares the encoder's weights."""
    model = copy.copy(encoder.model)  # shares parameters; open_clip's default output form on this view only
    model.output_dict = False
    return model


def e2_source(model_name: str, pretrained: Optional[str] = None) -> Optional[str]:
    """The :func:`e2_core.load_encoder` source a ``(model_name, pretrained)`` pair names, or ``None`` when it is
    open_clip's own (an architecture with a pretrained tag or CLIP weights file, or none)."""
    if pretrained:
        path = str(pretrained)
        if is_checkpoint(path):
            return path
        if os.path.isfile(path) and is_reference_checkpoint(path):
            return f"{model_name}:{path}"
        return None
    if open_clip.get_model_config(model_name) is not None:
        return None
    return model_name


def create_model_and_transforms(model_name: str, pretrained: Optional[str] = None, precision: str = "fp32",
                                device: Any = "cpu", **kwargs) -> Tuple[CLIP, Any, Any]:
    """``(model, preprocess_train, preprocess_val)`` as open_clip's function returns them."""
    source = e2_source(model_name, pretrained)
    if source is None:
        return open_clip.create_model_and_transforms(model_name, pretrained=pretrained, precision=precision,
                                                     device=device, **kwargs)
    encoder = _load(source, precision, device)
    return to_open_clip(encoder), encoder.preprocess_train, encoder.preprocess


def create_model(model_name: str, pretrained: Optional[str] = None, precision: str = "fp32", device: Any = "cpu",
                 **kwargs) -> CLIP:
    source = e2_source(model_name, pretrained)
    if source is None:
        return open_clip.create_model(model_name, pretrained=pretrained, precision=precision, device=device, **kwargs)
    return to_open_clip(_load(source, precision, device))


def create_model_from_pretrained(model_name: str, pretrained: Optional[str] = None, precision: str = "fp32",
                                 device: Any = "cpu", return_transform: bool = True, **kwargs):
    source = e2_source(model_name, pretrained)
    if source is None:
        return open_clip.create_model_from_pretrained(model_name, pretrained=pretrained, precision=precision,
                                                      device=device, return_transform=return_transform, **kwargs)
    encoder = _load(source, precision, device)
    return (to_open_clip(encoder), encoder.preprocess) if return_transform else to_open_clip(encoder)


def get_tokenizer(model_name: str, **kwargs):
    source = e2_source(model_name)
    if source is None:
        return open_clip.get_tokenizer(model_name, **kwargs)
    return _tokenizers[source] if source in _tokenizers else _load(source).tokenizer


def _load(source: str, precision: str = "fp32", device: Any = "cpu") -> Encoder:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(_PRECISIONS)}")
    encoder = load_encoder(source, device=device).to(_PRECISIONS[precision]).eval()
    _tokenizers[source] = encoder.tokenizer
    return encoder


def __getattr__(name: str) -> Any:  # everything else is open_clip's
    return getattr(open_clip, name)


ADAPTER = Adapter(name="open_clip", adapt=to_open_clip, requires="open_clip_torch",
                  install="pip install open_clip_torch",
                  description="open_clip: E2 as an open_clip CLIP; `import e2_open_clip as open_clip` for whole scripts")

__all__ = ["ADAPTER", "create_model", "create_model_and_transforms", "create_model_from_pretrained", "e2_source",
           "get_tokenizer", "to_open_clip"]
