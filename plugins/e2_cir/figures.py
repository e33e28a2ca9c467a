"""The composed-retrieval figure: for a few queries, the reference image, the relative captions and
each encoder's top-5 gallery images, the target framed in green."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, Tuple

from PIL import Image, ImageDraw

THUMB = 88
TEXT_WIDTH = 200


def save_query_grid(by_encoder: Dict[str, Tuple], path: Path, queries: int = 4) -> Path:
    """``by_encoder``: ``{label: (FashionIQ data, query embeddings, gallery embeddings)}``."""
    labels = list(by_encoder)
    data = by_encoder[labels[0]][0]
    count = min(queries, len(data.triplets))
    row_h, left = THUMB + 8, THUMB + TEXT_WIDTH + 16
    height = 40 + count * (len(labels) * row_h + 10)
    canvas = Image.new("RGB", (left + 90 + 5 * (THUMB + 4), height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), f"FashionIQ {data.category}: reference + modification -> each encoder's top 5 "
                      "(left to right, most similar first); the target is framed in green", fill="black")
    y = 24
    thumbs: Dict[str, Image.Image] = {}

    def thumb(name: str) -> Image.Image:
        if name not in thumbs:
            thumbs[name] = data.load_image(name).resize((THUMB, THUMB))
        return thumbs[name]

    for q in range(count):
        triplet = data.triplets[q]
        canvas.paste(thumb(triplet.reference), (6, y))
        caption = " / ".join(triplet.captions)
        draw.text((THUMB + 12, y), "\n".join(textwrap.wrap(caption, 32)[:6]), fill=(40, 40, 40))
        for r, label in enumerate(labels):
            _, query, gallery = by_encoder[label]
            top = (query[q:q + 1] @ gallery.t()).topk(min(5, gallery.shape[0])).indices[0].tolist()
            ry = y + r * row_h
            draw.text((left, ry + THUMB // 2 - 6), label[:14], fill="black")
            for k, index in enumerate(top):
                x = left + 90 + k * (THUMB + 4)
                name = data.gallery[index]
                canvas.paste(thumb(name), (x, ry))
                if name == triplet.target:
                    draw.rectangle([x, ry, x + THUMB - 1, ry + THUMB - 1], outline=(0, 170, 0), width=4)
        y += len(labels) * row_h + 10
        draw.line([6, y - 5, canvas.width - 6, y - 5], fill=(200, 200, 200))
    canvas.save(path)
    return path


__all__ = ["save_query_grid"]
