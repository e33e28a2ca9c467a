"""Everything about the authors' reference implementation, in one place: the quirks that
``E2Config(compat="reference")`` reproduces, and the importer of its checkpoints.

Quirks of its forward pass (kept out of the native model):
  * the last selection token is dropped before pooling, so the last entity pools one token fewer;
  * the last entity reuses the previous entity's LayerNorm;
  * selection logits are scaled by ``768 ** -0.5`` whatever the width;
  * its image tower uses QuickGELU (OpenAI's CLIP).

Its checkpoints (``torch.save({'state_dict': ...}, 'best.pth')``; also accepted: a bare state dict,
``{'model': ...}``, ``module.`` prefixes, the legacy non-zip format) are read with
``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and containers.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from .config import E2Config
from .errors import CheckpointError

PathLike = Union[str, os.PathLike]

#: The reference divides selection logits by sqrt(768) whatever the width.
SELECTION_LOGIT_SCALE = 768 ** -0.5
#: A key only the reference's checkpoints have (its first selection token).
MARKER = "visual.token_1_embedding"


def selection_logit_scale(config: E2Config) -> Optional[float]:
    """The fusion blocks' logit scale: the reference's constant, or ``None`` for ``width ** -0.5``."""
    return SELECTION_LOGIT_SCALE if config.compat == "reference" else None


def head_layout(config: E2Config) -> Tuple[List[range], List[int]]:
    """Token positions pooled by each entity's head, and which LayerNorm each entity uses."""
    n, k = len(config.entities), config.tokens_per_entity
    available = n * k - (1 if config.compat == "reference" else 0)
    groups = [range(e * k, min((e + 1) * k, available)) for e in range(n)]
    norms = list(range(n))
    if config.compat == "reference" and n > 1:
        norms[-1] = n - 2
    return groups, norms


# --- checkpoints -----------------------------------------------------------------------------------

def is_reference_checkpoint(path: PathLike) -> bool:
    """A ``torch.save`` file whose pickled keys name the reference's selection tokens (read, not unpickled)."""
    path = Path(path)
    if not path.is_file():
        return False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(MARKER.encode() in archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    with open(path, "rb") as f:  # legacy format: the pickled keys come before the tensor data
        return MARKER.encode() in f.read(1 << 20)


def load_state_dict(path: PathLike, num_tokens: int) -> Dict[str, torch.Tensor]:
    """Read a reference checkpoint as tensors only and rename them to this package's layout."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler raises several types for foreign objects
        raise CheckpointError(
            f"{path} holds more than tensors ({unpickling_reason(err)}), so it is not read. Training-state files "
            "such as ckpt.pth.tar also pickle their arguments; use the best.pth the reference code writes") from None
    state = raw
    if isinstance(raw, dict):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), dict):
                state = raw[key]
                break
    keys = {k.removeprefix("module.") for k in state} if isinstance(state, dict) else set()
    if MARKER not in keys:
        found = sorted(raw)[:5] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path} is not a reference E2 checkpoint: no {MARKER} (it holds {found})")
    return convert_state_dict({k.removeprefix("module."): v for k, v in state.items()}, num_tokens)


def unpickling_reason(err: Exception) -> str:
    """The line of torch's message that names what was refused, without its advice to unpickle anyway."""
    for line in str(err).splitlines():
        line = line.strip()
        if line.startswith(("WeightsUnpickler error:", "Unsupported global", "Unsupported operand")):
            return line.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


_UNUSED_KEYS = re.compile(r"visual\.(proj|proj_cls_mid|ln_selection\.\w+)$|^(input_resolution|context_length|vocab_size)$")


def convert_state_dict(state: Mapping[str, torch.Tensor], num_tokens: int) -> Dict[str, torch.Tensor]:
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
        if key in out or _UNUSED_KEYS.search(key) or re.fullmatch(
                r"visual\.(token_\d+_embedding|proj_[qkv]2?|proj_s\d+)", key):
            continue
        if m := re.fullmatch(r"visual\.ln_s(\d+)\.(weight|bias)", key):
            out[f"visual.regional_heads.norms.{int(m.group(1)) - 1}.{m.group(2)}"] = value
        elif key.startswith("visual.") and key != "visual.proj_cls":
            out["visual.trunk." + key.removeprefix("visual.")] = value
        else:
            out[key] = value
    return out
