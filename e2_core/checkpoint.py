"""E2 checkpoints (a directory: ``config.json`` + ``model.safetensors``) and the importer for the
authors' reference checkpoints. Nothing here unpickles arbitrary objects."""
from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from open_clip.model import CLIP, set_model_preprocess_cfg
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import E2Config
from .model import E2Model

FORMAT = "e2-plugins/encoder"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file that is not the checkpoint it was expected to be."""


def save_pretrained(model: Union[E2Model, CLIP], path: PathLike) -> Path:
    """Write an E2 model, or a CLIP from :func:`create_clip` (the CLIP-FT baseline), to directory
    ``path`` (created if needed); files are replaced atomically.

    Example:
        >>> save_pretrained(model, "runs/e2-demo")            # doctest: +SKIP
        >>> model = create_e2(None, pretrained="runs/e2-demo")  # doctest: +SKIP
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    is_e2 = isinstance(model, E2Model)
    if not is_e2 and not hasattr(model, "clip_config"):
        raise TypeError("save_pretrained takes an E2Model or a CLIP made by e2_core.create_clip")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": "e2" if is_e2 else "clip",
        "clip_model": model.clip_model,
        "clip_config": model.clip_config,
        "preprocess_cfg": dict(getattr(model.visual, "preprocess_cfg", {})),
    }
    if is_e2:
        config["e2_config"] = model.config.to_dict()
    from .training.lora import merged_state_dict  # LoRA deltas merged: a plain checkpoint of the base model
    tensors = {name: t.detach().cpu().contiguous() for name, t in merged_state_dict(model).items()}
    _atomic_write(path / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": FORMAT}))
    _atomic_write(path / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2)))
    return path


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_e2_checkpoint(path: PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def read_checkpoint_config(path: PathLike) -> Dict[str, Any]:
    file = Path(path) / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an E2 checkpoint config (expected \"format\": \"{FORMAT}\")")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{file} has format_version {config['format_version']}, newer than this "
                              f"e2-plugins reads ({FORMAT_VERSION}); upgrade e2-plugins")
    for key in ("clip_model", "clip_config") + (("e2_config",) if config.get("model_type", "e2") == "e2" else ()):
        if key not in config:
            raise CheckpointError(f"{file} lacks the field {key!r}; the checkpoint is incomplete")
    return config


def load_checkpoint(path: PathLike, config: Optional[E2Config] = None) -> Union[E2Model, CLIP]:
    """Build the architecture a checkpoint directory describes and load its weights exactly.

    An E2 checkpoint gives an ``E2Model`` (with ``config`` overriding the saved one when given);
    a CLIP checkpoint gives the open_clip ``CLIP``.
    """
    saved = read_checkpoint_config(path)
    clip = CLIP(**saved["clip_config"], output_dict=True)
    if saved.get("preprocess_cfg"):  # JSON turned its tuples (mean, std, size) into lists
        set_model_preprocess_cfg(clip, {k: tuple(v) if isinstance(v, list) else v
                                        for k, v in saved["preprocess_cfg"].items()})
    clip.clip_model, clip.clip_config = saved["clip_model"], dict(saved["clip_config"])
    if checkpoint_type(saved) == "e2":
        model = E2Model(clip, config or E2Config.from_dict(saved["e2_config"]), saved["clip_model"],
                        saved["clip_config"])
    else:
        model = clip
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing: the checkpoint directory {path} has a config but no weights")
    try:
        state_dict = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({err}); "
                              "was the save interrupted? Use an earlier checkpoint") from err
    load_state_dict_checked(model, state_dict, source=str(weights))
    return model


def checkpoint_type(saved: Mapping[str, Any]) -> str:
    return saved.get("model_type", "e2")


def load_state_dict_checked(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that says which tensors differ and how."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        model_desc = f"{type(model).__name__}({getattr(model, 'clip_model', '?')}, " \
                     f"{len(getattr(getattr(model, 'config', None), 'entities', ()))} entities)"
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]})" if mismatched else ""]
        raise CheckpointError(f"{source} does not fit {model_desc}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state_dict, strict=True)


# --- the authors' reference implementation -------------------------------------------------------

_REFERENCE_MARKER = "visual.token_1_embedding"


def is_reference_checkpoint(path: PathLike) -> bool:
    """A ``torch.save`` archive whose keys name the reference's selection tokens (read without unpickling)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        return any(_REFERENCE_MARKER.encode() in archive.read(n) for n in pickles)


def load_reference_state_dict(path: PathLike, model: E2Model) -> Dict[str, torch.Tensor]:
    """Read a reference checkpoint (``weights_only``) and rename its tensors to this package's layout."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises several types for foreign objects
        raise CheckpointError(f"{path} could not be read as tensors only ({type(err).__name__}: {err}). "
                              "Training-state files such as ckpt.pth.tar hold pickled arguments; "
                              "use the best.pth the reference code writes") from err
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or _REFERENCE_MARKER not in {k.removeprefix("module.") for k in state}:
        raise CheckpointError(f"{path} is not a reference E2 checkpoint (no {_REFERENCE_MARKER})")
    return convert_reference_state_dict({k.removeprefix("module."): v for k, v in state.items()},
                                        len(model.config.entities) * model.config.tokens_per_entity)


_UNUSED_REFERENCE_KEYS = re.compile(r"visual\.(proj|proj_cls_mid|ln_selection\.\w+)$|^(input_resolution|context_length|vocab_size)$")


def convert_reference_state_dict(state: Mapping[str, torch.Tensor], num_tokens: int) -> Dict[str, torch.Tensor]:
    """Map the reference layout onto ``E2Model``'s.

    The reference prepends ``token_1`` first and ``token_N`` last, so its sequence starts with
    ``token_N``; our ``selection_tokens.tokens[j]`` is its ``token_{N-j}``. Its fusion matrices
    multiply from the right (``x @ P``), ours are ``nn.Linear`` weights (``P.T``). Modules the
    reference defines but never uses in its forward pass are dropped.
    """
    found = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"visual\.token_(\d+)_embedding", k)))
    if found != list(range(1, num_tokens + 1)):
        raise CheckpointError(f"reference checkpoint has selection tokens {found}, expected 1..{num_tokens} "
                              "(the 5-entity reference model)")
    out: Dict[str, torch.Tensor] = {}
    out["visual.selection_tokens.tokens"] = torch.stack(
        [state[f"visual.token_{num_tokens - j}_embedding"] for j in range(num_tokens)])
    heads = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"visual\.proj_s(\d+)", k)))
    out["visual.regional_heads.proj"] = torch.stack([state[f"visual.proj_s{k}"] for k in heads])
    for block, suffix in ((0, ""), (1, "2")):
        for name in "qkv":
            out[f"visual.fusion.{block}.{name}.weight"] = state[f"visual.proj_{name}{suffix}"].t().contiguous()
    for key, value in state.items():
        if key in out or _UNUSED_REFERENCE_KEYS.search(key) or re.fullmatch(
                r"visual\.(token_\d+_embedding|proj_[qkv]2?|proj_s\d+)", key):
            continue
        if m := re.fullmatch(r"visual\.ln_s(\d+)\.(weight|bias)", key):
            out[f"visual.regional_heads.norms.{int(m.group(1)) - 1}.{m.group(2)}"] = value
        elif key.startswith("visual.") and key != "visual.proj_cls":
            out["visual.trunk." + key.removeprefix("visual.")] = value
        else:
            out[key] = value
    return out
