"""The front door: :func:`load_encoder` (any encoder a task can use, by one string) and
:func:`create_e2` (the open_clip-style builder of an E2 model on a CLIP).

Encoder sources, tried in this order:
  * an existing path: a checkpoint directory of this package (E2 or CLIP, ``save_pretrained``),
    or a checkpoint file of the authors' reference implementation (``best.pth``);
  * ``SCHEME:NAME`` for a scheme registered in the ``e2_plugins.encoders`` entry-point group,
    e.g. ``demo:e2`` and ``demo:clip-ft`` (the demo encoders, shipped with the package);
  * ``MODEL:TAG``, open_clip weights, e.g. ``ViT-B-32:openai`` (fetched by open_clip), or
    ``MODEL:FILE``, a local CLIP weights file of that architecture (or a reference checkpoint).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

import open_clip
import torch
from open_clip.model import CLIP

from . import reference
from .architecture import build_clip, is_supported, list_models, named_config, tokenizer_for
from .checkpoint import is_checkpoint, load_checkpoint, load_state_dict_checked, model_type, read_config
from .config import E2Config
from .encoder import Encoder, as_encoder
from .errors import CheckpointError
from .model import E2Model
from .registry import ENCODER_GROUP, discover, get_adapter

PathLike = Union[str, os.PathLike]

SOURCE_FORMS = ("a checkpoint directory (config.json + model.safetensors)",
                "a reference-implementation checkpoint file (best.pth)",
                "SCHEME:NAME of an installed encoder scheme (demo:e2, demo:clip-ft)",
                "MODEL:TAG for open_clip weights (ViT-B-32:openai)",
                "MODEL:FILE for a local CLIP weights file (ViT-B-32:/path/to/clip.pt)")


def load_encoder(source: Any, *, device: Union[str, torch.device] = "cpu", name: Optional[str] = None) -> Encoder:
    """The one door to an encoder: any of the source forms in this module's docstring, or an
    encoder object (an open_clip ``CLIP``, an ``E2Model``, an ``Encoder``).

    A loaded source comes in eval mode, ready for inference: E2's selection then takes each token's
    best patch (in train mode it samples, so embeddings vary from call to call); ``.train()`` to
    fine-tune it. An encoder object keeps the mode it has.

    Example:
        >>> encoder = load_encoder("ViT-B-32:openai")     # open_clip's CLIP     # doctest: +SKIP
        >>> encoder = load_encoder("runs/e2/stage2/best")  # an E2 checkpoint     # doctest: +SKIP
        >>> encoder = load_encoder("demo:e2")              # the demo E2          # doctest: +SKIP
    """
    if not isinstance(source, (str, os.PathLike)):
        return as_encoder(source, name=name).to(device)
    text = str(source)
    encoder = _from_path(text) if os.path.exists(text) else _from_scheme(text)
    encoder.name = name or text
    return encoder.to(device).eval()


def adapt(encoder: Any, target: str, **options) -> Any:
    """``encoder`` (any :func:`load_encoder` source or encoder object) in the form of library ``target``,
    through the adapter registered under that name (``e2-plugins list`` shows them).

    Example:
        >>> model = adapt("demo:e2", "transformers")    # a CLIPModel-compatible E2   # doctest: +SKIP
        >>> model = adapt("demo:e2", "open_clip")       # an open_clip CLIP           # doctest: +SKIP
        >>> image_encoder = adapt("demo:e2", "diffusers")  # a pipeline's image_encoder  # doctest: +SKIP
    """
    adapter = get_adapter(target)
    return adapter.adapt(load_encoder(encoder), **options)


def _from_path(path: str) -> Encoder:
    if is_checkpoint(path):
        saved = read_config(path)
        return Encoder(load_checkpoint(path), name=path, arch=saved.get("clip_model"))
    if Path(path).is_dir():
        raise CheckpointError(f"{path} is a folder without config.json: not a checkpoint directory. Encoder sources: "
                              + "; ".join(SOURCE_FORMS))
    if reference.is_reference_checkpoint(path):
        return Encoder(_import_reference(path, "ViT-B-32"), name=path, arch="ViT-B-32")
    raise CheckpointError(f"{path} is a file: give its open_clip architecture as MODEL:FILE, e.g. ViT-B-32:{path}")


def _from_scheme(text: str) -> Encoder:
    prefix, _, rest = text.partition(":")
    schemes = {p.name: p for p in discover(ENCODER_GROUP)}
    if rest and prefix in schemes:
        found = schemes[prefix].load()(rest)
        return found if isinstance(found, Encoder) else load_encoder(found, name=text)
    if rest and open_clip.get_model_config(prefix) is not None:
        if os.path.isfile(rest) and reference.is_reference_checkpoint(rest):
            return Encoder(_import_reference(rest, prefix), name=text, arch=prefix)
        return Encoder(_open_clip(prefix, rest), name=text, arch=prefix)
    raise ValueError(f"encoder {text!r} is none of: " + "; ".join(SOURCE_FORMS)
                     + (f". Installed schemes: {', '.join(schemes)}" if schemes else ""))


def _import_reference(path: str, arch: str) -> E2Model:
    """An E2 in ``compat="reference"`` mode on OpenAI's CLIP (QuickGELU) with a reference checkpoint's weights."""
    clip = build_clip({**named_config(arch), "quick_gelu": True})  # weights follow: no random-init warning
    model = E2Model(clip, E2Config(compat="reference"), arch)
    load_state_dict_checked(model, reference.load_state_dict(path, model.config.num_tokens), source=path)
    return model


def _open_clip(arch: str, pretrained: Optional[str]) -> CLIP:
    """open_clip's CLIP of ``arch`` with weights from a tag or a local file (``None``: random)."""
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"unknown model {arch!r}: not an open_clip architecture (open_clip.list_models())")
    if pretrained is not None and not os.path.exists(pretrained) and \
            pretrained not in open_clip.list_pretrained_tags_by_model(arch):
        raise ValueError(f"{pretrained!r} is neither a file nor an open_clip tag of {arch} "
                         f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})")
    try:
        return open_clip.create_model(arch, pretrained=pretrained, output_dict=True)
    except Exception as err:  # noqa: BLE001 - whatever a bad file or a failed download raises inside open_clip/torch
        hint = ("the download failed; on an offline machine give a local CLIP weights file as MODEL:FILE"
                if not os.path.exists(str(pretrained)) else "is it a CLIP weights file of this architecture?")
        raise CheckpointError(f"could not load CLIP weights {pretrained!r} for {arch}: {_first_sentence(err)} "
                              f"({hint})") from err


def _first_sentence(err: Exception, limit: int = 240) -> str:
    """The start of an error message, cut at a sentence or word boundary."""
    text = (str(err).splitlines() or [type(err).__name__])[0]
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind("; "))
    return cut[:end + 1] if end > limit // 3 else cut[:cut.rfind(" ")] + " ..."


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
        **overrides,
) -> E2Model:
    """Build an E2 model on an open_clip architecture (open_clip's ``create_model`` for E2).

    Args:
        model_name: open_clip architecture (``list_models()``); ``None``: the checkpoint's, else ViT-B-32.
        pretrained: ``None`` (random CLIP weights), an open_clip tag or CLIP weights file of
            ``model_name``, or any :func:`load_encoder` source. A CLIP gets new E2 parts (selection
            tokens ``width**-0.5 * randn``; fusion ``Wk`` at that scale, ``Wq`` at
            ``query_init_scale`` times it, ``Wv`` the identity; global and regional heads copies of
            CLIP's ``ln_post`` and projection, so E2 starts in CLIP's space). An E2 is returned as saved.
        config: E2Config or dict of fields; ``overrides`` are E2Config fields too. Order: defaults,
            then a saved E2's config, then ``config``, then ``overrides``.
        device: where to put the model.

    Example:
        >>> model = create_e2("ViT-B-32", pretrained="openai")  # doctest: +SKIP
        >>> model = create_e2(pretrained="runs/clip-ft/best")   # E2 on a fine-tuned CLIP  # doctest: +SKIP
    """
    if model_name is not None:
        _check_extendable(model_name)
    if pretrained is None:
        clip, arch = _open_clip(model_name or "ViT-B-32", None), model_name or "ViT-B-32"
    else:
        source = str(pretrained)
        if model_name and not os.path.isdir(source) and (os.path.isfile(source) or ":" not in source):
            source = f"{model_name}:{source}"  # an open_clip tag or weights file of model_name
        encoder = load_encoder(source)
        _check_same_architecture(model_name, encoder, pretrained)
        clip, arch = encoder.model, encoder.arch
    if isinstance(clip, E2Model):
        new = _resolve_config(clip.config, config, overrides)
        if new != clip.config:  # rebuilt, so that a config that changes shapes is refused clearly
            rebuilt = E2Model(build_clip(clip.clip_config, clip.visual.preprocess_cfg), new, arch, clip.clip_config)
            load_state_dict_checked(rebuilt, clip.state_dict(), source=str(pretrained))
            clip = rebuilt
        return clip.to(device)
    if arch is not None:
        _check_extendable(arch)
    return E2Model(clip, _resolve_config(None, config, overrides), arch).to(device)


def _check_extendable(arch: str) -> None:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown model {arch!r}: not an open_clip architecture. E2 can extend: "
                         f"{', '.join(list_models())}")
    if not is_supported(cfg):
        raise ValueError(f"{arch} has no class-token ViT image tower with open_clip's native text tower, "
                         f"which E2 extends. Supported: {', '.join(list_models())}")


def _check_same_architecture(model_name: Optional[str], encoder: Encoder, path) -> None:
    if model_name is None or not is_checkpoint(str(path)):
        return
    saved_cfg = {k: v for k, v in encoder.clip_config().items() if k != "quick_gelu"}
    requested = open_clip.get_model_config(model_name)
    if requested is None or saved_cfg != requested:
        raise CheckpointError(
            f"checkpoint {path} holds a {encoder.kind} {encoder.arch} (vision {_describe(saved_cfg)}), but "
            f"{model_name} (vision {_describe(requested)}) was requested; pass model_name={encoder.arch!r} "
            "or None to use the checkpoint's own architecture")


def _describe(cfg: Optional[Mapping[str, Any]]) -> str:
    if not cfg:
        return "unknown"
    v = cfg.get("vision_cfg", {})
    return f"width {v.get('width')}, {v.get('layers')} layers, patch {v.get('patch_size')}, {v.get('image_size')} px"


def create_e2_and_transforms(model_name: Optional[str] = None, pretrained: Optional[PathLike] = None,
                             **kwargs) -> Tuple[E2Model, Any, Any]:
    """``(model, preprocess_train, preprocess_val)``, as open_clip's ``create_model_and_transforms``."""
    model = create_e2(model_name, pretrained, **kwargs)
    encoder = Encoder(model)
    return model, encoder.preprocess_train, encoder.preprocess


def get_tokenizer(model: Union[str, CLIP, Encoder, PathLike] = "ViT-B-32"):
    """open_clip's tokenizer of an architecture name, a model, an encoder or a checkpoint directory."""
    if isinstance(model, Encoder):
        return model.tokenizer
    if isinstance(model, CLIP):
        return Encoder(model).tokenizer
    if is_checkpoint(model):
        saved = read_config(model)
        return tokenizer_for(saved.get("clip_model"), saved["clip_config"].get("text_cfg", {}).get("context_length", 77))
    return open_clip.get_tokenizer(str(model))


__all__ = ["SOURCE_FORMS", "adapt", "create_e2", "create_e2_and_transforms", "get_tokenizer", "list_models", "load_encoder",
           "model_type"]
