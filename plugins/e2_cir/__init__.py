"""The ``cir`` task: zero-shot composed image retrieval on FashionIQ (reference image + relative
captions -> target image), every method with a baseline encoder and E2 side by side."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch

from e2_core import load_encoder
from e2_core.errors import check_at_least
from e2_core.registry import Task
from e2_core.runtime import resolve_device
from e2_eval.fashioniq import (CATEGORIES, CONVENTIONS, FashionIQ, composed_recall, compose, embed_images,
                               load_fashioniq, summarize)

from .figures import save_query_grid
from .methods import METHODS, CIRMethod, QueryBatch, TrainData, load_network, save_network
from .methods.base import PseudoWordMethod
from .phrases import tagger

SYNTHETIC_TRIPLETS = 100  # per category and split, for the embedded default data


def cir(dataset: Literal["synthetic", "fashioniq"] = "synthetic", data_root: Optional[str] = None,
        method: Optional[List[str]] = None, encoder: str = "demo:e2", baseline: str = "demo:clip-ft",
        convention: Optional[str] = None, category: Optional[List[str]] = None, captioner: str = "vocabulary",
        rewriter: str = "template", networks: Optional[Path] = None, out: Path = Path("runs/cir"),
        batch_size: int = 64, device: str = "auto", figure_queries: int = 4, progress: bool = True) -> Dict:
    """Zero-shot composed image retrieval on FashionIQ (R@1/5/10/50 per category), a baseline and E2 side by side.

    Args:
        dataset: synthetic (FashionIQ-layout products, generated on first use) or fashioniq (--data-root: the FashionIQ folder)
        data_root: the FashionIQ folder (captions/ or json/, image_splits/, images/)
        method: methods to run: image, text, image+text, pic2word, searle, lincir, cirevl (default: all)
        encoder: the encoder under test: a checkpoint directory, MODEL:TAG, MODEL:FILE, a reference best.pth, or demo:e2 / demo:clip-ft
        baseline: the encoder it is compared with, in the same forms
        convention: how the two relative captions become a query: searle, pic2word or cirevl (default: each method's own)
        category: FashionIQ categories to score: dress, shirt, toptee (default: all three)
        captioner: CIReVL's captioner: vocabulary (offline, zero-shot tags) or hf:PATH (a local Hugging Face image-to-text model)
        rewriter: CIReVL's rewriter: template (deterministic) or hf:PATH (a local Hugging Face text-generation model)
        networks: folder of the methods' trained networks, one per method and encoder, reused when present (default: OUT/networks)
        out: folder for results.json, the figures and cached embeddings
        batch_size: images per forward pass
        device: auto, cpu, cuda, mps
        figure_queries: queries drawn in each method's figure (0: none)
        progress: show progress bars
    """
    methods = method or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown --method {', '.join(unknown)}; the methods are {', '.join(METHODS)}")
    if convention is not None and convention not in CONVENTIONS:
        raise ValueError(f"unknown --convention {convention!r}; the conventions are {', '.join(CONVENTIONS)}")
    check_at_least(1, batch_size=batch_size)
    check_at_least(0, figure_queries=figure_queries)
    categories = category or list(CATEGORIES)
    root = _data_root(dataset, data_root)
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    networks = Path(networks) if networks else out / "networks"
    val = {c: load_fashioniq(root, c, "val") for c in categories}
    train_split = [load_fashioniq(root, c, "train") for c in CATEGORIES if _has_split(root, c, "train")]
    _report_dropped(list(val.values()) + train_split)
    print(f"keyword phrases: {tagger()}")

    results: Dict = {"dataset": str(root), "conventions": {}, "dropped": {}, "encoders": {}}
    for data in list(val.values()) + train_split:
        if data.dropped or data.missing_images:
            results["dropped"][f"{data.split}/{data.category}"] = {"triplets": data.dropped,
                                                                   "gallery_images": data.missing_images}
    figures = {}
    sources = {"baseline": baseline, "encoder": encoder}
    models = {role: load_encoder(source, device=dev) for role, source in sources.items()}  # a bad one fails first
    for role, source in sources.items():
        model = models[role]
        label = model.label
        cache = out / "embeddings"
        train = _train_data(model, train_split, cache, batch_size, str(dev))
        galleries = {c: embed_images(model, d.gallery, d, cache, batch_size, str(dev)) for c, d in val.items()}
        scores = {}
        for name in methods:
            runner = METHODS[name](**_options(name, captioner, rewriter))
            used = convention or runner.convention
            _check_convention(runner, used)
            results["conventions"][name] = used
            _fit(runner, model, train, networks, progress)
            per_category, shown = {}, {}
            for c, data in val.items():
                queries, targets = _queries(runner, model, data, galleries[c], used)
                per_category[c] = composed_recall(queries, galleries[c], data.gallery, targets)
                shown[c] = (queries, targets)
            scores[name] = {**per_category, **summarize(per_category)}
            if figure_queries:
                first = categories[0]
                figures.setdefault(name, {})[label] = (val[first], shown[first][0], galleries[first])
        results["encoders"][label] = {"role": role, "source": str(source), "kind": model.kind, "methods": scores}
    _print_table(results, methods, categories)
    (out / "results.json").write_text(json.dumps(_without_ranks(results), indent=2))
    drawn = {name: str(save_query_grid(by_encoder, out / f"cir-{name}.png", figure_queries))
             for name, by_encoder in figures.items()}
    return {"results": str(out / "results.json"), "figures": drawn,
            **{label: {m: r["methods"][m]["mean R@10"] for m in methods} for label, r in results["encoders"].items()}}


def _data_root(dataset: str, data_root: Optional[str]) -> Path:
    if dataset == "fashioniq":
        if data_root is None:
            raise ValueError("--dataset fashioniq needs --data-root: the FashionIQ folder with captions/ (or json/), "
                             "image_splits/ and images/ (from github.com/XiaoxiaoGuo/fashion-iq)")
        return Path(data_root)
    if dataset != "synthetic":
        raise ValueError(f"unknown --dataset {dataset!r}; cir reads synthetic or fashioniq")
    if data_root is not None:
        return Path(data_root)
    from e2_core.data import default_synthetic_root
    from e2_core.data.builders.synthetic import write_fashioniq

    root = default_synthetic_root("fashioniq")
    if not (root / "captions" / "cap.toptee.val.json").is_file():
        print(f"generating synthetic FashionIQ-layout data ({SYNTHETIC_TRIPLETS} triplets per category and split) "
              f"in {root} ...", flush=True)
        write_fashioniq(root, SYNTHETIC_TRIPLETS)
    return root


def _has_split(root: Path, category: str, split: str) -> bool:
    from e2_eval.fashioniq import fashioniq_root
    r = fashioniq_root(root)
    return any((r / layout / f"cap.{category}.{split}.json").is_file() for layout in ("captions", "json"))


def _report_dropped(splits: List[FashionIQ]) -> None:
    for data in splits:
        if data.dropped:
            print(f"{data.split}/{data.category}: {len(data.dropped)} triplet(s) left out, their images are missing, "
                  f"e.g. {data.dropped[0]} (all listed in results.json)")
        if data.missing_images:
            print(f"{data.split}/{data.category}: {len(data.missing_images)} gallery image(s) missing, e.g. "
                  f"{data.missing_images[0]}")


def _options(name: str, captioner: str, rewriter: str) -> Dict:
    return {"captioner": captioner, "rewriter": rewriter} if name == "cirevl" else {}


def _check_convention(runner: CIRMethod, convention: str) -> None:
    if isinstance(runner, PseudoWordMethod) and "$" not in compose(convention, ("c1", "c2"))[0]:
        raise ValueError(f"--convention {convention} gives no place for the reference image, which {runner.name} "
                         "puts in as a pseudo word; use searle or pic2word")


def _train_data(encoder, splits: List[FashionIQ], cache: Path, batch_size: int, device: str) -> TrainData:
    features, captions = [], []
    for data in splits:
        features.append(embed_images(encoder, data.gallery, data, cache, batch_size, device))
        captions += [c for t in data.triplets for c in t.captions]
    if not features:
        return TrainData(torch.empty(0, encoder.embed_dim), [])
    return TrainData(torch.cat(features), captions)


def _fit(runner: CIRMethod, encoder, train: TrainData, networks: Path, progress: bool) -> None:
    if train.captions:
        runner.prepare(encoder, train)
    if not isinstance(runner, PseudoWordMethod):  # nothing to train
        return
    path = networks / f"{runner.name}-{encoder.fingerprint()[:16]}.safetensors"
    if path.is_file():
        load_network(runner, encoder, path)
        return
    if not len(train.image_features) and not train.captions:
        raise ValueError(f"{runner.name} trains a network on the training split, but the data has none "
                         "(captions/cap.*.train.json)")
    print(f"training {runner.name} for {encoder.name} on {len(train.image_features)} images and "
          f"{len(train.captions)} captions ...", flush=True)
    runner.fit(encoder, train, progress)
    save_network(runner, encoder, path)


@torch.no_grad()
def _queries(runner: CIRMethod, encoder, data: FashionIQ, gallery: torch.Tensor, convention: str):
    index = {name: i for i, name in enumerate(data.gallery)}
    queries, targets = [], []
    triplets = data.triplets
    for start in range(0, len(triplets), 64):
        chunk = triplets[start:start + 64]
        names = [t.reference for t in chunk]
        missing = [n for n in names if n not in index]
        references = gallery[[index[n] for n in names]] if not missing else \
            embed_images(encoder, names, data, None, 64, str(encoder.device))
        batch = QueryBatch(names, references, [compose(convention, t.captions) for t in chunk],
                           [t.captions for t in chunk], data.category, data.load_image)
        queries.append(runner.queries(encoder, batch).float().cpu())
        targets += [t.target for t in chunk]
    return (torch.cat(queries) if queries else torch.empty(0, gallery.shape[1])), targets


def _print_table(results: Dict, methods: List[str], categories: List[str]) -> None:
    print("\nFashionIQ validation, Recall@10 / Recall@50 per category; conventions: "
          + ", ".join(f"{m} {c}" for m, c in results["conventions"].items()))
    width = max(len(label) for label in results["encoders"]) + 2
    header = f"{'method':<12}{'encoder':<{width}}" + "".join(f"{c:>14}" for c in categories) + f"{'mean':>14}"
    print(header)
    for name in methods:
        for label, r in results["encoders"].items():
            scores = r["methods"][name]
            cells = "".join(f"{_fmt(scores[c]['R@10'])}/{_fmt(scores[c]['R@50']):<6}".rjust(14) for c in categories)
            mean = f"{_fmt(scores['mean R@10'])}/{_fmt(scores['mean R@50']):<6}".rjust(14)
            print(f"{name:<12}{label:<{width}}{cells}{mean}")
    first = next(iter(results["encoders"].values()))["methods"][methods[0]]
    print("queries scored per category: " + ", ".join(f"{c} {first[c]['queries']}" for c in categories))
    unscored = {f"{label}/{m}/{c}": v["not_scored"] for label, r in results["encoders"].items()
                for m, per in r["methods"].items() for c, v in per.items() if isinstance(v, dict) and v["not_scored"]}
    for key, items in unscored.items():
        print(f"{key}: {len(items)} queries not scored: {items[0]}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _without_ranks(results: Dict) -> Dict:
    clean = json.loads(json.dumps(results))
    for r in clean["encoders"].values():
        for per in r["methods"].values():
            for v in per.values():
                if isinstance(v, dict):
                    v.pop("ranks", None)
    return clean


task = Task("cir", cir)

__all__ = ["cir", "task"]
