"""Device selection and mixed precision, shared by every task."""
from __future__ import annotations

import contextlib

import torch


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


def autocast(device: torch.device, precision: str = "amp"):
    """bf16 autocast on GPUs that support it (fp16 otherwise) when ``precision="amp"``; fp32 on CPU."""
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    if precision not in ("amp", "amp_bf16", "amp_fp16"):
        raise ValueError(f"precision must be 'amp', 'amp_bf16', 'amp_fp16' or 'fp32', got {precision!r}")
    bf16 = precision == "amp_bf16" or (precision == "amp" and torch.cuda.is_bf16_supported())
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)
