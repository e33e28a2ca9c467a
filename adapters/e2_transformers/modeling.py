"""E2 as Hugging Face transformers models.

* :class:`E2VisionModelWithProjection` - E2's image tower in the form of ``CLIPVisionModelWithProjection``
  (``image_embeds``, ``last_hidden_state``, ``hidden_states``), e.g. a diffusers pipeline's ``image_encoder``.
* :class:`E2CLIPModel` - the whole encoder in the form of ``CLIPModel`` (``get_image_features``,
  ``get_text_features``, ``forward`` -> ``CLIPOutput``).
* The text tower is CLIP's, unchanged in architecture: it becomes transformers' own
  ``CLIPTextModelWithProjection`` (:func:`clip_text_model`), and a CLIP encoder becomes a plain ``CLIPModel``
  (:func:`clip_model`), loadable without this package.

Every conversion is checked on a probe input against the encoder it came from before it is returned.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                          PretrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput, CLIPVisionModelOutput

from e2_core.checkpoint import build_model, checkpoint_config
from e2_core.model import E2VisionTransformer

#: transformers 5 returns an output object (``pooler_output``) from ``get_*_features``; 4.x a tensor.
FEATURES_AS_OUTPUT = int(transformers.__version__.split(".")[0]) >= 5
#: written next to a saved model so that ``trust_remote_code=True`` loads it, or says what to install
REMOTE_CODE = "modeling_e2.py"
_REMOTE_CODE_TEXT = '''"""An E2 encoder saved by the e2-plugins package, which holds its model code."""
try:
    from e2_transformers.modeling import E2CLIPConfig, E2CLIPModel, E2VisionConfig, E2VisionModelWithProjection
except ImportError as err:
    raise ImportError("this model is an E2 encoder saved by e2-plugins; install that package from its source "
                      "checkout (pip install -e <checkout>, as its README says) to load it") from err
'''


# --- configs ---------------------------------------------------------------------------------------
class E2VisionConfig(PretrainedConfig):
    """Config of :class:`E2VisionModelWithProjection`: ``encoder`` is the e2-plugins checkpoint config."""

    model_type = "e2_vision_model"

    def __init__(self, encoder: Optional[Dict[str, Any]] = None, **kwargs):
        self.encoder = dict(encoder or {})
        kwargs.setdefault("auto_map", {"AutoConfig": "modeling_e2.E2VisionConfig",
                                       "AutoModel": "modeling_e2.E2VisionModelWithProjection"})
        super().__init__(**kwargs)

    @property
    def image_size(self) -> int:
        size = self.encoder.get("clip_config", {}).get("vision_cfg", {}).get("image_size", 224)
        return size if isinstance(size, int) else size[0]

    @property
    def hidden_size(self) -> int:
        return self.encoder.get("clip_config", {}).get("vision_cfg", {}).get("width", 0)

    @property
    def projection_dim(self) -> int:
        return self.encoder.get("clip_config", {}).get("embed_dim", 0)


class E2CLIPConfig(PretrainedConfig):
    """Config of :class:`E2CLIPModel`: E2's image tower (``vision_config.encoder``) and CLIP's text tower."""

    model_type = "e2_clip"

    def __init__(self, vision_config: Optional[Dict[str, Any]] = None, text_config: Optional[Dict[str, Any]] = None,
                 projection_dim: int = 512, logit_scale_init_value: float = 2.6592, **kwargs):
        self.vision_config = _as_dict(vision_config)
        self.text_config = _as_dict(text_config)
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        kwargs.setdefault("auto_map", {"AutoConfig": "modeling_e2.E2CLIPConfig", "AutoModel": "modeling_e2.E2CLIPModel",
                                       "AutoModelForZeroShotImageClassification": "modeling_e2.E2CLIPModel"})
        super().__init__(**kwargs)


def _as_dict(config) -> Dict[str, Any]:
    return config.to_dict() if isinstance(config, PretrainedConfig) else dict(config or {})


class _E2PreTrainedModel(PreTrainedModel):
    """Weights always come from an E2 encoder or a saved model: nothing to initialise."""

    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        pass

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, plus a loader file so that ``AutoModel.from_pretrained(...,
        trust_remote_code=True)`` works (and, without this package, says what to install)."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / REMOTE_CODE).write_text(_REMOTE_CODE_TEXT)
        return out


# --- the image tower -------------------------------------------------------------------------------
class HiddenStates(tuple):
    """Per-layer hidden states in CLIP's layout ``[CLS, patches]``; a layer after E2 dropped the patches has
    none, and asking for it raises instead of returning a sequence of another shape."""

    def __new__(cls, states: Sequence[Optional[torch.Tensor]], dropped_after: int):
        obj = super().__new__(cls, states)
        obj.dropped_after = dropped_after
        return obj

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if item is None or (isinstance(item, tuple) and any(x is None for x in item)):
            raise IndexError(f"E2 drops the image patches after layer {self.dropped_after}: per-patch hidden states "
                             f"exist for hidden_states[0..{self.dropped_after}] only (the final tokens are in "
                             "last_hidden_state: [CLS, selection tokens])")
        return item

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class E2VisionModelWithProjection(_E2PreTrainedModel):
    """E2's image tower with ``CLIPVisionModelWithProjection``'s outputs.

    ``image_embeds`` is E2's global embedding (not normalised, as CLIP's). ``last_hidden_state`` is the final
    sequence ``[CLS, selection tokens]``; ``hidden_states`` (``output_hidden_states=True``) are in CLIP's layout
    ``[CLS, patches]`` for the layers that still hold the patches (``hidden_states[-2]``, which IP-Adapter Plus
    reads, is among them when the second fusion block sits before the last layer, the default).
    """

    config_class = E2VisionConfig
    base_model_prefix = "e2_vision"

    def __init__(self, config: E2VisionConfig):
        super().__init__(config)
        visual = build_model(config.encoder).visual
        if not isinstance(visual, E2VisionTransformer):
            raise ValueError("E2VisionModelWithProjection holds an E2 image tower; a CLIP becomes transformers' "
                             "CLIPVisionModelWithProjection (e2_transformers.clip_model)")
        self.visual = visual
        self.post_init()

    @classmethod
    def from_encoder(cls, encoder) -> "E2VisionModelWithProjection":
        """The image tower of an E2 :class:`~e2_core.Encoder`, checked against it."""
        _require_e2(encoder)
        model = cls(E2VisionConfig(encoder=checkpoint_config(encoder.model, encoder.arch)))
        model.visual.load_state_dict(encoder.model.visual.state_dict())
        _check_image(model, encoder)
        return model.to(encoder.device).eval()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs) -> CLIPVisionModelOutput:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        out = self.visual.forward_features(pixel_values.to(self.dtype), regional=False, output_hidden_states=True)
        num_tokens = self.visual.config.num_tokens
        final = out.hidden_states[-1]
        last = torch.cat([final[:, num_tokens:num_tokens + 1], final[:, :num_tokens]], dim=1)
        hidden = None
        if output_hidden_states:
            full = out.hidden_states[0].shape[1]
            states = [h[:, num_tokens:] if h.shape[1] == full else None for h in out.hidden_states]
            hidden = HiddenStates(states, dropped_after=sum(s is not None for s in states) - 1)
        result = CLIPVisionModelOutput(image_embeds=out.image_features, last_hidden_state=last, hidden_states=hidden)
        return result if return_dict is not False else result.to_tuple()


# --- the text tower and plain CLIPs: transformers' own classes ------------------------------------
def clip_text_model(encoder, projection: bool = True):
    """The encoder's text tower (CLIP's, also in E2) as transformers' ``CLIPTextModelWithProjection``
    (``projection=False``: ``CLIPTextModel``, per-token states as a Stable Diffusion ``text_encoder`` reads them)."""
    clip = encoder.model
    config = _text_config(encoder)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    tower = _tower(model, "final_layer_norm")
    with torch.no_grad():
        tower.embeddings.token_embedding.weight.copy_(clip.token_embedding.weight)
        tower.embeddings.position_embedding.weight.copy_(clip.positional_embedding)
        _copy_blocks(tower.encoder.layers, clip.transformer.resblocks)
        _copy_norm(tower.final_layer_norm, clip.ln_final)
        if projection:
            model.text_projection.weight.copy_(_projection(clip.text_projection).T)
    _check_text(model, encoder)
    return model.to(encoder.device).eval()


def clip_model(encoder) -> CLIPModel:
    """A CLIP :class:`~e2_core.Encoder` as transformers' ``CLIPModel`` (no E2 code needed to load it again)."""
    if encoder.has_regions:
        raise ValueError(f"{encoder.name} is an E2: its image tower is not CLIP's; use E2CLIPModel.from_encoder")
    clip, text = encoder.model, _text_config(encoder)
    vision_cfg = encoder.clip_config()["vision_cfg"]
    width = vision_cfg["width"]
    size = vision_cfg["image_size"]
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * vision_cfg.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision_cfg["layers"], num_attention_heads=width // vision_cfg.get("head_width", 64),
        image_size=size if isinstance(size, int) else size[0], patch_size=vision_cfg["patch_size"],
        projection_dim=encoder.embed_dim, hidden_act=text.hidden_act, layer_norm_eps=1e-5)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=encoder.embed_dim))
    text_model = clip_text_model(encoder).cpu()
    tower = _tower(model, "pre_layrnorm")
    visual = clip.visual
    with torch.no_grad():
        _tower(model, "final_layer_norm").load_state_dict(_tower(text_model, "final_layer_norm").state_dict())
        model.text_projection.weight.copy_(text_model.text_projection.weight)
        tower.embeddings.class_embedding.copy_(visual.class_embedding)
        tower.embeddings.patch_embedding.weight.copy_(visual.conv1.weight)
        tower.embeddings.position_embedding.weight.copy_(visual.positional_embedding)
        _copy_norm(tower.pre_layrnorm, visual.ln_pre)
        _copy_blocks(tower.encoder.layers, visual.transformer.resblocks)
        _copy_norm(tower.post_layernorm, visual.ln_post)
        model.visual_projection.weight.copy_(visual.proj.T)
        model.logit_scale.copy_(clip.logit_scale)
    _check_image(model.eval(), encoder)
    _check_text(model, encoder)
    return model.to(encoder.device).eval()


def _text_config(encoder) -> CLIPTextConfig:
    cfg = encoder.clip_config()
    text = cfg["text_cfg"]
    tokenizer = encoder.tokenizer
    return CLIPTextConfig(
        vocab_size=text.get("vocab_size", 49408), hidden_size=text["width"],
        intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)), projection_dim=encoder.embed_dim,
        num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
        max_position_embeddings=text.get("context_length", 77),
        hidden_act="quick_gelu" if cfg.get("quick_gelu") else "gelu", layer_norm_eps=1e-5,
        bos_token_id=getattr(tokenizer, "sot_token_id", 49406), eos_token_id=getattr(tokenizer, "eot_token_id", 49407),
        pad_token_id=0)


def _copy_blocks(layers, resblocks) -> None:
    """open_clip residual attention blocks -> transformers' CLIPEncoderLayers (same maths, other names)."""
    if len(layers) != len(resblocks):
        raise ValueError(f"{len(resblocks)} blocks cannot fill {len(layers)} layers")
    for hf, oc in zip(layers, resblocks):
        attention = hf.self_attn
        for proj, weight, bias in zip((attention.q_proj, attention.k_proj, attention.v_proj),
                                      oc.attn.in_proj_weight.chunk(3), oc.attn.in_proj_bias.chunk(3)):
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
        attention.out_proj.weight.copy_(oc.attn.out_proj.weight)
        attention.out_proj.bias.copy_(oc.attn.out_proj.bias)
        _copy_norm(hf.layer_norm1, oc.ln_1)
        _copy_norm(hf.layer_norm2, oc.ln_2)
        hf.mlp.fc1.load_state_dict(oc.mlp.c_fc.state_dict())
        hf.mlp.fc2.load_state_dict(oc.mlp.c_proj.state_dict())


def _copy_norm(target: nn.LayerNorm, source: nn.LayerNorm) -> None:
    target.weight.copy_(source.weight)
    target.bias.copy_(source.bias)


def _projection(projection) -> torch.Tensor:
    """open_clip's projection as the (width, dim) matrix ``x @ P``."""
    return projection.weight.T if isinstance(projection, nn.Linear) else projection


def _tower(model: nn.Module, marker: str) -> nn.Module:
    """The text (``final_layer_norm``) or vision (``pre_layrnorm``) transformer inside a transformers CLIP
    model, whichever class holds it in the installed version."""
    return next(m for m in model.modules() if hasattr(m, marker) and hasattr(m, "encoder"))


# --- the whole encoder ----------------------------------------------------------------------------
class E2CLIPModel(_E2PreTrainedModel):
    """An E2 encoder with ``CLIPModel``'s interface: E2's image tower and transformers' CLIP text tower.

    ``get_image_features`` / ``get_text_features`` return what the installed transformers' ``CLIPModel``
    returns (5.x: an output whose ``pooler_output`` is the projected embedding; 4.x: the tensor).
    """

    config_class = E2CLIPConfig
    base_model_prefix = "e2_clip"

    def __init__(self, config: E2CLIPConfig):
        super().__init__(config)
        self.vision_model = E2VisionModelWithProjection(E2VisionConfig(**config.vision_config))
        self.text_model = CLIPTextModelWithProjection(CLIPTextConfig(**config.text_config))
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    @classmethod
    def from_encoder(cls, encoder) -> "E2CLIPModel":
        """An E2 :class:`~e2_core.Encoder` as a ``CLIPModel``-compatible model, checked against it."""
        _require_e2(encoder)
        vision, text = E2VisionModelWithProjection.from_encoder(encoder), clip_text_model(encoder)
        model = cls(E2CLIPConfig(vision_config=vision.config, text_config=text.config,
                                 projection_dim=encoder.embed_dim))
        model.vision_model.load_state_dict(vision.state_dict())
        model.text_model.load_state_dict(text.state_dict())
        with torch.no_grad():
            model.logit_scale.copy_(encoder.model.logit_scale)
        return model.to(encoder.device).eval()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs):
        out = self.vision_model(pixel_values, **kwargs)
        return _features(out.image_embeds, out)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          position_ids: Optional[torch.Tensor] = None, **kwargs):
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return _features(out.text_embeds, out)

    def forward(self, input_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                return_loss: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs) -> CLIPOutput:
        vision = self.vision_model(pixel_values)
        text = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        image_embeds = F.normalize(vision.image_embeds, dim=-1)
        text_embeds = F.normalize(text.text_embeds, dim=-1)
        logits_per_text = text_embeds @ image_embeds.T * self.logit_scale.exp()
        loss = None
        if return_loss:
            targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
            loss = (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.T, targets)) / 2
        result = CLIPOutput(loss=loss, logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                            text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text,
                            vision_model_output=vision)
        return result if return_dict is not False else result.to_tuple()


def _features(embeds: torch.Tensor, out) -> Any:
    if not FEATURES_AS_OUTPUT:
        return embeds
    return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=embeds,
                                      hidden_states=out.hidden_states)


def _require_e2(encoder) -> None:
    if not encoder.has_regions:
        raise ValueError(f"{encoder.name} is a CLIP: e2_transformers.clip_model gives it as transformers' CLIPModel")


# --- checks: a conversion is returned only when it computes what the encoder computes --------------
@contextmanager
def _evaluating(encoder):
    """The encoder in eval mode (E2 picks patches deterministically), its mode restored after."""
    was_training = encoder.training
    encoder.eval()
    try:
        yield encoder
    finally:
        encoder.train(was_training)


def _check_image(model: nn.Module, encoder) -> None:
    size = encoder.clip_config()["vision_cfg"]["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _evaluating(encoder):
        want = encoder.encode_image(pixels.to(encoder.device, encoder.dtype)).float().cpu()
        out = model.cpu().float().eval()(pixel_values=pixels) if not isinstance(model, CLIPModel) else None
        got = out.image_embeds if out is not None else _pooled(model.get_image_features(pixel_values=pixels))
    _compare("image", got.float(), want)


def _check_text(model: nn.Module, encoder) -> None:
    tokens = encoder.tokenizer(["a photo of a red wool coat", "prada"]).cpu()
    with torch.no_grad(), _evaluating(encoder):
        want = encoder.encode_text(tokens.to(encoder.device)).float().cpu()
        model = model.cpu().float().eval()
        if isinstance(model, CLIPModel):
            got = _pooled(model.get_text_features(input_ids=tokens))
        elif isinstance(model, CLIPTextModelWithProjection):
            got = model(input_ids=tokens).text_embeds
        else:  # per-token model: its pooled state, projected as the encoder projects it
            got = model(input_ids=tokens).pooler_output @ _projection(encoder.model.text_projection).float().cpu()
    _compare("text", got.float(), want)


def _pooled(features) -> torch.Tensor:
    return features.pooler_output if hasattr(features, "pooler_output") else features


def _compare(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    error = (got - want).abs().max().item()
    if error > 1e-4 * max(1.0, want.abs().max().item()):
        raise ValueError(f"the transformers {what} tower does not reproduce the encoder (max abs diff {error:.2e}): "
                         "this open_clip configuration has a feature the conversion does not map")


__all__ = ["E2CLIPConfig", "E2CLIPModel", "E2VisionConfig", "E2VisionModelWithProjection", "FEATURES_AS_OUTPUT",
           "HiddenStates", "clip_model", "clip_text_model"]
