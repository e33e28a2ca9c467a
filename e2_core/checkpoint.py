"""Checkpoints of this package: a directory with ``config.json`` (the open_clip architecture and
config, the preprocessing config, and the ``E2Config`` of an E2 model) and ``model.safetensors``.
An E2 model and a CLIP (any open_clip ``CLIP``) are written alike; ``model_type`` tells them apart.
A tensor may be stored as some of its rows (``compact_state_dict``: ``NAME`` holds the rows,
``NAME.kept_rows`` their indices, the other rows load as zeros) and in half precision; it loads into
the full-size, full-precision model. Nothing here unpickles anything."""
from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from open_clip.model import CLIP
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .architecture import build_clip, clip_config_of
from .config import E2Config
from .config_check import check_config
from .errors import CheckpointError
from .model import E2Model

FORMAT = "e2-plugins/encoder"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KEPT_ROWS = ".kept_rows"

PathLike = Union[str, os.PathLike]


def save_pretrained(model, path: PathLike, *, arch: Optional[str] = None,
                    state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write an :class:`~e2_core.Encoder`, an ``E2Model`` or any open_clip ``CLIP`` to directory
    ``path`` (created if needed); files are replaced atomically.

    Args:
        model: what to save.
        arch: the open_clip architecture name of a CLIP, when known (else read off its modules).
        state_dict: the tensors to write instead of ``model.state_dict()`` (e.g. LoRA merged).

    Example:
        >>> save_pretrained(encoder, "runs/e2-demo")            # doctest: +SKIP
        >>> encoder = load_encoder("runs/e2-demo")              # doctest: +SKIP
    """
    if hasattr(model, "encode_text_with_pseudo_tokens") and hasattr(model, "model"):  # an Encoder
        arch, model = arch or model.arch, model.model
    if not isinstance(model, CLIP):
        raise TypeError(f"save_pretrained takes an Encoder, an E2Model or an open_clip CLIP, got {type(model).__name__}")
    config = checkpoint_config(model, arch)
    state_dict = model.state_dict() if state_dict is None else state_dict
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(state_dict, path / WEIGHTS_NAME, {"format": FORMAT})
    _atomic_write(path / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2)))
    return path


def compact_state_dict(state_dict: Mapping[str, torch.Tensor], kept_rows: Mapping[str, torch.Tensor],
                       dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    """A smaller copy of ``state_dict`` for :func:`save_pretrained`: floating tensors in ``dtype``, and each
    tensor named in ``kept_rows`` stored as those rows only (e.g. the token embedding rows of the
    vocabulary a model was trained on; the others load as zeros)."""
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    for name, rows in kept_rows.items():
        rows = torch.as_tensor(rows, dtype=torch.int64).unique()
        out[name], out[name + KEPT_ROWS] = out[name][rows], rows
    return out


def _expand_kept_rows(state_dict: Dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str) -> None:
    for key in [k for k in state_dict if k.endswith(KEPT_ROWS)]:
        name, rows = key[: -len(KEPT_ROWS)], state_dict.pop(key)
        if name not in state_dict or name not in own:
            continue  # reported as unexpected / missing by the shape check
        values, full = state_dict[name], torch.zeros_like(own[name])
        if rows.ndim != 1 or len(rows) != len(values) or values.shape[1:] != full.shape[1:] or \
                (len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < len(full)):
            raise CheckpointError(f"{source}: {key} does not index {name} of shape {tuple(full.shape)}; "
                                  "the checkpoint is corrupt")
        full[rows] = values.to(full.dtype)
        state_dict[name] = full


def checkpoint_config(model: CLIP, arch: Optional[str] = None) -> Dict[str, Any]:
    """The ``config.json`` that rebuilds ``model`` (an ``E2Model`` or an open_clip ``CLIP``) with :func:`build_model`."""
    is_e2 = isinstance(model, E2Model)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": "e2" if is_e2 else "clip",
        "clip_model": model.clip_model if is_e2 else arch,
        "clip_config": model.clip_config if is_e2 else clip_config_of(model, arch),
        "preprocess_cfg": dict(getattr(model.visual, "preprocess_cfg", {})),
    }
    if is_e2:
        config["e2_config"] = model.config.to_dict()
    return config


def save_tensors(tensors: Mapping[str, torch.Tensor], path: PathLike,
                 metadata: Optional[Mapping[str, str]] = None) -> Path:
    """A safetensors file, written atomically with the user's normal permissions (contiguous CPU copies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    size = sum(v.numel() * v.element_size() for v in data.values())
    _atomic_write(path, lambda f: save_file(data, f, metadata=dict(metadata) if metadata else None), size)
    return path


#: a temporary file older than this in a folder being written was left by a run that was killed: removed
STALE_SECONDS = 3600


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the ``.*.tmp`` files :func:`_atomic_write` leaves when its process is killed, once they are
    older than :data:`STALE_SECONDS` (a younger one may be another process's write in progress)."""
    for leftover in Path(folder).glob(".*.tmp"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_SECONDS:
                leftover.unlink()
        except OSError:  # another process removed or renamed it meanwhile
            pass


#: errno of a write that found no room: a full device (ENOSPC) or the process's file-size limit (EFBIG)
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _atomic_write(target: Path, write, size: Optional[int] = None) -> None:
    """``write(temporary path)``, then the file renamed into place: a reader sees the old file or the whole
    new one, never part of it; the temporary file is removed whatever happens. A write that finds no room is
    an ``OSError`` naming ``target`` and the space it needs (about ``size`` bytes, when known)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except (OSError, SafetensorError) as err:
        if not _no_room(err):
            raise
        needed = f" (about {size / 1e6:.1f} MB)" if size else ""
        raise OSError(errno.ENOSPC, f"no space left on the device to write it{needed}; free space and run the same "
                      "command again", str(target)) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _no_room(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in NO_ROOM:
        return True
    text = str(err).lower()  # safetensors' and HDF5's errors name the OS error in their text
    return any(words in text for words in ("no space left", "os error 28", "errno = 28", "file too large"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_checkpoint(path: PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def read_config(path: PathLike) -> Dict[str, Any]:
    """A checkpoint directory's ``config.json``, checked."""
    file = Path(path) / CONFIG_NAME
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{file}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                              "a checkpoint config is JSON written by save_pretrained") from None
    except RecursionError:
        raise CheckpointError(f"{file}: JSON nested too deeply to be a checkpoint config") from None
    if isinstance(config, dict) and "transformers_version" in config:
        raise CheckpointError(f"{file} is a transformers model (model_type {config.get('model_type')!r}), not this "
                              "package's checkpoint: load it with transformers.AutoModel.from_pretrained (after "
                              "`import e2_transformers` for an E2)")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an E2 checkpoint config (expected \"format\": \"{FORMAT}\")")
    check_config(file, config)
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{file} has format_version {config['format_version']}, newer than this "
                              f"e2-plugins reads ({FORMAT_VERSION}); upgrade e2-plugins")
    for key in ("clip_config",) + (("e2_config",) if model_type(config) == "e2" else ()):
        if key not in config:
            raise CheckpointError(f"{file} lacks the field {key!r}; the checkpoint is incomplete")
    return config


def model_type(saved: Mapping[str, Any]) -> str:
    return saved.get("model_type", "e2")


def load_checkpoint(path: PathLike, config: Optional[E2Config] = None) -> Union[E2Model, CLIP]:
    """Build the architecture a checkpoint directory describes and load its weights exactly: an
    ``E2Model`` (``config`` overrides the saved ``E2Config``) or an open_clip ``CLIP``."""
    saved = read_config(path)
    try:
        model = build_model(saved, config)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:  # a value this version cannot build, e.g. an edited field
        raise CheckpointError(f"{Path(path) / CONFIG_NAME} describes a model this version cannot build: {err}. "
                              "Restore the file from the run that saved it, or use another checkpoint") from None
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing: the checkpoint directory {path} has a config but no weights")
    try:
        state_dict = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({err}); "
                              "was the save interrupted? Use an earlier checkpoint") from err
    _expand_kept_rows(state_dict, model.state_dict(), str(weights))
    load_state_dict_checked(model, state_dict, source=str(weights))
    return model


def build_model(saved: Mapping[str, Any], config: Optional[E2Config] = None) -> Union[E2Model, CLIP]:
    """The architecture a checkpoint config describes (:func:`checkpoint_config`), with fresh weights."""
    clip = build_clip(saved["clip_config"], saved.get("preprocess_cfg"))
    if model_type(saved) != "e2":
        return clip
    return E2Model(clip, config or E2Config.from_dict(saved["e2_config"]), saved.get("clip_model"), saved["clip_config"])


def load_state_dict_checked(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that says which tensors differ and how."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        model_desc = f"{type(model).__name__}({getattr(model, 'clip_model', None) or '?'}, " \
                     f"{len(getattr(getattr(model, 'config', None), 'entities', ()))} entities)"
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]})" if mismatched else ""]
        raise CheckpointError(f"{source} does not fit {model_desc}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state_dict, strict=True)
