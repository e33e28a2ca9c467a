"""The E2 encoder: an open_clip CLIP whose image tower gains selection tokens, two fusion blocks
and regional heads. Read top to bottom, ``E2VisionTransformer.forward_features`` follows the
paper's figure."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import reference
from .architecture import clip_config_of
from .config import E2Config
from .fusion import FusionBlock, SelectionTokens
from .heads import RegionalHeads
from .texts import EntityTokens


@dataclass
class E2VisionOutput:
    """What the E2 image tower computes for a batch of images."""

    image_features: torch.Tensor  # (B, D) global embedding (CLS -> ln_post -> proj_cls)
    regional_features: Optional[torch.Tensor]  # (B, K, D) one embedding per tag entity
    selected_patches: torch.Tensor  # (B, 2, T) patch index each selection token picked, per fusion block
    selection_logits: torch.Tensor  # (B, 2, T, N) each token's selection logits over the N patches, per fusion block
    # with output_hidden_states: the sequence entering layer 0, then each layer's output; [tokens, CLS, patches]
    # up to the second fusion block, [tokens, CLS] after it (the patches are dropped there)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


class E2VisionTransformer(nn.Module):
    """Wraps an open_clip ``VisionTransformer`` (kept as ``trunk``) with E2's additions."""

    def __init__(self, trunk: VisionTransformer, config: E2Config):
        super().__init__()
        _check_supported_trunk(trunk)
        self.config = config
        self.trunk = trunk
        width = trunk.conv1.out_channels
        self.fusion_layers = config.resolve_fusion_layers(len(trunk.transformer.resblocks))
        self.selection_tokens = SelectionTokens(config.num_tokens, width)
        logit_scale = reference.selection_logit_scale(config)
        num_patches = trunk.grid_size[0] * trunk.grid_size[1] if config.centre_positions else None
        self.fusion = nn.ModuleList(
            FusionBlock(width, config.query_init_scale, config.value_init, logit_scale, num_patches) for _ in range(2))
        # Global head: a new projection that starts as CLIP's (which it replaces), so the
        # global embedding is in CLIP's joint space from step 0.
        self.proj_cls = nn.Parameter(trunk.proj.detach().clone())
        self.regional_heads = RegionalHeads(*reference.head_layout(config), trunk.ln_post, trunk.proj)
        trunk.proj = None
        self.patch_gate = 0.0  # training only: how much the layers after fusion block 2 still see the patches
        self.set_gumbel_temperature(config.gumbel_tau)
        self.set_stochastic_eval(config.stochastic_eval)

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.trunk.image_size)

    @property
    def grid_size(self) -> Tuple[int, int]:
        return tuple(self.trunk.grid_size)

    @property
    def preprocess_cfg(self) -> Dict[str, Any]:
        """open_clip's preprocessing config of the backbone (mean, std, size, interpolation...)."""
        return getattr(self.trunk, "preprocess_cfg", {})

    def patch_boxes(self, selected_patches: torch.Tensor) -> torch.Tensor:
        """Patch indices (any shape) -> pixel boxes ``(x0, y0, x1, y1)`` in the model's input image."""
        (ph, pw), (_, cols) = self.trunk.patch_size, self.grid_size
        row, col = selected_patches.div(cols, rounding_mode="floor"), selected_patches.remainder(cols)
        return torch.stack([col * pw, row * ph, (col + 1) * pw, (row + 1) * ph], dim=-1)

    def set_gumbel_temperature(self, tau: float, noise: float = 1.0) -> None:
        """The fusion blocks' Gumbel temperature (the gradient's) and noise scale (the forward pick's)."""
        for block in self.fusion:
            block.tau, block.noise = float(tau), float(noise)

    def set_patch_gate(self, gate: float) -> None:
        """In training, let the layers after fusion block 2 still attend to the patches, weighted by ``gate``
        (an attention bias of ``log gate``; 1: as much as to any token, 0: dropped, as evaluation always does)."""
        if not 0.0 <= gate <= 1.0:
            raise ValueError(f"patch gate must be in [0, 1], got {gate}")
        self.patch_gate = float(gate)

    def set_stochastic_eval(self, enabled: bool) -> None:
        for block in self.fusion:
            block.stochastic_eval = bool(enabled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def no_weight_decay(self):
        return {"trunk.positional_embedding", "trunk.class_embedding", "selection_tokens.tokens"}

    def forward_features(self, image: torch.Tensor, regional: bool = True,
                         output_hidden_states: bool = False) -> E2VisionOutput:
        self._check_image(image)
        hidden = [] if output_hidden_states else None
        transformer = self.trunk.transformer
        num_tokens = self.config.num_tokens
        first, second = self.fusion_layers

        x = self.trunk._embeds(image)  # [CLS, patches] + positions, after ln_pre
        tokens = self.trunk.ln_pre(self.selection_tokens(x.shape[0]).to(x.dtype))
        x = torch.cat([tokens, x], dim=1)  # [selection tokens, CLS, patches]
        if hidden is not None:
            hidden.append(x)

        # one-way: CLS and patches do not read the selection tokens before the last layers (CLIP's path unchanged)
        mask = self._attention_mask(x.shape[1], x)
        x = run_layers(transformer, x, 0, first, hidden, mask)
        tokens, picked_1, logits_1 = self.fusion[0](x[:, :num_tokens], x[:, num_tokens + 1:])
        x = torch.cat([tokens, x[:, num_tokens:]], dim=1)

        x = run_layers(transformer, x, first, second, hidden, mask)
        carried = self.config.pick_carry * logits_1.detach() if self.config.pick_carry else None
        tokens, picked_2, logits_2 = self.fusion[1](x[:, :num_tokens], x[:, num_tokens + 1:], carried)
        if self.training and self.patch_gate > 0:  # the patches fade out of the last layers (set_patch_gate)
            x = torch.cat([tokens, x[:, num_tokens:]], dim=1)
            mask = self._attention_mask(x.shape[1], x, after_fusion=True)
            mask = x.new_zeros(x.shape[1], x.shape[1]) if mask is None else mask
            mask[:, num_tokens + 1:] += math.log(self.patch_gate)
            x = run_layers(transformer, x, second, None, hidden, mask)[:, :num_tokens + 1]
        else:
            x = torch.cat([tokens, x[:, num_tokens:num_tokens + 1]], dim=1)  # patches dropped
            # CLS now sees only the selected regions
            x = run_layers(transformer, x, second, None, hidden, self._attention_mask(x.shape[1], x, after_fusion=True))
        image_features = self.trunk.ln_post(x[:, num_tokens]) @ self.proj_cls.to(x.dtype)
        regional_features = self.regional_heads(x[:, :num_tokens]) if regional else None
        return E2VisionOutput(image_features, regional_features, torch.stack([picked_1, picked_2], dim=1),
                              torch.stack([logits_1, logits_2], dim=1), None if hidden is None else tuple(hidden))

    def _attention_mask(self, length: int, like: torch.Tensor, after_fusion: bool = False) -> Optional[torch.Tensor]:
        """Additive attention mask (L, L) over [tokens, CLS, patches...] (``token_attention``; None: no mask).

        Before fusion block 2 (one-way, picks-only, isolated) the rows of CLS and patches may not attend to the
        selection tokens; the tokens' rows may not attend to the patches (picks-only), nor to CLS (isolated), and
        after fusion block 2 (isolated) not to CLS either."""
        attention, num_tokens = self.config.token_attention, self.config.num_tokens
        if attention == "full" or (after_fusion and attention != "isolated"):
            return None
        mask = like.new_zeros(length, length)
        if not after_fusion:
            mask[num_tokens:, :num_tokens] = float("-inf")
        if attention in ("picks-only", "isolated"):
            mask[:num_tokens, num_tokens + 1:] = float("-inf")
        if attention == "isolated":
            mask[:num_tokens, num_tokens] = float("-inf")
        return mask

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_features(image, regional=False).image_features

    def _check_image(self, image: torch.Tensor) -> None:
        expected = (3, *self.image_size)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"E2 image tower expects images of shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(image.shape)}; preprocess with the transforms from create_e2_and_transforms()")


def run_layers(transformer: nn.Module, x: torch.Tensor, start: int = 0, stop: Optional[int] = None,
               hidden: Optional[list] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Blocks ``start:stop`` of an open_clip ``Transformer`` on a batch-first sequence (gradient
    checkpointing honoured, optional additive ``attn_mask``); each block's output is appended to
    ``hidden`` when given."""
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in islice(transformer.resblocks, start, stop):  # slicing would build a ModuleList
        if transformer.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
        if hidden is not None:
            hidden.append(x if transformer.batch_first else x.transpose(0, 1))
    return x if transformer.batch_first else x.transpose(0, 1)


def _check_supported_trunk(trunk: nn.Module) -> None:
    if not isinstance(trunk, VisionTransformer):
        raise TypeError(f"E2 extends open_clip ViT image towers; got {type(trunk).__name__} "
                        "(ResNet and timm towers are not supported)")
    if trunk.attn_pool is not None or trunk.pool_type != "tok":
        raise TypeError("E2 needs a class-token ViT (pool_type='tok', no attentional pooler); "
                        f"got pool_type={trunk.pool_type!r}, attentional pool={trunk.attn_pool is not None}")
    if trunk.proj is None:
        raise TypeError("E2 needs the image tower's projection (visual.proj) to initialise its heads")


# open_clip's CLIP keeps its text tower as these attributes; E2 adopts them unchanged.
_TEXT_MODULES = ("transformer", "token_embedding", "ln_final")
_TEXT_PARAMETERS = ("positional_embedding", "text_projection", "logit_scale", "logit_bias")
_TEXT_ATTRIBUTES = ("context_length", "vocab_size", "text_pool_type", "text_eos_id")


class E2Model(CLIP):
    """An open_clip ``CLIP`` whose image tower is E2's; the text tower is CLIP's, unchanged.

    It is built around an existing CLIP (so every way open_clip loads weights keeps working)
    and keeps CLIP's attributes, so code that reaches into the text tower (token embedding,
    positional embedding, transformer, ``ln_final``, ``text_projection``) works as with CLIP.
    ``encode_image`` returns the global embedding only, as downstream systems expect.

    Example:
        >>> model = create_e2("ViT-B-32")  # doctest: +SKIP
        >>> out = model(images, texts, entity_text)  # dict with global and regional features
    """

    output_dict = True

    def __init__(self, clip: CLIP, config: Optional[E2Config] = None, clip_model: Optional[str] = None,
                 clip_config: Optional[Mapping[str, Any]] = None):
        nn.Module.__init__(self)
        if type(clip) is not CLIP:
            raise TypeError(f"E2 extends open_clip's CLIP with its native text tower; got {type(clip).__name__}")
        self.config = config or E2Config()
        # the CLIP it extends, by open_clip architecture name (when known) and config, for checkpoints
        self.clip_model = clip_model
        self.clip_config = dict(clip_config) if clip_config else clip_config_of(clip, clip_model)
        for name in _TEXT_MODULES + _TEXT_PARAMETERS + _TEXT_ATTRIBUTES:
            setattr(self, name, getattr(clip, name))
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.visual = E2VisionTransformer(clip.visual, self.config)

    @property
    def entities(self) -> Tuple[str, ...]:
        return self.config.entities

    def set_gumbel_temperature(self, tau: float, noise: float = 1.0) -> None:
        self.visual.set_gumbel_temperature(tau, noise)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """CLIP's text tower; token batches shorter than the context are welcome (see ``trim_padding``)."""
        return text_tower(self, text, normalize=normalize)

    def encode_image_regions(self, image: torch.Tensor, normalize: bool = False) -> E2VisionOutput:
        """Global and per-entity image embeddings, and the patches each selection token picked."""
        out = self.visual.forward_features(image)
        if normalize:
            out.image_features = F.normalize(out.image_features, dim=-1)
            out.regional_features = F.normalize(out.regional_features, dim=-1)
        return out

    def encode_entity_text(self, entity_text: EntityTokens, normalize: bool = False) -> torch.Tensor:
        """Each item's entity strings (:func:`tokenize_entities`) -> embeddings (B, K, D).

        Every distinct string is encoded once (brands and seasons repeat across a batch), each length
        bucket cut to its own longest string.
        """
        return encode_texts(self, None, entity_text, self.entities, normalize)[1]

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                entity_text: Optional[EntityTokens] = None):
        """Normalised features and ``logit_scale``, as open_clip's CLIP, plus E2's regional features.

        Returns a dict with ``image_features``, ``text_features``, ``logit_scale`` (and ``logit_bias``
        when the CLIP has one), ``image_regional_features`` (B, K, D), ``selection_logits`` (B, 2, T, N) and
        ``entity_text_features`` (B, K, D) when ``entity_text`` is given. With ``output_dict=False`` it returns the CLIP tuple
        ``(image_features, text_features, logit_scale)``.
        """
        out: Dict[str, torch.Tensor] = {"logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if image is not None:
            vision = self.encode_image_regions(image, normalize=True)
            out["image_features"] = vision.image_features
            out["image_regional_features"] = vision.regional_features
            out["selection_logits"] = vision.selection_logits
        if text is not None or entity_text is not None:
            text_features, entity_text_features = encode_texts(self, text, entity_text, self.entities, normalize=True)
            if text is not None:
                out["text_features"] = text_features
        if entity_text is not None:
            out["entity_text_features"] = entity_text_features
            if image is not None and len(entity_text) != image.shape[0]:
                raise ValueError(f"entity_text has {len(entity_text)} items but the image batch has "
                                 f"{image.shape[0]}: give one row of entity strings per image")
        if self.output_dict:
            return out
        return out.get("image_features"), out.get("text_features"), out["logit_scale"]

    def e2_parameters(self):
        """The parameters E2 adds to CLIP (trained alone in stage 1)."""
        return [p for name, p in self.named_parameters() if is_e2_parameter(name)]


def encode_texts(clip: CLIP, text: Optional[torch.Tensor], entity_text: Optional[EntityTokens],
                 entities: Sequence[str], normalize: bool = False) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The global texts (B, D) and the entity strings (B, K, D) through a CLIP's text tower, the strings in
    their length buckets, with one token-embedding lookup for all."""
    batches = [] if text is None else [text]
    if entity_text is not None:
        if not isinstance(entity_text, EntityTokens):
            raise TypeError(f"entity_text must be EntityTokens from e2_core.tokenize_entities, got "
                            f"{type(entity_text).__name__}")
        if entity_text.index.ndim != 2 or entity_text.index.shape[1] != len(entities):
            raise ValueError(f"entity_text holds {tuple(entity_text.index.shape)} (items, entities) but the "
                             f"model's entities are {list(entities)}: give one string per entity, in that order")
        batches += [entity_text.tokens[start:end, :columns] for start, end, columns in entity_text.spans()]
    features = text_tower_batches(clip, batches, normalize=normalize)
    text_features = features.pop(0) if text is not None else None
    return text_features, None if entity_text is None else torch.cat(features)[entity_text.index]


def text_tower_batches(clip: CLIP, batches: Sequence[torch.Tensor], normalize: bool = False) -> List[torch.Tensor]:
    """:func:`text_tower` on several token batches (of any widths) with one token-embedding lookup, so that
    training builds one dense gradient of the embedding table (100 MB at ViT-B), not one per batch."""
    if not batches:
        return []
    embedded = clip.token_embedding(torch.cat([batch.reshape(-1) for batch in batches]))
    embedded = embedded.split([batch.numel() for batch in batches])
    return [text_tower(clip, batch, rows.view(*batch.shape, -1), normalize=normalize)
            for batch, rows in zip(batches, embedded)]


def text_tower(clip: CLIP, text: torch.Tensor, token_embeddings: Optional[torch.Tensor] = None,
               normalize: bool = False) -> torch.Tensor:
    """CLIP's text tower on token ids ``text`` (B, L), for any ``L`` up to the context length.

    ``token_embeddings`` (B, L, W), when given, replaces the token-embedding lookup (positions are
    still added and ``text`` still decides the pooled position): the primitive of pseudo-token
    methods. Under the causal mask and end-token (argmax) pooling, a batch cut after its longest
    text (:func:`e2_core.texts.trim_padding`) gives the full-length result, so short strings
    (brands, seasons) cost a fraction of the context. Works on any open_clip ``CLIP``.
    """
    length = text.shape[1]
    if length > clip.context_length:
        raise ValueError(f"text has {length} tokens, more than the context length {clip.context_length}")
    if length < clip.context_length and (clip.attn_mask is None or clip.text_pool_type != "argmax"):
        raise ValueError(f"this text tower (pool type {clip.text_pool_type!r}) needs the full context of "
                         f"{clip.context_length} tokens; do not trim the padding")
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(text) if token_embeddings is None else token_embeddings
    x = x.to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    mask = None if clip.attn_mask is None else clip.attn_mask[:length, :length]
    x = clip.ln_final(clip.transformer(x, attn_mask=mask))
    x = text_global_pool(x, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if clip.text_projection is not None:
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def is_e2_parameter(name: str) -> bool:
    """Whether a parameter name belongs to E2's additions rather than to the CLIP it extends."""
    return name.startswith(("visual.selection_tokens.", "visual.fusion.", "visual.proj_cls",
                            "visual.regional_heads."))
