"""Figures of the retrieval task, drawn with PIL: top-5 results per query, and the patches E2's
selection tokens picked."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from PIL import Image, ImageDraw

THUMB = 96
ENTITY_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def save_top5_figure(embeddings: Dict, path: Path, queries: int = 4) -> Path:
    """For the first few text queries: each model's top-5 images, the true product framed in green."""
    names = list(embeddings)
    rows = [(name, q) for q in range(queries) for name in names]
    canvas = Image.new("RGB", (90 + 5 * (THUMB + 4), len(rows) * (THUMB + 18) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, q) in enumerate(rows):
        images, texts, indices, dataset = embeddings[name]
        top = (texts[q:q + 1] @ images.t()).topk(min(5, len(indices))).indices[0].tolist()
        y = 4 + r * (THUMB + 18)
        draw.text((4, y + 2), f"{name}\nquery {q}", fill="black")
        if r % len(names) == 0:
            text = dataset.product(indices[q]).tags.get("description", "")[:110]
            draw.text((90, y), text, fill=(40, 40, 40))
        for k, hit in enumerate(top):
            thumb = dataset.load_image(indices[hit], 0).convert("RGB").resize((THUMB, THUMB))
            x = 90 + k * (THUMB + 4)
            canvas.paste(thumb, (x, y + 14))
            if hit == q:
                draw.rectangle([x, y + 14, x + THUMB - 1, y + 13 + THUMB], outline=(0, 170, 0), width=4)
    canvas.save(path)
    return path


@torch.no_grad()
def save_selection_figure(encoder, dataset, path: Path, device, images: int = 6, size: int = 224) -> Path:
    """The patches each entity's selection tokens picked (fusion block 2) by an E2 encoder, one colour per entity."""
    encoder.eval()
    model = encoder.model
    entities = list(model.entities)
    count = min(images, len(dataset))
    samples = [dataset[i] for i in range(count) if dataset[i].error is None]
    batch = torch.stack([s.image for s in samples]).to(device)
    picked = model.encode_image_regions(batch).selected_patches[:, 1].cpu()  # (B, T) of the last fusion
    boxes = model.visual.patch_boxes(picked).float()
    scale = size / model.visual.image_size[0]
    per_entity = model.config.tokens_per_entity
    canvas = Image.new("RGB", (len(samples) * (size + 6) + 6, size + 30 + 14 * len(entities)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, sample in enumerate(samples):
        x0 = 6 + i * (size + 6)
        canvas.paste(dataset.load_image(sample.index, 0).convert("RGB").resize((size, size)), (x0, 6))
        for t, box in enumerate(boxes[i].tolist()):
            colour = ENTITY_COLOURS[(t // per_entity) % len(ENTITY_COLOURS)]
            draw.rectangle([x0 + box[0] * scale, 6 + box[1] * scale, x0 + box[2] * scale - 1,
                            6 + box[3] * scale - 1], outline=colour, width=2)
    for k, entity in enumerate(entities):
        colour, y = ENTITY_COLOURS[k % len(ENTITY_COLOURS)], size + 12 + 14 * k
        draw.rectangle([6, y + 2, 14, y + 10], fill=colour)
        draw.text((20, y), entity, fill=colour)
    canvas.save(path)
    return path
