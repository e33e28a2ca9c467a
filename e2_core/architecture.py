"""open_clip architectures: which ones E2 extends, and the config that rebuilds a given CLIP.

A checkpoint stores the open_clip config of its CLIP (``embed_dim``, ``vision_cfg``, ``text_cfg``,
``quick_gelu``). For a CLIP built from a named architecture that is the named config; for a CLIP
built any other way it is read off the modules (:func:`clip_config_of`) and checked by rebuilding.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import open_clip
import torch
from open_clip.model import CLIP, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg
from open_clip.transformer import LayerScale, QuickGELU, VisionTransformer
from torch import nn

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)


def list_models() -> List[str]:
    """open_clip architectures E2 can extend: class-token ViT image tower, native text tower."""
    return [name for name in open_clip.list_models() if is_supported(open_clip.get_model_config(name))]


def is_supported(cfg: Optional[Mapping[str, Any]]) -> bool:
    if not cfg or "multimodal_cfg" in cfg or cfg.get("custom_text"):
        return False
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    return (isinstance(vision.get("layers", 12), int) and not vision.get("timm_model_name")
            and not vision.get("attentional_pool") and vision.get("pool_type", "tok") == "tok"
            and not text.get("hf_model_name"))


def tokenizer_for(arch: Optional[str], context_length: int):
    """open_clip's tokenizer of a named architecture, else its plain BPE tokenizer at ``context_length``."""
    if arch and open_clip.get_model_config(arch) is not None:
        return open_clip.get_tokenizer(arch, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length)


def named_config(arch: str, clip: Optional[CLIP] = None) -> Dict[str, Any]:
    """open_clip's config of ``arch``, with ``quick_gelu`` as the given CLIP was built."""
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; E2 can extend: {', '.join(list_models())}")
    cfg = dict(cfg)
    if clip is not None:
        cfg["quick_gelu"] = _uses_quick_gelu(clip)
    return cfg


def clip_config_of(clip: CLIP, arch: Optional[str] = None) -> Dict[str, Any]:
    """The open_clip config that rebuilds ``clip`` (architecture and parameter shapes).

    ``arch`` names it when known; otherwise it is read off the modules (ViT image tower and
    native text tower) and verified by rebuilding the CLIP on the meta device.
    """
    if arch is not None and open_clip.get_model_config(arch) is not None:
        return named_config(arch, clip)
    visual = clip.visual
    if type(visual) is not VisionTransformer or type(clip) is not CLIP:
        raise ValueError(f"cannot read the configuration of a {type(clip).__name__} with a "
                         f"{type(visual).__name__} image tower; name its open_clip architecture (arch=...)")
    v_block, t_block = visual.transformer.resblocks[0], clip.transformer.resblocks[0]
    width, text_width = visual.conv1.out_channels, clip.token_embedding.embedding_dim
    projection = clip.text_projection
    image_size, patch_size = tuple(visual.image_size), tuple(visual.patch_size)
    cfg = {
        "embed_dim": _output_dim(projection, text_width),
        "quick_gelu": _uses_quick_gelu(clip),
        "vision_cfg": {
            "image_size": image_size[0] if image_size[0] == image_size[1] else list(image_size),
            "patch_size": patch_size[0],
            "width": width,
            "layers": len(visual.transformer.resblocks),
            "head_width": width // v_block.attn.num_heads,
            "mlp_ratio": v_block.mlp.c_fc.out_features / width,
            "ls_init_value": 1.0 if isinstance(v_block.ls_1, LayerScale) else None,
            "no_ln_pre": isinstance(visual.ln_pre, nn.Identity),
            "final_ln_after_pool": visual.final_ln_after_pool,
            "pool_type": visual.pool_type,
        },
        "text_cfg": {
            "context_length": clip.context_length,
            "vocab_size": clip.vocab_size,
            "width": text_width,
            "heads": t_block.attn.num_heads,
            "layers": len(clip.transformer.resblocks),
            "mlp_ratio": t_block.mlp.c_fc.out_features / text_width,
            "ls_init_value": 1.0 if isinstance(t_block.ls_1, LayerScale) else None,
            "no_causal_mask": clip.attn_mask is None,
            "pool_type": clip.text_pool_type,
            "eos_id": clip.text_eos_id,
            "proj_type": "none" if projection is None else "linear",
            "proj_bias": isinstance(projection, nn.Linear) and projection.bias is not None,
        },
    }
    if clip.logit_bias is not None:
        cfg["init_logit_bias"] = 0.0
    if clip.logit_scale.ndim:
        cfg["nonscalar_logit_scale"] = True
    _check_rebuilds(clip, cfg)
    return cfg


def random_clip(arch: str) -> CLIP:
    """open_clip's architecture ``arch`` with random weights and its default preprocessing: the same
    weights for the same seed as ``open_clip.create_model(arch)``, without its "initialized randomly"
    warning (the trainer loads a checkpoint next, or says itself that it starts from random weights)."""
    cfg = named_config(arch)  # an unknown architecture is refused with the list of known ones
    size = cfg["vision_cfg"]["image_size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return build_clip(cfg, dataclasses.asdict(PreprocessCfg(size=size)))


def build_clip(clip_config: Mapping[str, Any], preprocess_cfg: Optional[Mapping[str, Any]] = None) -> CLIP:
    """A CLIP (random weights) from a config written by :func:`clip_config_of` or ``named_config``."""
    cfg = {k: v for k, v in clip_config.items() if k not in ("custom_text",)}
    clip = CLIP(**cfg, output_dict=True)
    if preprocess_cfg:  # JSON turned its tuples (mean, std, size) into lists
        set_model_preprocess_cfg(clip, {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess_cfg.items()})
    return clip


def _check_rebuilds(clip: CLIP, cfg: Mapping[str, Any]) -> None:
    with torch.device("meta"):
        rebuilt = build_clip(cfg)
    want = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        differ = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise ValueError(f"could not read this CLIP's configuration off its modules (differs at {differ[:3]}); "
                         "name its open_clip architecture (arch=...)")


def _output_dim(projection, text_width: int) -> int:
    if projection is None:
        return text_width
    return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]


def _uses_quick_gelu(clip: nn.Module) -> bool:
    return isinstance(clip.transformer.resblocks[0].mlp.gelu, QuickGELU)
