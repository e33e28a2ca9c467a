"""The ``retrieval`` task: image-to-text and text-to-image retrieval, CLIP and E2 side by side."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Literal, Optional

from e2_core import load_encoder
from e2_core.data import open_dataset
from e2_core.registry import Task
from e2_core.runtime import resolve_device
from e2_eval.harness import cached_embeddings, evaluate_retrieval

from .figures import save_selection_figure, save_top5_figure


def retrieval(dataset: str = "synthetic", data_root: Optional[str] = None, encoder: str = "demo:e2",
              baseline: str = "demo:clip-ft", protocol: Literal["full", "sample-100", "both"] = "both",
              num_negatives: int = 100, out: Path = Path("runs/retrieval"), batch_size: int = 128,
              device: str = "auto", workers: int = 0, strict: bool = False, encoding: str = "utf-8") -> Dict:
    """Cross-modal retrieval (I2T, T2I R@1/5/10 and SumR), a baseline and E2 side by side.

    Args:
        dataset: an installed dataset reader: synthetic, fashiongen, amazon-fashion, catalog, ...
        data_root: the dataset's folder or file
        encoder: the encoder under test: a checkpoint directory, MODEL:TAG, MODEL:FILE, a reference best.pth, or demo:e2 / demo:clip-ft (the shipped demo encoders)
        baseline: the encoder it is compared with, in the same forms
        protocol: full (rank against the whole test set), sample-100 (positive + 100 negatives of the same sub-category) or both
        num_negatives: negatives per query in sample-100, drawn from its sub-category (from all products when the dataset has none)
        out: folder for results.json and the figures
        batch_size: items per forward pass
        device: auto, cpu, cuda, mps
        workers: DataLoader worker processes
        strict: stop at the first unreadable image instead of skipping and reporting it
        encoding: text encoding of the dataset's CSV / JSON files (e.g. latin-1, cp1252)
    """
    dev = resolve_device(device)
    protocols = ("full", "sample-100") if protocol == "both" else (protocol,)
    out.mkdir(parents=True, exist_ok=True)
    results, embeddings, encoders = {}, {}, {}
    options = dict(train=False, strict=strict, encoding=encoding)
    open_dataset(dataset, data_root, "validation", **options)  # a data problem is reported before any model loads
    sources = {"baseline": baseline, "encoder": encoder}
    models = {role: load_encoder(source, device=dev) for role, source in sources.items()}  # a bad one fails first
    for role, source in sources.items():
        model = models[role]
        label = model.label if model.label not in results else f"{model.label} #2"
        data = open_dataset(dataset, data_root, "validation", transform=model.preprocess, **options)
        images, texts, indices, skipped = cached_embeddings(
            model, data, Path(out) / "embeddings", batch_size=batch_size, device=str(dev), workers=workers)
        if skipped:
            print(f"{label}: {len(skipped)} unreadable image(s) skipped, e.g. {'; '.join(skipped[:3])} "
                  f"(all listed under \"skipped_images\" in {out / 'results.json'})")
        groups = None
        if "sample-100" in protocols:
            all_groups = data.groups("subcategory")
            groups = [all_groups[i] for i in indices]
        scores = evaluate_retrieval(images, texts, groups, protocols, num_negatives=num_negatives)
        if "sample-100" in scores:
            scores["sample-100"] = _sampled_protocol(scores["sample-100"], groups, num_negatives)
        results[label] = {"role": role, "encoder": str(source), "kind": model.kind, "items": len(indices),
                          "skipped_images": skipped, **scores}
        embeddings[label], encoders[label] = (images, texts, indices, data), model
    _print_table(results, protocols)
    results = _rounded(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figures = {"top5": str(save_top5_figure(embeddings, out / "top5.png"))}
    regional = [label for label, model in encoders.items() if model.has_regions]
    if regional:
        label = regional[-1]
        figures["selection"] = str(save_selection_figure(encoders[label], embeddings[label][3],
                                                         out / "selection.png", dev))
    return {"results": str(out / "results.json"), **figures,
            **{name: {p: r[p].get("sumr", r[p].get("error")) for p in protocols} for name, r in results.items()}}


def _sampled_protocol(scores: Dict, groups, num_negatives: int) -> Dict:
    """Sample-100's scores with the protocol applied, or its error in the command's words."""
    if "error" in scores:
        return {"error": scores["error"].replace("num_negatives", "--num-negatives")
                + " (or --protocol full)"}
    if not any(groups):
        return {**scores, "negatives": f"{num_negatives} drawn from all products (the dataset has no sub-category)"}
    return {**scores, "negatives": f"{num_negatives} drawn from the query's sub-category"}


def _rounded(value, digits: int = 4):
    """Scores as written: floats rounded (no 96.89999999999999)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _print_table(results: Dict, protocols) -> None:
    for protocol in protocols:
        notes = sorted({r[protocol]["negatives"] for r in results.values() if "negatives" in r[protocol]})
        print(f"\n{protocol} protocol" + (f": negatives per query, {'; '.join(notes)}" if notes else ""))
        width = max(6, *(len(name) for name in results))
        print(f"{'':{width}} {'I2T R@1':>8} {'R@5':>6} {'R@10':>6} {'T2I R@1':>8} {'R@5':>6} {'R@10':>6} {'SumR':>7}")
        for name, r in results.items():
            scores = r[protocol]
            if "error" in scores:
                print(f"{name:{width}} not scored: {scores['error']}")
                continue
            i2t, t2i = scores["i2t"], scores["t2i"]
            print(f"{name:{width}} {i2t[1]:8.1f} {i2t[5]:6.1f} {i2t[10]:6.1f} {t2i[1]:8.1f} {t2i[5]:6.1f} "
                  f"{t2i[10]:6.1f} {scores['sumr']:7.1f}")


task = Task("retrieval", retrieval)
