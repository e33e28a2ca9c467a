"""The ``cir`` task: zero-shot composed image retrieval on FashionIQ (reference image + relative
captions -> target image), every method with a baseline encoder and E2 side by side."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from e2_core.data import open_dataset
from e2_core.data.base import image_files, read_captions
from e2_core.embedding import embed_images
from e2_core.data.fashioniq import CATEGORIES, FashionIQ, MissingSplit
from e2_core.errors import check_at_least
from e2_core.registry import Task
from e2_core.runtime import resolve_device
from e2_eval.fashioniq import CONVENTIONS, composed_recall, compose, embed_names, summarize
from e2_eval.sidebyside import SideBySide, format_table

from .figures import save_query_grid
from .methods import METHODS, CIRMethod, QueryBatch, TrainData, load_network, load_original, save_network
from .phrases import tagger

log = logging.getLogger(__name__)

#: the networks trained for the demo encoders on the default data, with the methods' default options
SHIPPED_NETWORKS = Path(__file__).parent / "networks"


def cir(dataset: str = "synthetic-fashioniq", data_root: Optional[str] = None, method: Optional[List[str]] = None,
        encoder: str = "demo:e2", baseline: str = "demo:clip-ft", convention: Optional[str] = None,
        category: Optional[List[str]] = None, captioner: str = "vocabulary", rewriter: str = "template",
        option: Optional[List[str]] = None, train_images: Optional[Path] = None,
        train_captions: Optional[Path] = None, network: Optional[List[str]] = None, networks: Optional[Path] = None, out: Path = Path("runs/cir"), batch_size: int = 64, device: str = "auto",
        figure_queries: int = 4, progress: bool = True) -> Dict:
    """Zero-shot composed image retrieval on FashionIQ (R@1/5/10/50 per category), a baseline and E2 side by side.

    Args:
        dataset: a composed-retrieval dataset: fashioniq (with data_root: the FashionIQ folder) or synthetic-fashioniq (FashionIQ-layout products, generated on first use)
        data_root: the FashionIQ folder (captions/ or json/, image_splits/, images/)
        method: methods to run (default: every installed one)
        encoder: the encoder under test: a checkpoint directory, MODEL:TAG, MODEL:FILE, a reference best.pth, or demo:e2 / demo:clip-ft
        baseline: the encoder it is compared with, in the same forms
        convention: how the two relative captions become a query (default: each method's own)
        category: categories to score (default: FashionIQ's dress, shirt and toptee)
        captioner: CIReVL's captioner: vocabulary (offline, zero-shot tags) or hf:PATH (a local Hugging Face image-to-text model)
        rewriter: CIReVL's rewriter: template (deterministic) or hf:PATH (a local Hugging Face text-generation model)
        option: METHOD.NAME=VALUE, one or more: a method's own setting, e.g. searle.oti_steps=350 (each method's settings and defaults: its docstring, or the README's table)
        train_images: a folder of unlabeled images to train the image-trained methods on (Pic2Word, SEARLE; their papers use CC3M and ImageNet), instead of the FashionIQ training split's images
        train_captions: a caption file (.txt one per line, .json, or .tsv/.csv such as CC3M's) to train the caption-trained methods on (LinCIR; SEARLE's regulariser), instead of the training split's relative captions
        network: METHOD=FILE, one or more: a trained network to use instead of training one: a .safetensors this task saved, or the authors' released checkpoint (Pic2Word, SEARLE, LinCIR) for an encoder of the same widths
        networks: folder of the methods' trained networks, one per method, encoder and training data, reused when present (default: OUT/networks)
        out: folder for results.json, the figures and cached embeddings
        batch_size: images per forward pass
        device: auto, cpu, cuda, mps
        figure_queries: queries drawn in each method's figure (0: none)
        progress: show progress bars
    """
    methods = method or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {', '.join(unknown)}; the methods are {', '.join(METHODS)}")
    if convention is not None and convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; the conventions are {', '.join(CONVENTIONS)}")
    check_at_least(1, batch_size=batch_size)
    check_at_least(0, figure_queries=figure_queries)
    categories = category or list(CATEGORIES)
    given = _given_networks(network, methods)
    settings = _settings(option, methods)
    if train_images is not None:
        image_files(train_images)  # a missing or empty folder refused before any work
    if train_captions is not None:
        read_captions(train_captions)
    dev = resolve_device(device)
    val = {c: open_dataset(dataset, data_root, "val", kind="triplets", prepare=True, category=c) for c in categories}
    train_split = [data for data in (_train_split(dataset, data_root, c) for c in CATEGORIES) if data is not None]
    _report_dropped(list(val.values()) + train_split)
    log.info("keyword phrases: %s", tagger())
    runners = {}
    for name in methods:  # options checked, and the convention, before any model loads
        runners[name] = _method(name, settings.get(name, {}), captioner=captioner, rewriter=rewriter)
        _check_convention(runners[name], convention or runners[name].convention)
    out = Path(out)
    networks = Path(networks) if networks else out / "networks"
    dropped = {f"{d.split}/{d.category}": {"triplets": d.dropped, "gallery_images": d.missing_images}
               for d in list(val.values()) + train_split if d.dropped or d.missing_images}
    header = {"dataset": dataset, "data_root": str(val[categories[0]].root), "dropped": dropped,
              "conventions": {name: convention or r.convention for name, r in runners.items()}}
    runner = SideBySide(out, {"baseline": baseline, "encoder": encoder}, dev, header)
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    relative = [caption for data in val.values() for triplet in data.triplets for caption in triplet.captions]
    for label, model in runner.encoders():
        runner.check_vocabulary(label, relative, "relative captions", " (a query's words that it cannot read change "
                                "nothing in what it retrieves)", ("catalog", "products.jsonl"))
        cache = out / "embeddings"
        train = _train_data(model, train_split, cache, batch_size, train_images, train_captions)
        # raw embeddings: the reference images go into the methods as the originals feed them; ranked normalised
        raw = {c: embed_names(model, d.gallery, d, cache, batch_size, normalize=False) for c, d in val.items()}
        galleries = {c: F.normalize(features, dim=-1) for c, features in raw.items()}

        def score(name: str) -> Dict:
            method_ = _method(name, settings.get(name, {}), captioner=captioner, rewriter=rewriter)
            _fit(method_, model, train, networks, given.get(name), progress)
            left_out = method_.notes.get("captions_left_out")
            if left_out and left_out["count"]:
                log.warning("%s for %s: %d of %d training captions left out (%s)", name, label, left_out["count"],
                            left_out["of"], left_out["why"])
            per_category = {}
            for c, data in val.items():
                queries, targets = _queries(method_, model, data, raw[c], runner.results["conventions"][name],
                                            batch_size)
                per_category[c] = composed_recall(queries, galleries[c], data.gallery, targets)
                if figure_queries and c == categories[0]:
                    figures.setdefault(name, {})[label] = (data, queries, galleries[c])
            return _without_ranks({**per_category, **summarize(per_category),
                                   **({"notes": method_.notes} if method_.notes else {})})

        for name in methods:
            runner.record(label, name, lambda: score(name))
    _print_table(runner.results, methods, categories)
    drawn = {name: str(save_query_grid(by_encoder, out / f"cir-{name}.png", figure_queries))
             for name, by_encoder in figures.items() if len(by_encoder) == len(runner.models)}
    path = runner.finish()
    return {"results": str(path), "figures": drawn,
            **{label: {m: r["methods"][m]["mean R@10"] for m in methods if m in r["methods"]}
               for label, r in runner.results["encoders"].items()}}


def _method(name: str, settings: Dict[str, object], **task_options) -> CIRMethod:
    """The method ``name`` with its own ``settings`` and the task options its constructor takes (e.g. CIReVL's
    captioner)."""
    method_class = METHODS[name]
    accepted = inspect.signature(method_class).parameters
    return method_class(**{k: v for k, v in task_options.items() if k in accepted}, **settings)


def _settings(option: Optional[List[str]], methods: List[str]) -> Dict[str, Dict[str, object]]:
    """``METHOD.NAME=VALUE`` strings as each method's settings, typed as the constructor's default."""
    settings: Dict[str, Dict[str, object]] = {}
    for spec in option or ():
        key, sep, text = spec.partition("=")
        name, dot, setting = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"option={spec!r}: write METHOD.NAME=VALUE, e.g. searle.oti_steps=350")
        if name not in methods:
            raise ValueError(f"option={spec!r}: {name} is not among the methods run ({', '.join(methods)})")
        parameters = inspect.signature(METHODS[name]).parameters
        if setting not in parameters or setting in ("captioner", "rewriter"):
            own = [p for p in parameters if p not in ("captioner", "rewriter")]
            raise ValueError(f"option={spec!r}: {name} has no setting {setting!r}; its settings are "
                             f"{', '.join(own) or 'none'}")
        default = parameters[setting].default
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value: object = text.lower() in ("true", "1")
            elif default is None:  # a setting that is off unless given: a number or a word
                value = None if text.lower() == "none" else _number_or_text(text)
            elif isinstance(default, str):
                value = text
            elif isinstance(default, tuple):  # e.g. betas=0.9,0.98
                parts = text.split(",")
                if len(parts) != len(default):
                    raise ValueError(text)
                value = tuple(type(d)(x) for d, x in zip(default, parts))
            else:
                value = type(default)(text)
        except ValueError:
            raise ValueError(f"option={spec!r}: {setting} takes a {type(default).__name__} "
                             f"(default {default!r})") from None
        settings.setdefault(name, {})[setting] = value
    return settings


def _number_or_text(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _train_split(dataset: str, data_root: Optional[str], category: str) -> Optional[FashionIQ]:
    try:
        return open_dataset(dataset, data_root, "train", kind="triplets", category=category)
    except MissingSplit:
        return None


def _report_dropped(splits: List[FashionIQ]) -> None:
    for data in splits:
        if data.dropped:
            log.warning("%s/%s: %d triplet(s) left out, their images are missing, e.g. %s (all listed in "
                        "results.json)", data.split, data.category, len(data.dropped), data.dropped[0])
        if data.missing_images:
            log.warning("%s/%s: %d gallery image(s) missing, e.g. %s", data.split, data.category,
                        len(data.missing_images), data.missing_images[0])


def _check_convention(runner: CIRMethod, convention: str) -> None:
    if runner.pseudo_word and "$" not in compose(convention, ("c1", "c2"))[0]:
        raise ValueError(f"convention {convention} gives no place for the reference image, which {runner.name} "
                         "puts in as a pseudo word; use searle or pic2word")


def _given_networks(network: Optional[List[str]], methods: List[str]) -> Dict[str, Path]:
    given = {}
    for spec in network or ():
        name, sep, file = spec.partition("=")
        if not sep or not file:
            raise ValueError(f"network={spec!r}: write METHOD=FILE, e.g. pic2word=pic2word_model.pt")
        if name not in methods:
            raise ValueError(f"network={spec!r}: {name} is not among the methods run ({', '.join(methods)})")
        if not METHODS[name].trains:
            raise ValueError(f"network={spec!r}: {name} trains no network")
        if not Path(file).is_file():
            raise FileNotFoundError(f"network={spec!r}: no such file {file}")
        given[name] = Path(file)
    return given


def _train_data(encoder, splits: List[FashionIQ], cache: Path, batch_size: int, train_images: Optional[Path],
                train_captions: Optional[Path]) -> TrainData:
    """The methods' training data: the FashionIQ training split's images and relative captions, or a folder of
    unlabeled images and a caption file in their place; raw image embeddings."""
    digest = hashlib.sha256()
    if train_images is not None:
        files = image_files(train_images)
        embedded = embed_images(encoder, files, batch_size=batch_size, cache_dir=cache, normalize=False)
        for problem in embedded.skipped:
            log.warning("training images: left out %s", problem)
        features = embedded.features
        images = {"images": str(train_images), "image_count": len(features), "images_left_out": len(embedded.skipped)}
        digest.update("\n".join(f"{p.relative_to(train_images)}|{p.stat().st_size}" for p in files).encode())
    else:
        parts = [embed_names(encoder, data.gallery, data, cache, batch_size, normalize=False) for data in splits]
        features = torch.cat(parts) if parts else torch.empty(0, encoder.embed_dim)
        images = {"images": "the training split's" if parts else None, "image_count": len(features)}
        digest.update("\n".join(name for data in splits for name in data.gallery).encode())
    if train_captions is not None:
        captions = read_captions(train_captions)
        texts = {"captions": str(train_captions)}
    else:
        captions = [c for data in splits for t in data.triplets for c in t.captions]
        texts = {"captions": "the training split's relative captions" if captions else None}
    digest.update("\n".join(captions).encode())
    source = {**images, **texts, "caption_count": len(captions), "digest": digest.hexdigest()[:16]}
    return TrainData(features, captions, source)


def _fit(runner: CIRMethod, encoder, train: TrainData, networks: Path, given: Optional[Path], progress: bool) -> None:
    """Derive what the method needs from the training data, and train its network, or load a saved or given one
    (this run's folder first, then the networks shipped for the demo encoders)."""
    name = _network_name(runner, encoder, train)
    path = given or next((p for p in (networks / name, SHIPPED_NETWORKS / name) if p.is_file()), networks / name)
    saved = runner.trains and path.is_file()
    available = {"images": len(train.image_features) > 0, "captions": bool(train.captions)}
    lacking = [need for need in runner.needs if not available.get(need, False)]
    if lacking and not saved:
        raise ValueError(f"{runner.name} needs training {' and '.join(lacking)} (the training split's "
                         "captions/cap.<category>.train.json and its images, or train_images= / train_captions=), "
                         "which it does not have")
    if runner.needs and not lacking:
        runner.prepare(encoder, train)
    if given is not None and path.suffix != ".safetensors":
        load_original(runner, encoder, path)
        runner.notes["network"] = {"file": str(path), "trained_on": "the authors' released network"}
    elif saved:
        runner.notes["network"] = {"file": str(path), "trained_on": load_network(runner, encoder, path)}
    elif runner.trains:
        log.info("training %s for %s on %d images and %d captions ...", runner.name, encoder.name,
                 len(train.image_features), len(train.captions))
        runner.fit(encoder, train, progress)
        save_network(runner, encoder, path, train.source)
        runner.notes["network"] = {"file": str(path), "trained_on": train.source, "trained_now": True}


def _network_name(runner: CIRMethod, encoder, train: TrainData) -> str:
    """One file per method, options, encoder weights and training data."""
    options = hashlib.sha256(json.dumps(runner.options, sort_keys=True).encode()).hexdigest()[:8]
    return f"{runner.name}-{encoder.fingerprint()[:16]}-{train.source.get('digest', '')[:8]}-{options}.safetensors"


@torch.no_grad()
def _queries(runner: CIRMethod, encoder, data: FashionIQ, gallery: torch.Tensor, convention: str, batch_size: int):
    index = {name: i for i, name in enumerate(data.gallery)}
    queries, targets = [], []
    triplets = data.triplets
    for start in range(0, len(triplets), batch_size):
        chunk = triplets[start:start + batch_size]
        names = [t.reference for t in chunk]
        missing = [n for n in names if n not in index]
        references = gallery[[index[n] for n in names]] if not missing else \
            embed_names(encoder, names, data, None, batch_size)
        batch = QueryBatch(names, references, [compose(convention, t.captions) for t in chunk],
                           [t.captions for t in chunk], data.category, data.load_image)
        queries.append(F.normalize(runner.queries(encoder, batch).float().cpu(), dim=-1))
        targets += [t.target for t in chunk]
    return (torch.cat(queries) if queries else torch.empty(0, gallery.shape[1])), targets


def _print_table(results: Dict, methods: List[str], categories: List[str]) -> None:
    print("\nFashionIQ validation, Recall@10 / Recall@50 per category; conventions: "
          + ", ".join(f"{m} {c}" for m, c in results["conventions"].items()))
    rows = []
    for name in methods:
        for label, r in results["encoders"].items():
            scores = r["methods"].get(name)
            if scores is None:
                rows.append([name, label] + ["failed"] * (len(categories) + 1))
                continue
            rows.append([name, label] + [f"{_fmt(scores[c]['R@10'], c, 'R@10', scores)}/"
                                         f"{_fmt(scores[c]['R@50'], c, 'R@50', scores)}" for c in categories]
                        + [f"{_fmt(scores['mean R@10'])}/{_fmt(scores['mean R@50'])}"])
    print(format_table(["method", "encoder"] + categories + ["mean"], rows, first=2))
    trivial = {c: s[c]["gallery"] for r in results["encoders"].values() for s in r["methods"].values()
               for c in categories if s[c].get("trivial")}
    if trivial:
        print("* 100 by construction: the gallery holds no more images than K ("
              + ", ".join(f"{c} {n} images" for c, n in trivial.items()) + ")")
    scored = [r["methods"][m] for r in results["encoders"].values() for m in methods if m in r["methods"]]
    if scored:
        print("queries scored per category: " + ", ".join(f"{c} {scored[0][c]['queries']}" for c in categories))
    unscored = {f"{label}/{m}/{c}": v["not_scored"] for label, r in results["encoders"].items()
                for m, per in r["methods"].items() for c, v in per.items() if isinstance(v, dict) and v.get("not_scored")}
    for key, items in unscored.items():
        print(f"{key}: {len(items)} queries not scored: {items[0]}")


def _fmt(value, category: str = "", k: str = "", scores: Optional[Dict] = None) -> str:
    """A recall as the table shows it; ``*`` where the gallery's size makes it 100 by construction."""
    flag = "*" if scores is not None and k in scores[category].get("trivial", ()) else ""
    return "-" if value is None else f"{value:.1f}{flag}"


def _without_ranks(scores: Dict) -> Dict:
    return {k: ({n: x for n, x in v.items() if n != "ranks"} if isinstance(v, dict) else v) for k, v in scores.items()}


task = Task("cir", cir, choices={"method": lambda: list(METHODS), "convention": lambda: list(CONVENTIONS)})

__all__ = ["cir", "task"]
