"""The ``caption`` task: zero-shot image captioning with DeCap and CapDec (decoders trained on text
only), a baseline encoder and E2 side by side, scored with the COCO caption metrics.

From Python, a trained captioner is ``captioner(images) -> captions`` (:func:`load_captioner`)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from e2_core import load_encoder
from e2_core.data import E2Collate, open_dataset
from e2_core.errors import check_at_least
from e2_core.registry import Task
from e2_core.runtime import resolve_device
from e2_eval.captions import caption_metrics, write_coco_results

from .capdec import CapDec, ClipCap
from .captioner import Captioner, CaptionerMismatch
from .decap import DeCap

#: every captioner, by the name ``--method`` takes
METHODS = {m.name: m for m in (DeCap, CapDec, ClipCap)}


def caption(dataset: str = "synthetic", data_root: Optional[str] = None, method: Optional[List[str]] = None,
            encoder: str = "demo:e2", baseline: str = "demo:clip-ft", beams: int = 1, epochs: int = 3,
            decoders: Optional[Path] = None, max_images: int = 500, out: Path = Path("runs/caption"),
            batch_size: int = 64, device: str = "auto", page_images: int = 12, progress: bool = True,
            encoding: str = "utf-8") -> Dict:
    """Zero-shot image captioning (BLEU-1..4, METEOR, ROUGE-L, CIDEr), a baseline and E2 side by side.

    Args:
        dataset: an installed dataset reader: synthetic, fashiongen, amazon-fashion, catalog, ...
        data_root: the dataset's folder or file
        method: captioners: decap, capdec (default: both), clipcap (trained on image-caption pairs)
        encoder: the encoder under test: a checkpoint directory, MODEL:TAG, MODEL:FILE, a reference best.pth, or demo:e2 / demo:clip-ft
        baseline: the encoder it is compared with, in the same forms
        beams: beam width of decoding (1: greedy)
        epochs: training epochs of a decoder (when none is saved for the encoder)
        decoders: folder of trained decoders, one per method and encoder, reused when present (default: OUT/decoders)
        max_images: validation images captioned and scored (0: all)
        out: folder for results.json, the COCO-format predictions and the page
        batch_size: items per forward pass
        device: auto, cpu, cuda, mps
        page_images: images shown on captions.html
        progress: show progress bars
        encoding: text encoding of the dataset's CSV / JSON files (e.g. latin-1, cp1252)
    """
    methods = method or ["decap", "capdec"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown --method {', '.join(unknown)}; the captioners are {', '.join(METHODS)}")
    check_at_least(1, beams=beams, epochs=epochs, batch_size=batch_size)
    check_at_least(0, max_images=max_images, page_images=page_images)
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    decoders = Path(decoders) if decoders else out / "decoders"
    results: Dict = {"dataset": dataset, "encoders": {}}
    shown: Dict[str, Dict[str, List[str]]] = {}
    val_refs: Dict[str, List[str]] = {}
    sources = {"baseline": baseline, "encoder": encoder}
    models = {role: load_encoder(source, device=dev) for role, source in sources.items()}  # a bad one fails first
    for role, source in sources.items():
        model = models[role].eval()
        label = model.label
        train = open_dataset(dataset, data_root, "train", train=False, transform=model.preprocess, encoding=encoding)
        val = open_dataset(dataset, data_root, "validation", train=False, transform=model.preprocess,
                           encoding=encoding)
        texts = [caption_text(train.product(i).tags) for i in range(len(train))]
        text_features = _encode_texts(model, texts, batch_size, dev)
        val_ids, val_features, skipped = _encode_images(model, val, batch_size, dev, max_images)
        val_refs = {str(i): [caption_text(val.product(i).tags)] for i in val_ids}
        entry = {"role": role, "source": str(source), "kind": model.kind, "skipped_images": skipped, "methods": {}}
        for name in methods:
            captioner = METHODS[name](model, beams=beams)
            path = decoders / f"{name}-{model.fingerprint()[:16]}.safetensors"
            if path.is_file():
                captioner.load(path)
            else:
                image_features = _train_image_features(model, train, batch_size, dev) if name == "clipcap" else None
                print(f"training the {name} decoder for {model.name} on {len(texts)} captions ...", flush=True)
                captioner.fit(texts, text_features, image_features, epochs=epochs, progress=progress)
                captioner.save(path)
            predictions = dict(zip(map(str, val_ids), _caption(captioner, val_features, batch_size)))
            write_coco_results(predictions, out / f"captions-{_slug(label)}-{name}.json")
            scores = caption_metrics(predictions, val_refs)
            entry["methods"][name] = scores
            shown.setdefault(f"{label} {name}", predictions)
        results["encoders"][label] = entry
    _print_table(results, methods)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    page = _write_page(out, val, val_refs, shown, page_images) if page_images else None
    return {"results": str(out / "results.json"), "page": str(page) if page else None,
            **{label: {m: r["methods"][m]["metrics"].get("BLEU-4") for m in methods}
               for label, r in results["encoders"].items()}}


def caption_text(tags: Dict[str, str]) -> str:
    """A product's reference caption: its description, else its title or text."""
    for field in ("description", "title", "text"):
        if tags.get(field, "").strip():
            return " ".join(tags[field].split())
    return " ".join(" ".join(tags.values()).split())


def load_captioner(path: Path, encoder) -> Captioner:
    """A trained captioner from its safetensors file, for ``encoder`` (refused if made for another)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        name = (f.metadata() or {}).get("method")
    if name not in METHODS:
        raise CaptionerMismatch(f"{path} is not a decoder of this task (method {name!r})")
    return METHODS[name](load_encoder(encoder) if isinstance(encoder, str) else encoder).load(path)


@torch.no_grad()
def _encode_texts(encoder, texts: List[str], batch_size: int, device) -> torch.Tensor:
    from e2_core import trim_padding

    return torch.cat([encoder.encode_text(trim_padding(encoder.tokenizer(texts[i:i + 256])).to(device),
                                          normalize=True).float().cpu() for i in range(0, len(texts), 256)])


@torch.no_grad()
def _encode_images(encoder, data, batch_size: int, device, limit: int = 0) -> Tuple[List[int], torch.Tensor, List[str]]:
    subset = torch.utils.data.Subset(data, range(min(limit, len(data)) if limit else len(data)))
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=E2Collate(encoder.tokenizer, data.spec))
    ids, features, skipped = [], [], []
    for batch in loader:
        skipped += batch.skipped
        if batch.indices:
            ids += batch.indices
            features.append(encoder.encode_image(batch.images.to(device), normalize=True).float().cpu())
    if skipped:
        print(f"{len(skipped)} unreadable image(s) skipped, e.g. {skipped[0]} (all listed in results.json)")
    return ids, (torch.cat(features) if features else torch.empty(0, encoder.embed_dim)), skipped


def _train_image_features(encoder, data, batch_size: int, device) -> torch.Tensor:
    ids, features, skipped = _encode_images(encoder, data, batch_size, device)
    if skipped:
        raise ValueError(f"clipcap needs every training image; {len(skipped)} unreadable, e.g. {skipped[0]}")
    return features


def _caption(captioner: Captioner, features: torch.Tensor, batch_size: int) -> List[str]:
    return [c for i in range(0, len(features), batch_size)
            for c in captioner.caption_features(features[i:i + batch_size].to(captioner.encoder.device))]


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label).strip("-").lower()


def _print_table(results: Dict, methods: List[str]) -> None:
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"]
    present = [n for n in names if any(n in r["methods"][m]["metrics"] for r in results["encoders"].values()
                                       for m in methods)]
    width = max(len(label) for label in results["encoders"]) + 2
    print(f"\n{'method':<9}{'encoder':<{width}}" + "".join(f"{n:>9}" for n in present))
    for m in methods:
        for label, r in results["encoders"].items():
            metrics = r["methods"][m]["metrics"]
            print(f"{m:<9}{label:<{width}}" + "".join(f"{metrics[n]:9.1f}" if n in metrics else f"{'-':>9}"
                                                       for n in present))
    first = next(iter(results["encoders"].values()))["methods"][methods[0]]
    for note in first["notes"]:
        print(note)
    if first["not_scored"]:
        print(f"{len(first['not_scored'])} image(s) have no reference caption and are not scored, e.g. "
              f"{first['not_scored'][0]}")


def _write_page(out: Path, data, references: Dict[str, List[str]], shown: Dict[str, Dict[str, str]],
                count: int) -> Path:
    """captions.html: each image with every encoder's and method's caption and its references."""
    folder = out / "page"
    folder.mkdir(exist_ok=True)
    rows = []
    for key in list(references)[:count]:
        image = data.load_image(int(key), 0).convert("RGB")
        image.thumbnail((160, 160))
        image.save(folder / f"{key}.png")
        generated = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(p.get(key, ''))}</td></tr>"
                            for name, p in shown.items())
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in references[key])
        rows.append(f'<div class="item"><img src="page/{key}.png" alt="product {key}"><div><table>{generated}'
                    f'</table><p class="refs">References:</p><ul>{refs}</ul></div></div>')
    page = out / "captions.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'><title>e2-plugins captions</title><style>"
                    "body{font-family:sans-serif;margin:16px}.item{display:flex;gap:16px;margin-bottom:18px;"
                    "border-bottom:1px solid #ddd;padding-bottom:12px}th{text-align:left;padding-right:12px;"
                    "color:#555;font-weight:normal}.refs{margin:6px 0 0;color:#555}</style></head><body>"
                    "<h1>Generated captions and references</h1>" + "".join(rows) + "</body></html>",
                    encoding="utf-8")
    return page


task = Task("caption", caption)

__all__ = ["METHODS", "caption", "caption_text", "load_captioner", "task"]
