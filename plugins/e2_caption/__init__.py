"""The ``caption`` task: zero-shot image captioning with DeCap and CapDec (decoders trained on text
only), a baseline encoder and E2 side by side, scored with the COCO caption metrics.

From Python, a trained captioner is ``captioner(images) -> captions`` (:func:`load_captioner`)."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from e2_core import load_encoder
from e2_core.data import open_dataset
from e2_core.embedding import embed_images, embed_texts
from e2_core.errors import check_at_least
from e2_core.registry import CAPTION_METHOD_GROUP, Registry, Task
from e2_core.runtime import resolve_device
from e2_eval.captions import caption_metrics, write_coco_references, write_coco_results
from e2_eval.sidebyside import SideBySide, format_table, report_skipped

from .captioner import PRESETS, Captioner, CaptionerMismatch, epochs_for
from .figures import write_page

log = logging.getLogger(__name__)

#: every installed captioner, by the name ``--method`` takes (the ``e2_plugins.caption_methods`` group)
METHODS = Registry(CAPTION_METHOD_GROUP)
#: the fewest optimizer steps a decoder trains for (default of ``min_steps``)
MIN_STEPS = 150


def caption(dataset: str = "synthetic", data_root: Optional[str] = None, method: Optional[List[str]] = None,
            encoder: str = "demo:e2", baseline: str = "demo:clip-ft", decoder: str = "demo",
            language_model: Optional[Path] = None, beams: Optional[int] = None, epochs: Optional[int] = None,
            min_steps: int = MIN_STEPS, seed: int = 0, decoders: Optional[Path] = None, max_images: int = 500,
            out: Path = Path("runs/caption"), batch_size: int = 64, device: str = "auto", page_images: int = 12,
            progress: bool = True, encoding: str = "utf-8") -> Dict:
    """Zero-shot image captioning (BLEU-1..4, METEOR, ROUGE-L, CIDEr), a baseline and E2 side by side.

    Args:
        dataset: an installed dataset reader: synthetic, fashiongen, amazon-fashion, catalog, ...
        data_root: the dataset's folder or file
        method: captioners (default: the zero-shot ones, trained on text alone; clipcap trains on image-caption pairs)
        encoder: the encoder under test: a checkpoint directory, MODEL:TAG, MODEL:FILE, a reference best.pth, or demo:e2 / demo:clip-ft
        baseline: the encoder it is compared with, in the same forms
        decoder: the decoders' preset: demo (small, trained from scratch in minutes on a CPU) or paper (each original's decoder, training and decoding: DeCap's 4-layer GPT-2, CapDec's 8-block mapper and GPT-2)
        language_model: a local GPT-2-style model folder the decoders start from (CapDec's paper setting: GPT-2 base); its tokenizer writes the captions
        beams: beam width of decoding (1: greedy; default: the preset's, demo 1, paper CapDec 5)
        epochs: training epochs of a decoder, when none is saved for the encoder and these training captions (default: the preset's, demo 3, paper 10)
        min_steps: the fewest optimizer steps a decoder trains for: more epochs where the training captions are few (a decoder trained for a few steps writes one caption for every image)
        seed: seed of the decoders' initialisation and training order
        decoders: folder of trained decoders, one per method, encoder and training captions, reused when present (default: OUT/decoders)
        max_images: validation images captioned and scored (0: all)
        out: folder for results.json, the COCO-format predictions and the page
        batch_size: items per forward pass
        device: auto, cpu, cuda, mps
        page_images: images shown on captions.html
        progress: show progress bars
        encoding: text encoding of the dataset's CSV / JSON files (e.g. latin-1, cp1252)
    """
    methods = method or [name for name in METHODS if not METHODS[name].pairs]  # the zero-shot ones
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {', '.join(unknown)}; the captioners are {', '.join(METHODS)}")
    if decoder not in PRESETS:
        raise ValueError(f"decoder={decoder!r}: one of {', '.join(PRESETS)}")
    if language_model is not None and not Path(language_model).is_dir():
        raise FileNotFoundError(f"language_model={language_model}: no such model folder (a local GPT-2-style "
                                "Hugging Face folder)")
    check_at_least(1, batch_size=batch_size, **{k: v for k, v in (("beams", beams), ("epochs", epochs))
                                                if v is not None})
    check_at_least(0, min_steps=min_steps)
    check_at_least(0, max_images=max_images, page_images=page_images)
    dev = resolve_device(device)
    out = Path(out)
    decoders = Path(decoders) if decoders else out / "decoders"
    options = dict(train=False, encoding=encoding, prepare=True)
    train = open_dataset(dataset, data_root, "train", **options)
    val = open_dataset(dataset, data_root, "validation", **options)
    runner = SideBySide(out, {"baseline": baseline, "encoder": encoder}, dev, {"dataset": dataset})
    out.mkdir(parents=True, exist_ok=True)
    shown: Dict[str, Dict[str, str]] = {}
    texts = [caption_text(train.product(i).tags) for i in range(len(train))]
    subset = torch.utils.data.Subset(val, range(min(max_images, len(val)) if max_images else len(val)))
    val_refs: Dict[str, List[str]] = {}
    said: List[str] = []  # each step floor is said once
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    for label, model in runner.encoders():
        runner.check_vocabulary(label, texts, "training captions", " and its decoders cannot learn to tell them "
                                "apart (expect few distinct captions)", (dataset, data_root))
        text_features = embed_texts(model, texts, batch_size=batch_size)
        images = embed_images(model, subset, batch_size=batch_size)
        report_skipped(label, images.skipped, runner.path)
        runner.entry(label)["skipped_images"] = images.skipped
        val_refs = {str(i): [caption_text(val.product(i).tags)] for i in images.indices}

        def run(name: str) -> Dict:
            captioner = METHODS[name](model, beams=beams, preset=decoder,
                                      language_model=str(language_model) if language_model else None)
            run_epochs, too_few = _enough_epochs(epochs or captioner.training.epochs, len(texts), min_steps,
                                                 captioner.training.batch_size)
            trained_on = {"dataset": dataset, "data_root": str(data_root) if data_root else None,
                          "captions": len(texts), "digest": digest, "epochs": run_epochs, "seed": seed,
                          "preset": decoder, "language_model": str(language_model) if language_model else None}
            # a decoder belongs to an encoder, to the captions it learnt to write and to how it was trained: the
            # preset's every value (a preset whose values change makes other decoders), not only its name
            settings = hashlib.sha256(json.dumps(
                {**{k: trained_on[k] for k in ("epochs", "seed", "preset", "language_model")},
                 "decoder": captioner.config.to_dict(), "training": asdict(captioner.training),
                 "options": captioner.options}, sort_keys=True, default=str).encode())
            path = decoders / (f"{name}-{model.fingerprint()[:16]}-{digest[:12]}-{settings.hexdigest()[:8]}"
                               ".safetensors")
            if path.is_file():
                captioner.load(path)
            else:
                others = sorted(decoders.glob(f"{name}-{model.fingerprint()[:16]}-*.safetensors"))
                if others:
                    log.warning("%s: the %s decoder(s) saved for %s were trained on other captions or settings "
                                "(%s); training one on these", label, name, model.name, others[0].name)
                image_features = _train_image_features(model, train, batch_size) if captioner.pairs else None
                if too_few and too_few not in said:
                    log.warning(too_few)
                    said.append(too_few)
                log.info("training the %s decoder (%s) for %s on %d captions, %d epochs ...", name, decoder,
                         model.name, len(texts), run_epochs)
                captioner.fit(texts, text_features, image_features, epochs=run_epochs, seed=seed, progress=progress)
                captioner.save(path, trained_on)
            predictions = dict(zip(map(str, images.indices), _caption(captioner, images.features, batch_size)))
            written = write_coco_results(predictions, out / f"captions-{_slug(label)}-{name}.json")
            shown[f"{label} {name}"] = predictions
            return {**caption_metrics(predictions, val_refs), "decoder": str(path),
                    "trained_on": captioner.trained_on or trained_on, "captions": str(written)}

        for name in methods:
            runner.record(label, name, lambda: run(name))
    runner.results["references"] = str(write_coco_references(val_refs, out / "references.json"))
    _print_table(runner.results, methods)
    page = write_page(out, val, val_refs, shown, page_images) if page_images else None
    path = runner.finish()
    return {"results": str(path), "page": str(page) if page else None,
            **{label: {m: r["methods"][m]["metrics"].get("BLEU-4") for m in methods if m in r["methods"]}
               for label, r in runner.results["encoders"].items()}}


def _enough_epochs(epochs: int, captions: int, min_steps: int, batch_size: int) -> Tuple[int, str]:
    """:func:`~e2_caption.captioner.epochs_for`, and the line that says so (empty when ``epochs`` is enough)."""
    needed, per_epoch = epochs_for(epochs, captions, min_steps, batch_size), max(1, -(-captions // batch_size))
    if needed == epochs:
        return epochs, ""
    return needed, (f"{captions} training captions: {epochs} epochs would be {epochs * per_epoch} optimizer steps, too "
                    f"few to learn to write; training {needed} epochs ({needed * per_epoch} steps, min_steps)")


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


def _train_image_features(encoder, data, batch_size: int) -> torch.Tensor:
    images = embed_images(encoder, data, batch_size=batch_size)
    if images.skipped:
        raise ValueError(f"a captioner trained on pairs needs every training image; {len(images.skipped)} "
                         f"unreadable, e.g. {images.skipped[0]}")
    return images.features


def _caption(captioner: Captioner, features: torch.Tensor, batch_size: int) -> List[str]:
    return [c for i in range(0, len(features), batch_size)
            for c in captioner.caption_features(features[i:i + batch_size].to(captioner.encoder.device))]


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label).strip("-").lower()


def _print_table(results: Dict, methods: List[str]) -> None:
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"]
    scored = [(m, label, r["methods"][m]) for m in methods for label, r in results["encoders"].items()
              if m in r["methods"]]
    present = [n for n in names if any(n in s["metrics"] for _, _, s in scored)]
    print()
    print(format_table(["method", "encoder"] + present,
                       [[m, label] + [s["metrics"].get(n) for n in present] for m, label, s in scored], first=2))
    for label, entry in results["encoders"].items():
        share = entry.get("vocabulary_coverage", {}).get("share")
        if share:
            print(f"{label}: {100 * share:.1f}% of the training captions' tokens have no embedding in this encoder; "
                  "its captions cannot tell the words apart (see the warning above, vocabulary_coverage in "
                  "results.json)")
    if not scored:
        return
    first = scored[0][2]
    for note in first["notes"]:
        print(note)
    if first["not_scored"]:
        print(f"{len(first['not_scored'])} image(s) have no reference caption and are not scored, e.g. "
              f"{first['not_scored'][0]}")


task = Task("caption", caption, choices={"method": lambda: list(METHODS), "decoder": lambda: list(PRESETS)})

__all__ = ["METHODS", "caption", "caption_text", "load_captioner", "task"]
