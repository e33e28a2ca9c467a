"""Parameter counts per component of an E2 model, and its overhead over the CLIP it extends."""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from .model import E2Model


def _count(module_or_params) -> int:
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    return sum(p.numel() for p in params)


def parameter_summary(model: E2Model) -> Tuple[List[Tuple[str, int]], dict]:
    """Rows ``(component, parameters)`` and totals.

    E2's global head ``proj_cls`` replaces CLIP's image projection (same shape), so CLIP's own
    size is counted with it; the overhead is every other tensor E2 adds: selection tokens,
    the two fusion blocks (Wq, Wk, Wv each) and the regional heads (a LayerNorm and a
    projection per entity).
    """
    visual = model.visual
    text = _count(p for name, p in model.named_parameters() if not name.startswith("visual."))
    rows = [
        ("CLIP image tower (without projection)", _count(visual.trunk)),
        ("CLIP text tower + logit scale", text),
        ("global head proj_cls (replaces CLIP's image projection)", visual.proj_cls.numel()),
        (f"selection tokens ({visual.config.num_tokens} x width)", _count(visual.selection_tokens)),
    ]
    rows += [(f"fusion block {i + 1} (Wq, Wk, Wv; after layer {n})", _count(block))
             for i, (block, n) in enumerate(zip(visual.fusion, visual.fusion_layers))]
    rows.append((f"regional heads ({len(visual.config.entities)} x (LayerNorm + projection))",
                 _count(visual.regional_heads)))
    clip_total = rows[0][1] + rows[1][1] + rows[2][1]
    added = sum(n for _, n in rows[3:])
    totals = {"clip": clip_total, "e2": clip_total + added, "added": added,
              "added_fusion_only": sum(_count(b) for b in visual.fusion),
              "overhead_percent": 100.0 * added / clip_total}
    return rows, totals
