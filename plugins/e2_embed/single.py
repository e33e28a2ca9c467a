"""The single-file embed output: one safetensors file, the image paths and texts in its metadata."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List

import torch

from e2_core.checkpoint import save_tensors

#: the embedding streams' tensor names (``e2_core.embedding``) -> the file's tensor names
FILE_NAMES = {"image_features": "image_features", "regional_features": "image_regional_features",
              "selected_patches": "selected_patches", "text_features": "text_features"}


class SingleFile:
    """Collects an embed run's images and texts (:meth:`write` per kind), saved by :meth:`finish`."""

    def __init__(self, out: Path, net, batch_size: int):
        self.out, self.net, self.batch_size = out, net, batch_size
        self.tensors: Dict[str, torch.Tensor] = {}
        self.metadata: Dict[str, str] = {}

    def write(self, kind: str, labels: List[str], source, encode: Callable) -> dict:
        """Embeds every item: ``encode(batches)`` is a stream of ``e2_core.embedding``. Returns the report."""
        size = self.batch_size
        batches = [list(range(i, min(i + size, len(labels)))) for i in range(0, len(labels), size)]
        parts: Dict[str, List[torch.Tensor]] = {}
        kept, failed = [], []
        for items, tensors, unreadable in encode(batches):
            kept += items
            failed += [reason for _, reason in unreadable]
            for name, tensor in tensors.items():
                parts.setdefault(FILE_NAMES[name], []).append(tensor)
        self.tensors.update({name: torch.cat(p) for name, p in parts.items()})
        self.metadata["images" if kind == "img" else "texts"] = json.dumps([str(labels[i]) for i in kept])
        if kind == "img":
            return {"images": len(kept), "unreadable_images": failed}
        return {"texts": len(kept)}

    def finish(self) -> None:
        save_tensors(self.tensors, self.out, metadata={**self.metadata, "encoder": self.net.name,
                                                        "entities": json.dumps(list(self.net.entities))})
