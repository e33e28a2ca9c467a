"""E2 in diffusers pipelines: E2's image tower as the ``image_encoder`` that IP-Adapter reads, and the
encoder's text tower where a pipeline takes a CLIP ``text_encoder``.

Example:
    >>> import e2_core
    >>> pipe = e2_core.adapt("demo:e2", "diffusers", pipeline=pipe)   # pipe.image_encoder is E2  # doctest: +SKIP
    >>> pipe.load_ip_adapter("weights", subfolder="", weight_name="ip-adapter.safetensors")     # doctest: +SKIP
    >>> pipe.save_pretrained("pipe-e2")  # reloads with E2 where e2-plugins is installed       # doctest: +SKIP

The image encoder is :class:`e2_transformers.E2VisionModelWithProjection`: ``image_embeds`` is E2's global
embedding, ``hidden_states[-2]`` (IP-Adapter Plus) the patches in CLIP's layout; a pipeline saved with it
records it as ``e2_transformers``, so loading the pipeline needs this package.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from e2_core.registry import Adapter

#: the components this adapter can fill, and what each is
PARTS = {
    "image_encoder": "E2's image tower (with its feature_extractor): IP-Adapter's image encoder",
    "text_encoder": "the text tower as transformers' CLIPTextModel (per-token states, Stable Diffusion)",
    "text_encoder_2": "the text tower as CLIPTextModelWithProjection (SDXL's second text encoder)",
}
INSTALL = "pip install 'e2-plugins[diffusers]'"


def to_diffusers(encoder, pipeline: Any = None, parts: Optional[Sequence[str]] = None, part: Optional[str] = None):
    """The encoder as diffusers components.

    Args:
        encoder: an :class:`e2_core.Encoder`.
        pipeline: a diffusers pipeline to put them into (``register_modules``, so that ``save_pretrained`` keeps
            them); it is returned. Without one, the component ``part`` is returned.
        parts: the components to replace in ``pipeline`` (see :data:`PARTS`; default ``("image_encoder",)``).
        part: the one component to return when no pipeline is given (default ``image_encoder``).
    """
    _require_diffusers()
    if pipeline is None:
        if parts is not None:
            raise ValueError("parts= names the components to put into a pipeline; without pipeline=, give part=NAME")
        return _component(encoder, part or "image_encoder")
    if part is not None:
        raise ValueError("part= names the one component returned without a pipeline; with pipeline=, give parts=(...)")
    components = {}
    for name in parts or ("image_encoder",):
        if name not in getattr(pipeline, "config", {}):
            raise ValueError(f"{type(pipeline).__name__} has no {name!r} component; it has: "
                             f"{', '.join(k for k in pipeline.config if not k.startswith('_'))}")
        components[name] = _component(encoder, name)
        if name == "image_encoder":
            from e2_transformers import clip_image_processor

            components["feature_extractor"] = clip_image_processor(encoder)
        elif name.startswith("text_encoder"):
            _check_text_width(pipeline, encoder)
            from e2_transformers import clip_tokenizer

            components["tokenizer" + name[len("text_encoder"):]] = clip_tokenizer(encoder)
    pipeline.register_modules(**components)
    return pipeline


def _component(encoder, name: str):
    from e2_transformers import clip_text_model, to_transformers

    if name == "image_encoder":
        return to_transformers(encoder, "vision")
    if name == "text_encoder":
        return clip_text_model(encoder, projection=False)
    if name == "text_encoder_2":
        return clip_text_model(encoder)
    raise ValueError(f"part {name!r}: choose one of {', '.join(PARTS)}")


def _check_text_width(pipeline, encoder) -> None:
    unet = getattr(pipeline, "unet", None)
    wanted = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    width = encoder.token_width
    if wanted is not None and not isinstance(wanted, (list, tuple)) and wanted != width:
        raise ValueError(f"the pipeline's UNet attends to {wanted}-wide text states but {encoder.name}'s text tower "
                         f"is {width} wide: its text_encoder cannot be replaced by this encoder's")


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the diffusers adapter needs diffusers: {INSTALL}") from err


ADAPTER = Adapter(name="diffusers", adapt=to_diffusers, requires="diffusers", install=INSTALL,
                  description="diffusers: E2 as a pipeline's image_encoder (IP-Adapter) or CLIP text_encoder")

__all__ = ["ADAPTER", "INSTALL", "PARTS", "to_diffusers"]
