"""Every installed task, dataset reader and adapter, found through the registries, run on tiny data.

A plugin installed without a recipe here fails: adding one to the package means adding it here."""
import inspect
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import e2_core
from e2_core import registry
from e2_core.data import open_dataset
from e2_plugins.cli import main


def _names(group):
    return [plugin.name for plugin in registry.discover(group)]


def _amazon(root: Path) -> str:
    meta, ids = {}, [f"B00{i}" for i in range(6)]
    for i, asin in enumerate(ids):
        (root / "Fashion" / asin).mkdir(parents=True)
        Image.new("RGB", (40, 50), (40 * i, 90, 120)).save(root / "Fashion" / asin / "0.jpg")
        meta[asin] = {"images": ["0.jpg"], "title": f"Cotton shirt {i}", "brand": ["Acme", ""][i % 2]}
    (root / "meta-fashion.json").write_text(json.dumps(meta))
    (root / "split.json").write_text(json.dumps({"train": ids[:4], "test": ids[4:]}))
    return str(root)


def _catalog(root: Path) -> str:
    root.mkdir(parents=True)
    for split, count in (("train", 4), ("validation", 2)):
        rows = []
        for i in range(count):
            Image.new("RGB", (50, 40), (60 * i, 20, 200)).save(root / f"{split}{i}.png")
            rows.append(json.dumps({"image": f"{split}{i}.png", "text": f"a {split} coat {i}", "brand": "Acme",
                                    "season": "FW2016"}))
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return str(root)


#: dataset name -> a function writing tiny data of that reader's layout (given tmp_path and the synthetic root)
DATASET_RECIPES = {
    "synthetic": lambda tmp, synthetic: synthetic,
    "fashiongen": lambda tmp, synthetic: synthetic,
    "amazon-fashion": lambda tmp, synthetic: _amazon(tmp / "amazon"),
    "catalog": lambda tmp, synthetic: _catalog(tmp / "catalog"),
    "fashioniq": lambda tmp, synthetic: _fashioniq(tmp),
    "synthetic-fashioniq": lambda tmp, synthetic: _fashioniq(tmp),
}


@pytest.mark.parametrize("name", _names(registry.DATASET_GROUP))
def test_every_installed_dataset_reader_reads_its_layout(name, tmp_path, data_root):
    assert name in DATASET_RECIPES, f"dataset reader {name!r} is installed but has no recipe in this test"
    root = DATASET_RECIPES[name](tmp_path, data_root)
    if registry.get_dataset(name).kind == "triplets":  # composed retrieval: one category and split
        for split in ("train", "val"):
            data = open_dataset(name, root, split, kind="triplets", category="dress")
            assert data.triplets and data.gallery and data.load_image(data.triplets[0].reference).size[0] > 0
        return
    for split in ("train", "validation"):
        data = open_dataset(name, root, split, train=split == "train")
        sample = data[0]
        assert len(data) > 0 and sample.error is None and sample.image.size[0] > 0
        global_text, entities = e2_core.build_texts(sample.tags, data.spec)
        assert global_text and len(entities) == len(data.spec.entities)


def test_opening_a_dataset_has_no_side_effects(tmp_path):
    with pytest.raises(e2_core.data.DataError, match="no synthetic data; generate it with `e2-plugins data synthetic"):
        open_dataset("synthetic", str(tmp_path / "nothing"), "validation")
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(KeyError, match="unknown dataset 'imagenet'; installed product datasets: amazon-fashion, catalog"):
        open_dataset("imagenet", None, "train")


#: task name -> its command-line options on tiny data
TASK_RECIPES = {
    "retrieval": lambda tmp, data, enc: ["--data-root", data, "--encoder", enc["e2"], "--baseline", enc["clip"],
                                         "--protocol", "full", "--out", str(tmp / "out")],
    "embed": lambda tmp, data, enc: ["--texts", _texts(tmp), "--encoder", enc["clip"], "--out", str(tmp / "e.st")],
    "caption": lambda tmp, data, enc: ["--data-root", data, "--encoder", enc["e2"], "--baseline", enc["clip"],
                                       "--method", "decap", "--epochs", "1", "--max-images", "4", "--page-images", "1",
                                       "--out", str(tmp / "out"), "--no-progress"],  # both methods: test_caption.py
    "cir": lambda tmp, data, enc: ["--data-root", _fashioniq(tmp), "--encoder", enc["e2"], "--baseline", enc["clip"],
                                   "--category", "toptee", "--method", "image", "pic2word", "cirevl", "--out",
                                   str(tmp / "out"), "--no-progress"],  # every method: tests/test_cir.py
    "index": lambda tmp, data, enc: ["--embeddings", _embeddings(tmp), "--no-progress"],  # tests/test_index.py
}


def _embeddings(tmp: Path) -> str:
    from other_data import write_embeddings

    vectors = torch.nn.functional.normalize(torch.randn(300, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    return str(write_embeddings(tmp / "emb", vectors, shard_size=128))


def _fashioniq(tmp: Path) -> str:
    from e2_data.synthetic import write_fashioniq

    write_fashioniq(tmp / "fiq", triplets_per_category=2, distractors=1)
    return str(tmp / "fiq")


def _texts(tmp: Path) -> str:
    (tmp / "texts.txt").write_text("a red coat\nblue jeans\n")
    return str(tmp / "texts.txt")


@pytest.mark.parametrize("name", _names(registry.TASK_GROUP))
def test_every_installed_task_runs_on_tiny_data(name, tmp_path, data_root, tiny_checkpoints, capsys):
    assert name in TASK_RECIPES, f"task {name!r} is installed but has no recipe in this test"
    args = TASK_RECIPES[name](tmp_path, data_root, tiny_checkpoints)
    if "device" in inspect.signature(registry.get(registry.TASK_GROUP, name).run).parameters:
        args += ["--device", "cpu"]
    assert main(["run", name, *args]) == 0, capsys.readouterr().err


def _adapted_image_embeds(adapter, checkpoints, call):
    """The adapter's image embedding of a probe batch equals the encoder's own (fp32, 1e-5)."""
    encoder = e2_core.load_encoder(checkpoints["e2"]).eval()
    adapted = adapter.adapt(encoder)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = call(adapted, pixels)
        assert (got - encoder.encode_image(pixels)).abs().max() < 1e-5


def _transformers_image_features(model, pixels):
    out = model.get_image_features(pixel_values=pixels)
    return getattr(out, "pooler_output", out)  # transformers 5: an output object; 4.x: the tensor


#: adapter name -> a check that it swaps a tiny E2 in
ADAPTER_RECIPES = {
    "open_clip": lambda adapter, ckpt: _adapted_image_embeds(adapter, ckpt, lambda m, x: m.encode_image(x)),
    "transformers": lambda adapter, ckpt: _adapted_image_embeds(adapter, ckpt, _transformers_image_features),
    "diffusers": lambda adapter, ckpt: _adapted_image_embeds(adapter, ckpt, lambda m, x: m(x).image_embeds),
}


@pytest.mark.parametrize("name", _names(registry.ADAPTER_GROUP))
def test_every_installed_adapter_loads_and_adapts(name, tiny_checkpoints):
    assert name in ADAPTER_RECIPES, f"adapter {name!r} is installed but has no recipe in this test"
    ADAPTER_RECIPES[name](registry.get(registry.ADAPTER_GROUP, name), tiny_checkpoints)


def test_two_first_uses_of_the_synthetic_fashioniq_data_both_find_all_of_it(tmp_path):
    """Written aside and renamed into place whole: two processes preparing it at once both end with the data,
    one copy, no temporary folder left."""
    import subprocess
    import sys

    code = ("import sys; from e2_core.data import open_dataset; "
            "print(len(open_dataset('synthetic-fashioniq', sys.argv[1], 'val', kind='triplets', prepare=True, "
            "category='dress').triplets))")
    runs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "fiq")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-500:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["100", "100"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fiq"]
