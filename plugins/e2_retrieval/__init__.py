"""The ``retrieval`` task: image-to-text and text-to-image retrieval, CLIP and E2 side by side."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Literal, Optional


from e2_core import create_clip, create_e2, get_tokenizer, image_transforms, load_encoder
from e2_core.data.open import open_dataset
from e2_core.model import E2Model
from e2_core.registry import Task
from e2_core.runtime import resolve_device
from e2_eval.harness import cached_embeddings, evaluate_retrieval

from .figures import save_selection_figure, save_top5_figure


def retrieval(dataset: Literal["synthetic", "fashiongen", "amazon-fashion", "catalog"] = "synthetic",
              data_root: Optional[str] = None, encoder: Optional[str] = None, baseline: Optional[str] = None,
              protocol: Literal["full", "sample-100", "both"] = "both", out: Path = Path("runs/retrieval"),
              batch_size: int = 128, device: str = "auto", workers: int = 0, strict: bool = False) -> Dict:
    """Cross-modal retrieval (I2T, T2I R@1/5/10 and SumR), CLIP and E2 side by side.

    Args:
        dataset: synthetic (default, generated on first use), fashiongen, amazon-fashion or catalog
        data_root: the dataset's folder or file
        encoder: E2 checkpoint directory (default: the demo E2, trained on first use)
        baseline: CLIP checkpoint directory, or MODEL:TAG for open_clip weights, e.g. ViT-B-32:openai (default: the demo CLIP-FT)
        protocol: full (rank against the whole test set), sample-100 (positive + 100 negatives of the same sub-category) or both
        out: folder for results.json and the figures
        batch_size: items per forward pass
        device: auto, cpu, cuda, mps
        workers: DataLoader worker processes
        strict: stop at the first unreadable image instead of skipping and reporting it
    """
    if encoder is None or baseline is None:
        from e2_core.training.demo import demo_encoders
        demo = demo_encoders()
        encoder, baseline = encoder or str(demo["e2"]), baseline or str(demo["clip-ft"])
    dev = resolve_device(device)
    protocols = ("full", "sample-100") if protocol == "both" else (protocol,)
    out.mkdir(parents=True, exist_ok=True)
    results, embeddings, models = {}, {}, {}
    for name, source in (("CLIP", baseline), ("E2", encoder)):
        model = _load(source, dev, kind=name)
        _, preprocess = image_transforms(model)
        data = open_dataset(dataset, data_root, "validation", train=False, transform=preprocess, strict=strict)
        images, texts, indices, skipped = cached_embeddings(
            model, data, get_tokenizer(model), source if Path(source).is_dir() else None,
            Path(out) / "embeddings", batch_size=batch_size, device=str(dev), workers=workers)
        groups = None
        if "sample-100" in protocols:
            all_groups = data.groups("subcategory")
            groups = [all_groups[i] for i in indices]
        results[name] = {"encoder": str(source), "type": type(model).__name__, "items": len(indices),
                         "skipped_images": skipped, **evaluate_retrieval(images, texts, groups, protocols)}
        embeddings[name], models[name] = (images, texts, indices, data), model
    _print_table(results, protocols)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figures = {"top5": str(save_top5_figure(embeddings, out / "top5.png"))}
    e2 = models["E2"]
    if isinstance(e2, E2Model):
        figures["selection"] = str(save_selection_figure(e2, embeddings["E2"][3], out / "selection.png", dev))
    return {"results": str(out / "results.json"), **figures,
            **{name: {p: r[p].get("sumr", r[p].get("error")) for p in protocols} for name, r in results.items()}}


def _load(source: str, device, kind: str):
    """A checkpoint directory, or ``MODEL:TAG`` (open_clip weights: a plain CLIP as the baseline)."""
    if not Path(source).exists() and ":" in source:
        model_name, tag = source.split(":", 1)
        return (create_clip if kind == "CLIP" else create_e2)(model_name, tag, device=device)
    return load_encoder(pretrained=source, device=device)


def _print_table(results: Dict, protocols) -> None:
    for protocol in protocols:
        print(f"\n{protocol} protocol")
        print(f"{'':6} {'I2T R@1':>8} {'R@5':>6} {'R@10':>6} {'T2I R@1':>8} {'R@5':>6} {'R@10':>6} {'SumR':>7}")
        for name, r in results.items():
            scores = r[protocol]
            if "error" in scores:
                print(f"{name:6} not scored: {scores['error']}")
                continue
            i2t, t2i = scores["i2t"], scores["t2i"]
            print(f"{name:6} {i2t[1]:8.1f} {i2t[5]:6.1f} {i2t[10]:6.1f} {t2i[1]:8.1f} {t2i[5]:6.1f} "
                  f"{t2i[10]:6.1f} {scores['sumr']:7.1f}")


task = Task("retrieval", retrieval)
