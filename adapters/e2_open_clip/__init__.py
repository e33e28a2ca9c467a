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
import types
from typing import Any, Dict, Optional, Tuple

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict, merge_preprocess_kwargs

from e2_core import Encoder, load_encoder
from e2_core.checkpoint import is_checkpoint
from e2_core.reference import is_reference_checkpoint
from e2_core.registry import Adapter

_PRECISIONS = {"fp32": torch.float32, "amp": torch.float32, "amp_bf16": torch.float32, "fp16": torch.float16,
               "pure_fp16": torch.float16, "bf16": torch.bfloat16, "pure_bf16": torch.bfloat16}
_tokenizers: Dict[str, Any] = {}  # source -> tokenizer of a model already loaded (get_tokenizer need not load it)


#: open_clip keyword arguments that change nothing for a saved model when they hold these values (a
#: checkpoint is rebuilt as it was saved: nothing is downloaded, no architecture is altered)
_INERT = {"load_weights": True, "jit": False, "force_quick_gelu": False, "force_custom_text": False,
          "force_patch_dropout": None, "pretrained_image": False, "pretrained_text": True,
          "pretrained_image_path": None, "pretrained_text_path": None, "force_preprocess_cfg": None,
          "image_mean": None, "image_std": None, "image_interpolation": None, "image_resize_mode": None,
          "aug_cfg": None}
_ANY = ("cache_dir", "weights_only", "require_pretrained")  # about fetching weights: a local checkpoint needs none


def to_open_clip(encoder: Encoder, output_dict: Optional[bool] = None) -> CLIP:
    """The encoder's model as open_clip's ``CLIP`` (an E2 is one): ``encode_image`` (E2's global embedding),
    ``encode_text``, ``logit_scale``, the text-tower attributes, and ``model(image, text)`` returning open_clip's
    tuple ``(image_features, text_features, logit_scale)`` (a dict with ``output_dict=True``, as open_clip's
    training script asks). Shares the encoder's weights."""
    model = copy.copy(encoder.model)  # shares parameters; open_clip's default output form on this view only
    model.output_dict = bool(output_dict)
    if output_dict and encoder.has_regions:  # open_clip's keys only: its losses take exactly these
        model.forward = types.MethodType(_clip_outputs, model)
    return model


def _clip_outputs(model, image=None, text=None):
    out = type(model).forward(model, image, text)
    return {k: v for k, v in out.items() if k in ("image_features", "text_features", "logit_scale", "logit_bias")}


def e2_source(model_name: str, pretrained: Optional[str] = None) -> Optional[str]:
    """The :func:`e2_core.load_encoder` source a ``(model_name, pretrained)`` pair names, or ``None`` when it is
    open_clip's own (an architecture, also written with a slash as open_clip allows, ``ViT-B/32``, with a
    pretrained tag or CLIP weights file, or none)."""
    if not os.path.exists(str(model_name)) and open_clip.get_model_config(str(model_name).replace("/", "-")):
        model_name = str(model_name).replace("/", "-")
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
    options = _checked(encoder, kwargs, transforms=True)
    cfg = _preprocess_cfg(encoder, options)
    return (to_open_clip(encoder, options.get("output_dict")),
            image_transform_v2(cfg, is_train=True, aug_cfg=options.get("aug_cfg")), image_transform_v2(cfg, False))


def create_model(model_name: str, pretrained: Optional[str] = None, precision: str = "fp32", device: Any = "cpu",
                 **kwargs) -> CLIP:
    source = e2_source(model_name, pretrained)
    if source is None:
        return open_clip.create_model(model_name, pretrained=pretrained, precision=precision, device=device, **kwargs)
    encoder = _load(source, precision, device)
    return to_open_clip(encoder, _checked(encoder, kwargs).get("output_dict"))


def create_model_from_pretrained(model_name: str, pretrained: Optional[str] = None, precision: str = "fp32",
                                 device: Any = "cpu", return_transform: bool = True, **kwargs):
    source = e2_source(model_name, pretrained)
    if source is None:
        return open_clip.create_model_from_pretrained(model_name, pretrained=pretrained, precision=precision,
                                                      device=device, return_transform=return_transform, **kwargs)
    encoder = _load(source, precision, device)
    model = to_open_clip(encoder, _checked(encoder, kwargs, transforms=True).get("output_dict"))
    return (model, image_transform_v2(_preprocess_cfg(encoder, kwargs), False)) if return_transform else model


def get_tokenizer(model_name: str, **kwargs):
    source = e2_source(model_name)
    if source is None:
        return open_clip.get_tokenizer(str(model_name).replace("/", "-"), **kwargs)
    tokenizer = _tokenizers[source] if source in _tokenizers else _load(source).tokenizer
    length = kwargs.pop("context_length", None)
    kwargs.pop("cache_dir", None)
    if length not in (None, tokenizer.context_length) or kwargs:
        raise ValueError(f"get_tokenizer({model_name!r}): "
                         + (f"context_length={length} differs from the model's {tokenizer.context_length}"
                            if length not in (None, tokenizer.context_length) else
                            f"{', '.join(kwargs)} cannot be applied to an E2 model's tokenizer; omit it"))
    return tokenizer


def _checked(encoder: Encoder, options: Dict[str, Any], transforms: bool = False) -> Dict[str, Any]:
    """open_clip's keyword arguments for a model this package loads: those it honours (``output_dict``, the
    image size and context length the model has, preprocessing overrides for the transforms), those that
    change nothing here, and a one-line refusal of any other."""
    for name, value in options.items():
        if name == "output_dict" or name in _ANY:
            continue
        if name == "force_image_size" and value is not None:
            size = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
            if size != tuple(encoder.image_size):
                raise ValueError(f"force_image_size={value} differs from the {encoder.kind} checkpoint's "
                                 f"{tuple(encoder.image_size)}, which its positional embeddings were trained at; omit it")
        elif name == "force_context_length" and value not in (None, encoder.context_length):
            raise ValueError(f"force_context_length={value} differs from the {encoder.kind} checkpoint's "
                             f"{encoder.context_length}; omit it")
        elif name in ("image_mean", "image_std", "image_interpolation", "image_resize_mode", "aug_cfg") and transforms:
            continue
        elif name not in ("force_image_size", "force_context_length") and (name not in _INERT or
                                                                           value != _INERT[name]):
            raise ValueError(f"{name}={value!r} is not supported for a model loaded by e2-plugins ({encoder.name}: "
                             "a checkpoint is rebuilt as it was saved); omit it")
    return options


def _preprocess_cfg(encoder: Encoder, options: Dict[str, Any]) -> PreprocessCfg:
    """The encoder's preprocessing with open_clip's ``image_mean``/``image_std``/... overrides applied."""
    overrides = merge_preprocess_kwargs({}, mean=options.get("image_mean"), std=options.get("image_std"),
                                        interpolation=options.get("image_interpolation"),
                                        resize_mode=options.get("image_resize_mode"))
    return PreprocessCfg(**merge_preprocess_dict(encoder._preprocess_cfg(), overrides))


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
