import h5py
import numpy as np
import pytest

import e2_core
from e2_core.data import DataError, E2Collate, FashionGen
from e2_data.synthetic import catalog, garment_mask, layout, render, write_fashiongen, \
    write_fashioniq
from conftest import TINY


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_fashiongen(root, {"train": 12, "validation": 8}, seed=0)
    return root


def test_reader_groups_views_by_product(synthetic):
    data = FashionGen(synthetic, split="train")
    with h5py.File(synthetic / "fashiongen_256_256_train.h5") as f:
        ids = f["input_productID"][:, 0]
        brands = f["input_brand"][:, 0]
    assert len(data) == len(set(ids.tolist())) == 12
    for i in range(len(data)):
        rows = data.views[i]
        assert (ids[rows] == ids[rows[0]]).all() and data.num_views(i) == len(rows)
        assert data.product(i).tags["brand"] == brands[rows[0]].decode("latin-1")
    assert sum(data.num_views(i) for i in range(len(data))) == len(ids)


def test_first_view_in_eval_random_view_in_training(synthetic):
    evaluation = FashionGen(synthetic, split="train")
    multi = next(i for i in range(len(evaluation)) if evaluation.num_views(i) > 1)
    first = np.asarray(evaluation.load_image(multi, 0))
    assert np.array_equal(np.asarray(evaluation[multi].image), first)
    training = FashionGen(synthetic, split="train", train=True, seed=3)
    views = []
    for epoch in range(8):
        training.set_epoch(epoch)
        views.append(training.view_for(multi))
        assert training.view_for(multi) == views[-1]  # the same for the same (seed, epoch, index)
    assert len(set(views)) > 1


def test_synthetic_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_fashiongen(a, {"train": 4}, seed=7)
    write_fashiongen(b, {"train": 4}, seed=7)
    with h5py.File(a / "fashiongen_256_256_train.h5") as fa, h5py.File(b / "fashiongen_256_256_train.h5") as fb:
        for key in fa:
            assert np.array_equal(fa[key][:], fb[key][:]), key
    assert not np.array_equal(np.asarray(render(catalog(7)[0], 0, 7)), np.asarray(render(catalog(8)[0], 0, 8)))


def test_splits_hold_disjoint_products(synthetic):
    train = set(FashionGen(synthetic, split="train").product_ids)
    validation = set(FashionGen(synthetic, split="validation").product_ids)
    assert train and validation and not train & validation


def test_details_decide_identity():
    """Products that share sub-category and colour are told apart by brand mark, fabric or tag."""
    products = catalog(0)[:2000]
    coarse = {}
    for p in products:
        coarse.setdefault((p.subcategory, p.colour), []).append(p)
    assert max(len(v) for v in coarse.values()) >= 20
    a, b = next(v for v in coarse.values() if len(v) > 1)[:2]
    assert a != b and (a.subcategory, a.colour) == (b.subcategory, b.colour)
    assert not np.array_equal(np.asarray(render(a, 0)), np.asarray(render(b, 0)))


@pytest.mark.parametrize("index", [0, 5, 11])
def test_garment_mask_is_everything_but_the_background(index):
    product = catalog(0)[index]
    geometry = layout(product, 1)
    image, garment = np.asarray(render(product, 1)), np.asarray(garment_mask(product, geometry)) > 0
    assert 0.1 < garment.mean() < 0.9
    details = np.zeros_like(garment)
    for x0, y0, x1, y1 in (geometry.mark_box, geometry.tag_box):     # they may overhang the garment's edge
        details[int(y0):int(y1) + 1, int(x0):int(x1) + 1] = True
    background = ~garment & ~details
    assert (image[background] == geometry.tone).all() and (image[~background] != geometry.tone).any(-1).mean() > 0.5


def test_collate_builds_e2_inputs(synthetic):
    model, _, preprocess = e2_core.create_e2_and_transforms(TINY)
    tokenizer = e2_core.get_tokenizer(model)
    data = FashionGen(synthetic, split="validation", transform=preprocess)
    batch = E2Collate(tokenizer, data.spec)([data[i] for i in range(4)])
    assert batch.images.shape == (4, 3, 64, 64)
    assert batch.text.shape[0] == 4 and batch.entity_text.index.shape == (4, 5)
    out = model(batch.images, batch.text, batch.entity_text)
    assert out["image_regional_features"].shape == (4, 5, 64)


def test_missing_field_is_named(tmp_path, synthetic):
    broken = tmp_path / "fashiongen_256_256_train.h5"
    with h5py.File(synthetic / "fashiongen_256_256_train.h5") as src, h5py.File(broken, "w") as dst:
        for key in src:
            if key != "input_season":
                src.copy(key, dst)
    with pytest.raises(DataError, match="input_season"):
        FashionGen(broken)
    with pytest.raises(DataError, match="no such FashionGen file"):
        FashionGen(tmp_path / "nope.h5")


def test_fashioniq_layout(tmp_path):
    import json
    counts = write_fashioniq(tmp_path, triplets_per_category=3, distractors=2)
    assert counts == {f"{split}/{c}": 3 for split in ("train", "val") for c in ("dress", "shirt", "toptee")}
    references = {}
    for key in counts:
        split, category = key.split("/")
        triplets = json.loads((tmp_path / "captions" / f"cap.{category}.{split}.json").read_text())
        gallery = set(json.loads((tmp_path / "image_splits" / f"split.{category}.{split}.json").read_text()))
        for t in triplets:
            assert {t["candidate"], t["target"]} <= gallery and t["candidate"] != t["target"]
            assert len(t["captions"]) == 2
        assert 6 < len(gallery) <= 12  # references, targets and distractors
        assert all((tmp_path / "images" / f"{name}.png").is_file() for name in gallery)
        references[split] = references.get(split, set()) | {t["candidate"] for t in triplets}
    assert not references["train"] & references["val"]
    references = json.loads((tmp_path / "caption_references.json").read_text())
    assert len(references) >= 18 and all(len(v) == 3 for v in references.values())


def test_truncated_or_foreign_h5_files_are_named_with_what_to_do(tmp_path, synthetic):
    whole = (synthetic / "fashiongen_256_256_validation.h5").read_bytes()
    truncated = tmp_path / "fashiongen_256_256_validation.h5"
    truncated.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError) as err:
        FashionGen(tmp_path, split="validation")
    assert str(err.value) == (f"{truncated}: truncated HDF5 file ({len(whole) // 2:,} of its {len(whole):,} bytes), "
                              "as an interrupted download or copy leaves it; fetch the file again")
    truncated.write_text("id,image\n1,a.jpg\n")
    with pytest.raises(DataError) as err:
        FashionGen(truncated)
    assert str(err.value) == (f"{truncated}: not an HDF5 file (no HDF5 signature); FashionGen is read from the "
                              "fashiongen_256_256_<split>.h5 files as distributed: fetch the file again")


def test_two_first_uses_at_once_both_finish_with_one_copy_and_no_temporary_files(tmp_path):
    """Two processes generating into one folder (two `run retrieval` on an empty cache): each writes a
    temporary file of its own and renames it; the copies are the same bytes, nothing is left behind."""
    import subprocess
    import sys

    code = ("import sys; from e2_data.synthetic import write_fashiongen; "
            "write_fashiongen(sys.argv[1], {'train': 24, 'validation': 8}, seed=0)")
    runs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fashiongen_256_256_train.h5",
                                                           "fashiongen_256_256_validation.h5", "synthetic.json"]
    assert len(FashionGen(tmp_path, split="train")) > 0


def test_a_failed_generation_leaves_no_temporary_file(tmp_path, monkeypatch):
    import e2_data.synthetic as synthetic

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic, "_write_split", full_disk)
    with pytest.raises(OSError, match="(?i)no space left"):
        synthetic.write_fashiongen(tmp_path, {"train": 4}, seed=0)
    assert list(tmp_path.iterdir()) == []
