"""Device selection, mixed precision and compiled inference: the one place each is decided, for tasks
and training."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("amp", "amp_bf16", "amp_fp16", "fp32")


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; anything else is checked and passed to ``torch.device``."""
    if device != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device=cpu or device=auto")
        if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        mps = getattr(torch.backends, "mps", None)
        if chosen.type == "mps" and (mps is None or not mps.is_available()):
            raise ValueError(f"device {device!r} requested but Apple MPS is not available; use device=cpu or device=auto")
        return chosen
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


def compiles(device: torch.device, enabled: Optional[bool] = None) -> bool:
    """Whether :func:`compiled` compiles: ``enabled``, or when unset, on CUDA only."""
    return torch.device(device).type == "cuda" if enabled is None else bool(enabled)


def compiled(fn: Callable, device: torch.device, enabled: Optional[bool] = None) -> Callable:
    """``fn`` (an encoder's ``encode_image``, ...) under ``torch.compile`` for inference, or ``fn`` itself.

    ``enabled=None`` compiles on CUDA, where it removes the launch overhead of E2's small kernels (image
    encoding at batch 32 under bf16 AMP went from 0.77 to 0.91 of CLIP's speed on an H200), and not on
    a CPU, where compiling takes longer than most runs gain. In eval mode the compiled encoder selects
    the same patches as the eager one. Where compiling fails (no compiler or Triton on the machine),
    a line says so and ``fn`` runs as it is; an error of ``fn``'s own is raised by the eager run.
    """
    if not compiles(device, enabled):
        return fn
    state = {"fn": torch.compile(fn)}

    def call(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back; eager raises its own
            if state["fn"] is fn:
                raise
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            log.warning("torch.compile failed (%s: %s); running without it", type(err).__name__, reason)
            state["fn"] = fn
            return fn(*args, **kwargs)
    return call
