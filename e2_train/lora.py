"""Optional LoRA fine-tuning (stage 2 of E2, or the CLIP-FT baseline) with ``peft``.

The adapters are injected in place (``peft.inject_adapter_in_model``): the model keeps its class
(``E2Model`` or open_clip ``CLIP``) and its forward signature. Checkpoints stay plain:
:func:`merged_state_dict` folds ``W + scale * B @ A`` into the base weights under the base
architecture's key names, so a saved LoRA model loads with no ``peft`` at all.

``peft`` is imported only when LoRA is used (it takes seconds to import); this module is cheap
to import.
"""
from __future__ import annotations

import re
import sys
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from e2_core.model import is_e2_parameter

#: the nn.Linear layers of open_clip's transformer blocks (both towers) that take an adapter
TARGET_PATTERN = r"(?:.*\.)?transformer\.resblocks\.\d+\.(?:attn\.out_proj|mlp\.c_fc|mlp\.c_proj)"
ADAPTER = "default"
_LORA_PARAMETER = re.compile(r"\.lora_[AB]\.")


def add_lora(model: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and set what trains; returns ``model``.

    Adapted: ``attn.out_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` of every transformer block of the
    image and text towers. ``nn.MultiheadAttention`` keeps its query/key/value projection in one
    fused ``in_proj_weight``, a plain ``nn.Parameter`` rather than an ``nn.Linear``, so peft's
    LoRA cannot be put on it: q/k/v stay frozen. (peft's whole-``MultiheadAttention`` LoRA is
    not used: it merges and unmerges the weights around every forward call, which changes the
    frozen weights by rounding.) ``nn.MultiheadAttention`` also never calls ``out_proj``'s
    ``forward``; it reads ``out_proj.weight`` — so the adapter of ``out_proj`` is made to
    expose ``W + scale * B @ A`` (differentiable) as its ``weight``; ``dropout`` is therefore
    not applied to that adapter's input.

    Trainable afterwards: the LoRA A/B matrices, E2's own new parts (selection tokens, fusion
    blocks, regional heads, ``visual.proj_cls``: :func:`e2_core.model.is_e2_parameter`), which
    get no adapters and are fully trained, and ``logit_scale``; everything else is frozen.
    ``alpha`` defaults to ``rank`` (scale 1). B starts at zero, so the function of the model
    is unchanged right after the call. Works for ``E2Model`` and for open_clip's ``CLIP``.

    Example:
        >>> add_lora(model, rank=8)                 # doctest: +SKIP
        >>> save_pretrained(model, "runs/lora")      # merged: a plain checkpoint  # doctest: +SKIP
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError as err:
        raise ImportError("--lora-rank needs peft: pip install 'e2-plugins[lora]'") from err

    targets = [name for name, module in model.named_modules()
               if re.fullmatch(TARGET_PATTERN, name) and isinstance(module, nn.Linear)
               and not is_e2_parameter(f"{name}.weight")]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no open_clip transformer blocks to put LoRA adapters in")
    fused_out_proj = {name for name in targets if isinstance(model.get_submodule(name.rsplit(".", 1)[0]),
                                                              nn.MultiheadAttention)}
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout, bias="none",
                        target_modules="|".join(re.escape(name) for name in targets))  # full match of exact names
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    out_proj_class = _multihead_out_proj_class()
    for name, layer in _lora_layers(model):
        if type(layer) is not LoraLinear:
            raise TypeError(f"{name}: expected peft's lora.Linear, got {type(layer).__name__}")
        if name in fused_out_proj:
            layer.__class__ = out_proj_class
    for name, param in model.named_parameters():
        param.requires_grad_(bool(_LORA_PARAMETER.search(name)) or is_e2_parameter(name) or name == "logit_scale")
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft LoRA layers (never imports peft: without it, none can exist)."""
    return next(_lora_layers(model), None) is not None


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` of the base architecture, with every LoRA delta merged into its weight.

    The model itself is not changed. Without LoRA layers this is ``model.state_dict()``.
    """
    state = model.state_dict()
    layers = dict(_lora_layers(model))
    if not layers:
        return state
    merged: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = _owner(key, layers)
        if owner is None:
            merged[key] = value
            continue
        rest = key[len(owner) + 1:]
        if rest.startswith("base_layer."):  # lora_A/lora_B and the like are dropped
            merged[f"{owner}.{rest[len('base_layer.'):]}"] = value
    with torch.no_grad():
        for name, layer in layers.items():
            merged[f"{name}.weight"] = _merged_weight(layer).detach()
    return merged


def _lora_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    if "peft" not in sys.modules:
        return iter(())
    from peft.tuners.tuners_utils import BaseTunerLayer
    return ((name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer))


def _owner(key: str, layers: Dict[str, nn.Module]) -> Optional[str]:
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in layers:
            return prefix
    return None


def _merged_weight(layer) -> torch.Tensor:
    """``W + scale * B @ A`` over the active adapters (differentiable in A and B)."""
    weight = layer.get_base_layer().weight
    if layer.merged:
        raise ValueError("a LoRA layer was merged in place by peft; unmerge it first")
    if layer.disable_adapters:
        return weight
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter) or layer.lora_B[adapter].bias is not None:
            raise ValueError("only plain LoRA adapters (no DoRA, no LoRA bias) can be merged here")
        delta = (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight) * layer.scaling[adapter]
        weight = weight + (delta.T if layer.fan_in_fan_out else delta).to(weight.dtype)
    return weight


_OUT_PROJ_CLASS = None


def _multihead_out_proj_class():
    """peft's lora.Linear whose ``weight`` is the merged weight, for ``nn.MultiheadAttention.out_proj``."""
    global _OUT_PROJ_CLASS
    if _OUT_PROJ_CLASS is None:
        from peft.tuners.lora import Linear as LoraLinear

        class MultiheadOutProjLoRA(LoraLinear):
            """LoRA on ``nn.MultiheadAttention.out_proj``: the attention reads ``out_proj.weight``
            (and ``.bias``) instead of calling ``out_proj``, so ``weight`` is ``W + scale * B @ A``."""

            @property
            def weight(self) -> torch.Tensor:
                return _merged_weight(self)

        MultiheadOutProjLoRA.__module__, MultiheadOutProjLoRA.__qualname__ = __name__, "MultiheadOutProjLoRA"
        globals()["MultiheadOutProjLoRA"] = _OUT_PROJ_CLASS = MultiheadOutProjLoRA
    return _OUT_PROJ_CLASS
