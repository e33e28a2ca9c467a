"""The checks a checkpoint's ``config.json`` passes before anything is built from it: types and ranges of
every size that decides memory (layers, widths, vocabulary, tokens), and an estimate of the parameters'
memory against what the machine has. A malformed config is one ``CheckpointError`` naming the file and
the field, never an allocator traceback or a process that grows until the system stops it."""
from __future__ import annotations

import os
from numbers import Real
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .errors import CheckpointError

# (path within config.json, allowed types, least, most); a field that is absent is left to its default
LIMITS = [
    (("clip_config", "embed_dim"), int, 1, 16384),
    (("clip_config", "vision_cfg", "layers"), int, 1, 256),
    (("clip_config", "vision_cfg", "width"), int, 1, 16384),
    (("clip_config", "vision_cfg", "head_width"), int, 1, 16384),
    (("clip_config", "vision_cfg", "patch_size"), int, 1, 1024),
    (("clip_config", "vision_cfg", "mlp_ratio"), Real, 0.01, 64),
    (("clip_config", "text_cfg", "context_length"), int, 1, 16384),
    (("clip_config", "text_cfg", "vocab_size"), int, 1, 10_000_000),
    (("clip_config", "text_cfg", "width"), int, 1, 16384),
    (("clip_config", "text_cfg", "heads"), int, 1, 1024),
    (("clip_config", "text_cfg", "layers"), int, 1, 256),
    (("clip_config", "text_cfg", "mlp_ratio"), Real, 0.01, 64),
    (("e2_config", "tokens_per_entity"), int, 1, 256),
    (("format_version",), int, 0, 10**6),
]
SECTIONS = [("clip_config",), ("clip_config", "vision_cfg"), ("clip_config", "text_cfg"), ("e2_config",),
            ("preprocess_cfg",)]


def check_config(file: Path, config: Mapping[str, Any], available: Optional[int] = None) -> None:
    """Raise a ``CheckpointError`` naming ``file`` and the field for the first value out of type or range, or
    for a model whose parameters alone would need more memory than ``available`` bytes (default: this
    machine's physical memory)."""
    for path in SECTIONS:
        value = _get(config, path)
        if value is not None and not isinstance(value, Mapping):
            _fail(file, path, f"must be an object, not {type(value).__name__} {_short(value)}")
    for path, kinds, least, most in LIMITS:
        value = _get(config, path)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            _fail(file, path, f"must be {'an integer' if kinds is int else 'a number'}, not {_short(value)}")
        if not least <= value <= most:
            _fail(file, path, f"is {value}, outside {least} to {most}")
    size = _get(config, ("clip_config", "vision_cfg", "image_size"))
    sizes = size if isinstance(size, list) else [size]
    if size is not None and not (len(sizes) in (1, 2) and all(isinstance(s, int) and not isinstance(s, bool)
                                                              and 1 <= s <= 8192 for s in sizes)):
        _fail(file, ("clip_config", "vision_cfg", "image_size"), f"must be 1 to 8192 (or [height, width]), not "
              f"{_short(size)}")
    entities = _get(config, ("e2_config", "entities"))
    if entities is not None and not (isinstance(entities, list) and 0 < len(entities) <= 256
                                     and all(isinstance(e, str) and e for e in entities)):
        _fail(file, ("e2_config", "entities"), f"must be a list of 1 to 256 names, not {_short(entities)}")
    _check_preprocess(file, config.get("preprocess_cfg"))
    needed = parameter_bytes(config)
    available = _physical_memory() if available is None else available
    if available and needed > available:
        raise CheckpointError(f"{file} describes a model whose parameters alone need about {needed / 2**30:.1f} GiB, "
                              f"more than this machine's {available / 2**30:.1f} GiB; the config is damaged or meant "
                              "for a larger machine")


def parameter_bytes(config: Mapping[str, Any]) -> int:
    """About how many bytes the float32 parameters of the config's model take (transformer blocks and
    embeddings; the rest is small)."""
    vision = _get(config, ("clip_config", "vision_cfg")) or {}
    text = _get(config, ("clip_config", "text_cfg")) or {}
    vw, tw = vision.get("width", 768), text.get("width", 512)
    patches = (_first(vision.get("image_size", 224)) // max(1, vision.get("patch_size", 16))) ** 2 + 1
    count = (vision.get("layers", 12) * 12 * vw * vw + patches * vw + 3 * vision.get("patch_size", 16) ** 2 * vw
             + text.get("layers", 12) * 12 * tw * tw + text.get("vocab_size", 49408) * tw
             + text.get("context_length", 77) * tw)
    return 4 * int(count)


def _check_preprocess(file: Path, cfg: Any) -> None:
    if cfg is None:
        return
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is not None and not (isinstance(value, list) and len(value) in (1, 3) and all(
                isinstance(v, Real) and not isinstance(v, bool) for v in value)):
            _fail(file, ("preprocess_cfg", key), f"must be a list of 3 numbers, not {_short(value)}")
    std = cfg.get("std")
    if std is not None and any(v <= 0 for v in std):
        _fail(file, ("preprocess_cfg", "std"), f"must be positive, not {_short(std)}")
    for key, allowed in (("interpolation", ("bicubic", "bilinear", "nearest", "random")),
                         ("resize_mode", ("shortest", "longest", "squash")), ("mode", ("RGB",))):
        value = cfg.get(key)
        if value is not None and value not in allowed:
            _fail(file, ("preprocess_cfg", key), f"must be one of {', '.join(allowed)}, not {_short(value)}")


def _get(config: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = config
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _first(size: Any) -> int:
    return size[0] if isinstance(size, list) else size


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(file: Path, path: Sequence[str], why: str) -> None:
    raise CheckpointError(f"{file}: field {'.'.join(path)} {why}; restore the file from the run that saved it, or "
                          "use another checkpoint")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no estimate
        return 0
