"""Device selection and mixed precision: the one place both are decided, for tasks and training."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

PRECISIONS = ("amp", "amp_bf16", "amp_fp16", "fp32")


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; anything else is passed to ``torch.device``."""
    if device != "auto":
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device, precision: str = "amp") -> Optional[torch.dtype]:
    """The autocast dtype: ``amp`` is bf16 on GPUs that support it, else fp16; ``None`` (fp32) on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or torch.device(device).type != "cuda":
        return None
    if precision == "amp_bf16" or (precision == "amp" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, precision: str = "amp"):
    """The autocast context of :func:`amp_dtype` (a no-op in fp32)."""
    dtype = amp_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, precision: str = "amp") -> torch.amp.GradScaler:
    """Loss scaling, enabled exactly when training in fp16."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp_dtype(device, precision) == torch.float16)
