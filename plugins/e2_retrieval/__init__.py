"""The ``retrieval`` task: image-to-text and text-to-image retrieval, CLIP and E2 side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Literal, Optional

from e2_core.data import open_dataset
from e2_core.errors import check_at_least
from e2_core.registry import Task
from e2_core.runtime import resolve_device
from e2_eval.harness import embed_dataset, evaluate_retrieval
from e2_eval.sidebyside import SideBySide, format_table, report_skipped

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
    check_at_least(1, batch_size=batch_size, num_negatives=num_negatives)
    check_at_least(0, workers=workers)
    dev = resolve_device(device)
    protocols = ("full", "sample-100") if protocol == "both" else (protocol,)
    out = Path(out)
    options = dict(train=False, strict=strict, encoding=encoding, prepare=True)
    checked = open_dataset(dataset, data_root, "validation", **options)  # a data problem, before any model loads
    queries = [checked.text(i) for i in range(len(checked))]  # the same for every encoder
    runner = SideBySide(out, {"baseline": baseline, "encoder": encoder}, dev, {"dataset": dataset},
                        section="protocols")
    out.mkdir(parents=True, exist_ok=True)
    embeddings = {}
    for label, model in runner.encoders():
        data = open_dataset(dataset, data_root, "validation", transform=model.preprocess, **options)
        runner.check_vocabulary(label, queries, "validation texts",
                                " (text-to-image retrieval cannot tell such products apart)", (dataset, data_root))
        images, texts, indices, skipped = embed_dataset(model, data, batch_size, dev, workers=workers,
                                                        cache_dir=out / "embeddings")
        report_skipped(label, skipped, runner.path)
        runner.entry(label).update({"items": len(indices), "skipped_images": skipped})
        groups = None
        if "sample-100" in protocols:
            all_groups = data.groups("subcategory")
            groups = [all_groups[i] for i in indices]
        scores = evaluate_retrieval(images, texts, groups, protocols, num_negatives=num_negatives)
        if "sample-100" in scores:
            scores["sample-100"] = _sampled_protocol(scores["sample-100"], groups, num_negatives)
        for name in protocols:
            runner.record(label, name, lambda: _rounded(scores[name]))
        embeddings[label] = (images, texts, indices, data)
    _print_table(runner.results["encoders"], protocols)
    figures = {"top5": str(save_top5_figure(embeddings, out / "top5.png"))}
    regional = [label for label, model in runner.encoders() if model.has_regions]
    if regional:
        label = regional[-1]
        figures["selection"] = str(save_selection_figure(runner.models[label], embeddings[label][3],
                                                         out / "selection.png", dev))
    path = runner.finish()
    return {"results": str(path), **figures,
            **{label: {p: r["protocols"][p].get("sumr", r["protocols"][p].get("error")) for p in protocols}
               for label, r in runner.results["encoders"].items()}}


def _sampled_protocol(scores: Dict, groups, num_negatives: int) -> Dict:
    """Sample-100's scores with the protocol applied, or its error in the command's words."""
    if "error" in scores:
        return {"error": scores["error"] + " (or score the full protocol only)"}
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


def _print_table(encoders: Dict, protocols) -> None:
    for protocol in protocols:
        scored = {name: r["protocols"][protocol] for name, r in encoders.items() if protocol in r["protocols"]}
        notes = sorted({s["negatives"] for s in scored.values() if "negatives" in s})
        print(f"\n{protocol} protocol" + (f": negatives per query, {'; '.join(notes)}" if notes else ""))
        rows = [[name, s["i2t"][1], s["i2t"][5], s["i2t"][10], s["t2i"][1], s["t2i"][5], s["t2i"][10], s["sumr"]]
                for name, s in scored.items() if "error" not in s]
        print(format_table(["", "I2T R@1", "R@5", "R@10", "T2I R@1", "R@5", "R@10", "SumR"], rows))
        for name, s in scored.items():
            if "error" in s:
                print(f"{name} not scored: {s['error']}")


task = Task("retrieval", retrieval)
