"""The front door: ``create_e2``, ``create_e2_and_transforms``, ``get_tokenizer``, ``list_models``.

``pretrained`` may be
  * ``None``: random CLIP weights;
  * an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...), fetched by open_clip;
  * a local CLIP checkpoint file, loaded by open_clip;
  * an E2 checkpoint directory (``config.json`` + ``model.safetensors``, see ``save_pretrained``);
  * a checkpoint of the authors' reference implementation (``best.pth``), imported.

For CLIP weights the new E2 parts are initialised: selection tokens ``width**-0.5 * randn``;
fusion ``Wk`` at that scale, ``Wq`` at ``query_init_scale`` times it, ``Wv`` as the identity;
the global projection ``proj_cls`` and every regional head as copies of CLIP's ``ln_post`` and
image projection, so E2 starts in CLIP's embedding space.

E2Config override order: ``E2Config()`` defaults, then the checkpoint's saved config (E2
checkpoints), then ``config``, then keyword ``overrides``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import QuickGELU

from .checkpoint import (CheckpointError, checkpoint_type, is_e2_checkpoint, is_reference_checkpoint,
                         load_checkpoint, load_reference_state_dict, load_state_dict_checked, read_checkpoint_config)
from .config import E2Config
from .model import E2Model

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

PathLike = Union[str, os.PathLike]


def list_models() -> List[str]:
    """open_clip architectures E2 can extend: class-token ViT image tower, native text tower."""
    return [name for name in open_clip.list_models() if _is_supported(open_clip.get_model_config(name))]


def _is_supported(cfg: Optional[Mapping[str, Any]]) -> bool:
    if not cfg or "multimodal_cfg" in cfg or cfg.get("custom_text"):
        return False
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    return (isinstance(vision.get("layers", 12), int) and not vision.get("timm_model_name")
            and not vision.get("attentional_pool") and vision.get("pool_type", "tok") == "tok"
            and not text.get("hf_model_name"))


def _resolve_config(base: Optional[E2Config], config: Union[E2Config, Mapping, None],
                    overrides: Mapping[str, Any]) -> E2Config:
    merged = (base or E2Config()).to_dict()
    if config is not None:
        merged.update(config.to_dict() if isinstance(config, E2Config) else dict(config))
    merged.update(overrides)
    return E2Config.from_dict(merged)


def create_e2(
        model_name: Optional[str] = None,
        pretrained: Optional[PathLike] = None,
        *,
        config: Union[E2Config, Mapping, None] = None,
        device: Union[str, torch.device] = "cpu",
        cache_dir: Optional[str] = None,
        **overrides,
) -> E2Model:
    """Build an E2 encoder on an open_clip architecture.

    Args:
        model_name: open_clip architecture (see ``list_models()``); ``None``: the architecture of
            the E2 checkpoint given as ``pretrained``, else ViT-B-32.
        pretrained: where the weights come from (module docstring).
        config: E2Config or dict of fields; ``overrides`` are E2Config fields too.
        device: where to put the model.

    Example:
        >>> model = create_e2("ViT-B-32", pretrained="laion2b_s34b_b79k")  # doctest: +SKIP
        >>> model = create_e2(None, pretrained="runs/e2/best")  # an E2 checkpoint   # doctest: +SKIP
    """
    if pretrained is not None and is_e2_checkpoint(pretrained):
        saved = read_checkpoint_config(pretrained)
        _check_same_architecture(model_name, saved, pretrained)
        if checkpoint_type(saved) == "clip":  # e.g. a CLIP-FT checkpoint: extend it with new E2 parts
            clip = load_checkpoint(pretrained)
            return E2Model(clip, _resolve_config(None, config, overrides), saved["clip_model"],
                           saved["clip_config"]).to(device)
        e2_config = _resolve_config(E2Config.from_dict(saved["e2_config"]), config, overrides)
        return load_checkpoint(pretrained, e2_config).to(device)

    model_name = model_name or "ViT-B-32"
    e2_config = _resolve_config(None, config, overrides)
    if pretrained is not None and is_reference_checkpoint(pretrained):
        return _import_reference(model_name, pretrained, e2_config).to(device)

    clip = _create_clip(model_name, pretrained, cache_dir=cache_dir)
    return E2Model(clip, e2_config, model_name, _clip_config(model_name, clip)).to(device)


def create_clip(model_name: Optional[str] = None, pretrained: Optional[PathLike] = None, *,
                device: Union[str, torch.device] = "cpu") -> CLIP:
    """open_clip's CLIP (the CLIP-FT baseline), from the same sources as :func:`create_e2`
    (a tag, a CLIP file, or a CLIP checkpoint directory written by ``save_pretrained``)."""
    if pretrained is not None and is_e2_checkpoint(pretrained):
        saved = read_checkpoint_config(pretrained)
        _check_same_architecture(model_name, saved, pretrained)
        if checkpoint_type(saved) != "clip":
            raise CheckpointError(f"{pretrained} holds an E2 model; load it with create_e2")
        return load_checkpoint(pretrained).to(device)
    model_name = model_name or "ViT-B-32"
    clip = _create_clip(model_name, pretrained)
    clip.clip_model, clip.clip_config = model_name, _clip_config(model_name, clip)
    return clip.to(device)


def load_encoder(model_name: Optional[str] = None, pretrained: Optional[PathLike] = None, *,
                 device: Union[str, torch.device] = "cpu"):
    """Whatever a checkpoint directory holds (E2 or CLIP), else an E2 model as :func:`create_e2` builds it."""
    if pretrained is not None and is_e2_checkpoint(pretrained) and \
            checkpoint_type(read_checkpoint_config(pretrained)) == "clip":
        return create_clip(model_name, pretrained, device=device)
    return create_e2(model_name, pretrained, device=device)


def _create_clip(model_name: str, pretrained: Optional[PathLike], **kwargs) -> CLIP:
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown model {model_name!r}: not an open_clip architecture. "
                         f"E2 can extend: {', '.join(list_models())}")
    if not _is_supported(cfg):
        raise ValueError(f"{model_name} has no class-token ViT image tower with open_clip's native text tower, "
                         f"which E2 extends. Supported: {', '.join(list_models())}")
    if pretrained is not None and not os.path.exists(pretrained) and str(pretrained) not in \
            open_clip.list_pretrained_tags_by_model(model_name):
        raise ValueError(f"pretrained={str(pretrained)!r} is neither a file, an E2 checkpoint directory, nor an "
                         f"open_clip tag for {model_name} (tags: {open_clip.list_pretrained_tags_by_model(model_name)})")
    try:
        return open_clip.create_model(model_name, pretrained=None if pretrained is None else str(pretrained),
                                      output_dict=True, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
        hint = ("download failed; on an offline machine pass a local CLIP checkpoint file instead"
                if not os.path.exists(str(pretrained)) else "is it a CLIP checkpoint of this architecture?")
        raise CheckpointError(f"could not load CLIP weights {pretrained!r} for {model_name}: {err} ({hint})") from err


def _clip_config(model_name: str, clip: CLIP) -> Dict[str, Any]:
    cfg = dict(open_clip.get_model_config(model_name))
    cfg["quick_gelu"] = isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    return cfg


def _check_same_architecture(model_name: Optional[str], saved: Mapping[str, Any], path: PathLike) -> None:
    if model_name is None:
        return
    requested = open_clip.get_model_config(model_name)
    saved_cfg = {k: v for k, v in saved["clip_config"].items() if k != "quick_gelu"}
    if requested is None or saved_cfg != requested:
        raise CheckpointError(
            f"checkpoint {path} holds an E2 {saved['clip_model']} (vision {_describe(saved_cfg)}), but "
            f"{model_name} (vision {_describe(requested)}) was requested; pass model_name={saved['clip_model']!r} "
            "or None to use the checkpoint's own architecture")


def _describe(cfg: Optional[Mapping[str, Any]]) -> str:
    if not cfg:
        return "unknown"
    v = cfg.get("vision_cfg", {})
    return f"width {v.get('width')}, {v.get('layers')} layers, patch {v.get('patch_size')}, {v.get('image_size')} px"


def _import_reference(model_name: str, path: PathLike, config: E2Config) -> E2Model:
    config = config.replace(compat="reference")
    clip = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=True, output_dict=True)
    model = E2Model(clip, config, model_name, _clip_config(model_name, clip))
    load_state_dict_checked(model, load_reference_state_dict(path, model), source=str(path))
    return model


def import_reference_checkpoint(path: PathLike, model_name: str = "ViT-B-32", **overrides) -> E2Model:
    """Load a checkpoint trained with the authors' reference code (``{'state_dict': ...}`` in a
    ``.pth``) into an E2Model in ``compat='reference'`` mode, which reproduces its forward pass
    (deterministic selection)."""
    return _import_reference(model_name, path, _resolve_config(None, None, overrides))


def create_e2_and_transforms(model_name: Optional[str] = None, pretrained: Optional[PathLike] = None,
                             **kwargs) -> Tuple[E2Model, Any, Any]:
    """``(model, preprocess_train, preprocess_val)``, the transforms of the backbone's pretrained config."""
    model = create_e2(model_name, pretrained, **kwargs)
    return (model, *image_transforms(model))


def image_transforms(model) -> Tuple[Any, Any]:
    """``(preprocess_train, preprocess_val)`` of an E2 model or CLIP, from its preprocessing config."""
    preprocess_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(preprocess_cfg, is_train=True), image_transform_v2(preprocess_cfg, is_train=False)


def get_tokenizer(model: Union[CLIP, PathLike] = "ViT-B-32"):
    """open_clip's tokenizer for a model of this package, an architecture name, or a checkpoint directory."""
    if isinstance(model, CLIP) and hasattr(model, "clip_model"):
        name, context_length = model.clip_model, model.context_length
    elif is_e2_checkpoint(model):
        saved = read_checkpoint_config(model)
        name, context_length = saved["clip_model"], saved["clip_config"].get("text_cfg", {}).get("context_length")
    else:
        return open_clip.get_tokenizer(str(model))
    if open_clip.get_model_config(name) is not None:
        return open_clip.get_tokenizer(name, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length or 77)
