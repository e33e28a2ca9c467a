"""Figures of the retrieval task, drawn with PIL: top-5 results per query, and the patches E2's
selection tokens picked."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Subset

from e2_core.embedding import embed_images

THUMB = 96
PANEL = 128
GREEN = (0, 170, 0)
ENTITY_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def save_top5_figure(embeddings: Dict, path: Path, queries: int = 4) -> Path:
    """For the first few text queries: each model's top-5 images, the true product framed in green."""
    names = list(embeddings)
    rows = [(name, q) for q in range(queries) for name in names]
    top_margin = 44
    canvas = Image.new("RGB", (90 + 5 * (THUMB + 4), top_margin + len(rows) * (THUMB + 18) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "Text -> image retrieval: each model's 5 most similar images for a product's text, "
                      "most similar first (left to right)", fill="black")
    draw.rectangle([4, 22, 16, 34], outline=GREEN, width=3)
    draw.text((22, 22), "green frame: the product the text describes (a hit); no frame in a row: not in the top 5",
              fill="black")
    for r, (name, q) in enumerate(rows):
        images, texts, indices, dataset = embeddings[name]
        top = (texts[q:q + 1] @ images.t()).topk(min(5, len(indices))).indices[0].tolist()
        y = top_margin + r * (THUMB + 18)
        draw.text((4, y + 16), f"{name}\nquery {q}", fill="black")
        if r % len(names) == 0:
            text = dataset.product(indices[q]).tags.get("description", "")[:110]
            draw.text((90, y), text, fill=(40, 40, 40))
        for k, hit in enumerate(top):
            thumb = dataset.load_image(indices[hit], 0).convert("RGB").resize((THUMB, THUMB))
            x = 90 + k * (THUMB + 4)
            canvas.paste(thumb, (x, y + 14))
            if hit == q:
                draw.rectangle([x, y + 14, x + THUMB - 1, y + 13 + THUMB], outline=GREEN, width=4)
    canvas.save(path)
    return path


def selection_counts(picked: torch.Tensor, entities: Sequence[str], tokens_per_entity: int) -> List[Dict[str, Counter]]:
    """Per image, per entity: how many of its selection tokens picked each patch.

    ``picked`` is ``(B, T)`` patch indices, the tokens of entity ``e`` at ``e * tokens_per_entity ...``.
    """
    return [{entity: Counter(row[e * tokens_per_entity:(e + 1) * tokens_per_entity])
             for e, entity in enumerate(entities)} for row in picked.tolist()]


def save_selection_figure(encoder, dataset, path: Path, device, images: int = 6) -> Path:
    """The patches each entity's selection tokens picked (fusion block 2) by an E2 encoder: one panel per
    image and entity, each picked patch framed, with the number of tokens on it where several share it."""
    model = encoder.model
    entities, per_entity = list(model.entities), model.config.tokens_per_entity
    shown = embed_images(encoder, Subset(dataset, range(min(images, len(dataset)))), batch_size=images,
                         device=device, regions=True)
    picked = shown.regions["selected_patches"][:, 1]  # (B, T) of the last fusion
    counts = selection_counts(picked, entities, per_entity)
    height, width = model.visual.image_size
    scale = torch.tensor([PANEL / width, PANEL / height] * 2)
    top, step = 60, PANEL + 6
    canvas = Image.new("RGB", (6 + len(entities) * step, top + len(shown.indices) * step), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), f"Patches picked by each entity's {per_entity} selection tokens (fusion block 2), "
                      "one column per entity, one row per image", fill="black")
    draw.text((6, 18), "a number in a frame: that many tokens picked the same patch", fill="black")
    for e, entity in enumerate(entities):
        draw.text((6 + e * step, top - 16), entity[:20], fill=ENTITY_COLOURS[e % len(ENTITY_COLOURS)])
    for i, index in enumerate(shown.indices):
        # the crop the image tower saw, where the patch boxes lie (a non-square photo is cropped)
        image = encoder.input_view(dataset.load_image(index, 0).convert("RGB")).resize((PANEL, PANEL))
        y0 = top + i * step
        for e, entity in enumerate(entities):
            x0, colour = 6 + e * step, ENTITY_COLOURS[e % len(ENTITY_COLOURS)]
            canvas.paste(image, (x0, y0))
            for patch, n in counts[i][entity].items():
                x1, y1, x2, y2 = (model.visual.patch_boxes(torch.tensor(patch)) * scale).tolist()
                draw.rectangle([x0 + x1, y0 + y1, x0 + x2 - 1, y0 + y2 - 1], outline=colour, width=2)
                if n > 1:
                    draw.rectangle([x0 + x1 + 2, y0 + y1 + 2, x0 + x1 + 8 + 6 * len(str(n)), y0 + y1 + 14],
                                   fill=colour)
                    draw.text((x0 + x1 + 4, y0 + y1 + 3), str(n), fill="white")
    canvas.save(path)
    return path
