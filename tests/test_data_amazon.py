"""AmazonFashion reader and builder on small fixtures written in the real formats (no network)."""
import gzip
import io
import json
import os
import threading
import urllib.error
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from e2_core.data.amazon import AmazonFashion
from e2_data.amazon import build_amazon_fashion
from e2_core.data.base import DataError
import e2_data.amazon as amazon


def image_bytes(color, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, fmt)
    return buf.getvalue()


def color(product, view):
    return (product * 40, view * 60, 7)


# ---------------------------------------------------------------- reader, reference layout

# asin -> (brand, title, views); the 4th product's image is corrupt
REFERENCE = {
    "B000000001": ("Levi's", "501 Original Fit Jeans", 3),
    "B000000002": ("", "Silk scarf", 1),
    "B000000003": ("Acne Studios", "Wool coat", 2),
    "B000000004": ("Nike", "Running shoe", 1),
    "B000000005": ("Prada", "Leather bag", 4),
}
CORRUPT = "B000000004"


def write_reference(root, flat=False):
    images = root if flat else root / "Fashion"
    meta = {}
    for p, (asin, (brand, title, views)) in enumerate(REFERENCE.items()):
        names = [f"{asin}_{v}.png" for v in range(views)]
        (images / asin).mkdir(parents=True)
        for v, name in enumerate(names):
            if asin == CORRUPT:
                (images / asin / name).write_bytes(image_bytes(color(p, v))[:20])  # truncated PNG
            else:
                Image.new("RGB", (4, 4), color(p, v)).save(images / asin / name)
        meta[asin] = {"images": names, "title": title, "brand": brand, "price": "$10"}
    (root / "meta-fashion.json").write_text(json.dumps(meta, indent=1))
    asins = list(REFERENCE)
    (root / "split.json").write_text(json.dumps({"train": asins[:4], "test": asins[4:]}))
    return root


@pytest.mark.parametrize("flat", [False, True])
def test_reader_tags_views_and_first_view_in_eval(tmp_path, flat):
    root = write_reference(tmp_path, flat)
    train, test = AmazonFashion(root, split="train"), AmazonFashion(root, split="test")
    assert (len(train), len(test)) == (4, 1)
    assert train.image_root == (root if flat else root / "Fashion")
    assert train.product_ids == list(REFERENCE)[:4] and test.product_ids == ["B000000005"]
    assert train.product(0).tags == {"brand": "Levi's", "title": "501 Original Fit Jeans"}
    assert train.product(1).tags["brand"] == "Unknown"  # unknown brands form one class of their own
    assert [train.num_views(i) for i in range(4)] == [3, 1, 2, 1] and test.num_views(0) == 4
    sample = train[2]
    assert sample.error is None and sample.product_id == "B000000003"
    assert sample.image.getpixel((0, 0)) == color(2, 0)  # evaluation: always the first view
    assert test[0].image.getpixel((1, 1)) == color(4, 0)
    assert train.groups("brand") == ["Levi's", "Unknown", "Acne Studios", "Nike"]


def test_reader_training_views_depend_on_seed_epoch_index(tmp_path):
    root = write_reference(tmp_path)
    a = AmazonFashion(root, split="test", train=True, seed=3)
    b = AmazonFashion(root, split="test", train=True, seed=3)
    views = []
    for epoch in range(12):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        sample = a[0]
        view = a.view_for(0)
        assert view == b.view_for(0)
        assert sample.image.getpixel((0, 0)) == color(4, view)  # the drawn view is the one loaded
        views.append(view)
    assert len(set(views)) > 1  # different epochs, different views
    other = AmazonFashion(root, split="test", train=True, seed=4)
    other_views = []
    for epoch in range(12):
        other.set_epoch(epoch)
        other_views.append(other.view_for(0))
    assert other_views != views


def test_reader_corrupt_and_missing_images(tmp_path):
    root = write_reference(tmp_path)
    data = AmazonFashion(root, split="train")
    bad = data.product_ids.index(CORRUPT)
    path = str(root / "Fashion" / CORRUPT / f"{CORRUPT}_0.png")
    sample = data[bad]
    assert sample.image is None and path in sample.error
    with pytest.raises(DataError, match="strict=False skips") as info:
        AmazonFashion(root, split="train", strict=True)[bad]
    assert path in str(info.value)
    os.remove(root / "Fashion" / "B000000001" / "B000000001_0.png")
    missing = data[0]  # its second view stands in, counted
    assert missing.error is None and missing.image is not None and len(missing.unread) == 1
    assert missing.unread[0].endswith("B000000001_0.png: no such image file (view 2 used instead)")


def test_reader_errors_name_file_line_and_asin(tmp_path):
    root = write_reference(tmp_path)
    good_meta = (root / "meta-fashion.json").read_text()
    lines = good_meta.splitlines()
    lines[2] = lines[2].replace('"', "", 1)  # break line 3
    (root / "meta-fashion.json").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"meta-fashion\.json:3:\d+: malformed JSON"):
        AmazonFashion(root)

    (root / "meta-fashion.json").write_text(good_meta)
    with pytest.raises(ValueError, match=r"\['test', 'train'\].*'validation'"):
        AmazonFashion(root, split="validation")

    (root / "split.json").write_text(json.dumps({"train": ["B000000001", "B0NOTTHERE"], "test": []}))
    with pytest.raises(DataError, match=r"split\.json: ASIN 'B0NOTTHERE'.*meta-fashion\.json"):
        AmazonFashion(root)

    meta = json.loads(good_meta)
    meta["B000000001"]["images"] = []
    (root / "meta-fashion.json").write_text(json.dumps(meta))
    (root / "split.json").write_text(json.dumps({"train": ["B000000001"], "test": []}))
    with pytest.raises(DataError, match="ASIN 'B000000001' has no images"):
        AmazonFashion(root)


# ---------------------------------------------------------------- builder, metadata dumps

URL = "https://m.media-amazon.com/images/I/"
A, B, BEAUTY, NO_TITLE, C, D, E, F = ("B0AAAAAAA1", "B0AAAAAAA2", "B0AAAAAAA3", "B0AAAAAAA4",
                                      "B0CCCCCCC1", "B0CCCCCCC2", "B0CCCCCCC3", "B0CCCCCCC4")
URLS = {"A0": URL + "A0._SL1500_.jpg", "A1": URL + "A1.png", "Asmall": URL + "A0._SS40_.jpg",
        "B": URL + "B.jpg?x=1", "C0": URL + "C0_hi.jpg", "C1large": URL + "C1_large.jpg",
        "C1thumb": URL + "C1_thumb.jpg", "D": URL + "D.gif"}


def dump_2018():
    records = [
        {"asin": A, "title": "Levi&#39;s  501 jeans ", "brand": "Levi's", "main_cat":
         '<img src="https://images-na.ssl-images-amazon.com/x.png" class="nav-categ-image" alt="AMAZON FASHION"/>',
         "category": ["Clothing, Shoes & Jewelry", "Men", "Jeans"], "imageURLHighRes": [URLS["A0"], URLS["A1"]],
         "imageURL": [URLS["Asmall"]]},
        {"asin": B, "title": "Cotton dress", "brand": "", "main_cat": "AMAZON FASHION", "category": [],
         "imageURLHighRes": [], "imageURL": [URLS["B"]]},
        {"asin": BEAUTY, "title": "Lipstick", "brand": "X", "main_cat": "All Beauty", "category": ["Beauty"],
         "imageURLHighRes": [URL + "L.jpg"]},
        {"asin": NO_TITLE, "title": "  ", "brand": "Y", "main_cat": "", "category": ["Clothing, Shoes & Jewelry"],
         "imageURL": [URL + "N.jpg"]},
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(4, "{'asin': 'B0AAAAAAA5', 'title': 'a Python dict line'}")  # line 5: malformed
    lines.append(json.dumps(dict(records[0], title="duplicate")))  # line 6
    return "\n".join(lines) + "\n"


def dump_2023():
    def image(large, hi_res, variant="MAIN"):
        return {"thumb": large.replace("large", "thumb"), "large": large, "variant": variant, "hi_res": hi_res}

    records = [
        {"parent_asin": C, "title": "Running shoe", "main_category": "AMAZON FASHION", "categories": [],
         "store": "Nike Store", "details": {"Brand": "Nike", "Color": "Red"},
         "images": [image(URL + "C0_large.jpg", URLS["C0"]), image(URLS["C1large"], None, "PT01")]},
        {"parent_asin": D, "title": "Scarf", "main_category": "Handmade", "store": "Shop D", "details": {},
         "categories": ["Clothing, Shoes & Jewelry", "Women"], "images": [image(URL + "D_large.jpg", URLS["D"])]},
        {"parent_asin": E, "title": "Shampoo", "main_category": "All Beauty", "categories": ["Beauty"],
         "store": "S", "details": {}, "images": [image(URL + "E_large.jpg", None)]},
        {"parent_asin": F, "title": "Hat", "main_category": "AMAZON FASHION", "categories": [], "store": "",
         "details": {}, "images": []},
    ]
    return "".join(json.dumps(r) + "\n" for r in records)


def write_dumps(folder, gz_name="meta_AMAZON_FASHION.jsonl.gz"):
    folder.mkdir(parents=True, exist_ok=True)
    path_2018, path_2023 = folder / gz_name, folder / "meta_Amazon_Fashion.jsonl"
    with gzip.open(path_2018, "wt", encoding="utf-8") as f:
        f.write(dump_2018())
    path_2023.write_text(dump_2023())
    return [path_2018, path_2023]


def expected_split(asins, seed, fraction):
    asins = sorted(asins)
    order = np.random.default_rng(seed).permutation(len(asins))
    n = int(round(len(asins) * fraction))
    return {"train": sorted(asins[i] for i in order[n:]), "test": sorted(asins[i] for i in order[:n])}


def test_build_from_local_images(tmp_path):
    dumps = write_dumps(tmp_path / "dumps")
    local = tmp_path / "local"
    for asin, names in {A: ["b.JPG", "a.png", "notes.txt"], B: ["x.png"], C: ["c.jpeg"], BEAUTY: ["l.png"]}.items():
        (local / asin).mkdir(parents=True)
        for k, name in enumerate(names):
            (local / asin / name).write_bytes(image_bytes((k * 50, 9, 9), "JPEG" if name.lower().endswith(
                ("jpg", "jpeg")) else "PNG") if not name.endswith("txt") else b"notes")
    out = tmp_path / "amazon"
    report = build_amazon_fashion(dumps, out, images_dir=local, test_fraction=0.34, seed=5)

    assert report["records"] == 10 and report["kept"] == 3
    assert report["skipped"] == {"malformed": 1, "wrong_category": 2, "no_title": 1, "duplicate": 1,
                                 "no_images": 2, "download_failed": 0}  # D and F have no local images
    assert report["records"] - report["kept"] == sum(report["skipped"].values())
    assert report["malformed_examples"] == [f"{dumps[0]}:5"]
    assert report["layouts"] == {"2018": 5, "2023": 4}
    assert report["images"]["linked"] + report["images"]["copied"] == 4 and report["images"]["downloaded"] == 0
    assert json.loads((out / "build-report.json").read_text()) == report

    meta = json.loads((out / "meta-fashion.json").read_text())
    assert meta == {A: {"images": ["a.png", "b.JPG"], "title": "Levi's 501 jeans", "brand": "Levi's"},
                    B: {"images": ["x.png"], "title": "Cotton dress", "brand": "Unknown"},
                    C: {"images": ["c.jpeg"], "title": "Running shoe", "brand": "Nike"}}
    assert (out / "Fashion" / A / "a.png").read_bytes() == (local / A / "a.png").read_bytes()
    assert not (out / "Fashion" / A / "notes.txt").exists() and not (out / "Fashion" / BEAUTY).exists()
    split = json.loads((out / "split.json").read_text())
    assert split == expected_split([A, B, C], seed=5, fraction=0.34) and len(split["test"]) == 1

    # the built folder is an AmazonFashion dataset
    data = {name: AmazonFashion(out, split=name) for name in ("train", "test")}
    assert sorted(data["train"].product_ids + data["test"].product_ids) == [A, B, C]
    for ds in data.values():
        for i in range(len(ds)):
            sample = ds[i]
            assert sample.error is None and sample.tags == {k: meta[sample.product_id][k] for k in ("brand", "title")}

    # rebuilding is idempotent: same files reused, same split
    again = build_amazon_fashion(dumps, out, images_dir=local, test_fraction=0.34, seed=5)
    assert again["images"]["reused"] == 4 and json.loads((out / "split.json").read_text()) == split
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]


class FakeFetch:
    """Serves the fixture URLs without a network: flaky, dead, 404, garbage and good ones."""

    def __init__(self):
        self.calls, self.lock = Counter(), threading.Lock()

    def __call__(self, url, timeout):
        assert timeout == 7.5
        with self.lock:
            self.calls[url] += 1
            n = self.calls[url]
        if url == URLS["A1"] and n <= 2:
            raise urllib.error.URLError("connection reset")  # flaky: fails twice, then works
        if url == URLS["B"]:
            raise TimeoutError("timed out")  # always fails
        if url == URLS["D"]:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)  # permanent: no retry
        if url == URLS["C1large"]:
            return b"<html>captcha</html>"  # not an image
        return image_bytes({URLS["A0"]: (1, 2, 3), URLS["A1"]: (4, 5, 6), URLS["C0"]: (7, 8, 9)}[url], "JPEG")


def test_build_with_downloads_retries_and_resume(tmp_path, monkeypatch):
    dumps = write_dumps(tmp_path / "dumps", gz_name="meta_2018.json")  # gzipped, without a .gz suffix
    out = tmp_path / "amazon"
    (out / "Fashion" / A).mkdir(parents=True)
    (out / "Fashion" / A / f"{A}_0.jpg").write_bytes(image_bytes((1, 2, 3), "JPEG"))  # complete: reused
    (out / "Fashion" / A / f"{A}_1.png.part").write_bytes(image_bytes((4, 5, 6))[:30])  # interrupted earlier run
    sleeps = []
    monkeypatch.setattr(amazon.time, "sleep", sleeps.append)
    fetch = FakeFetch()
    report = build_amazon_fashion(dumps, out, download=True, fetch=fetch, timeout=7.5, retries=3, backoff=0.5,
                                  workers=4, test_fraction=0.5, seed=1)

    assert dict(fetch.calls) == {URLS["A1"]: 3, URLS["B"]: 3, URLS["D"]: 1, URLS["C0"]: 1, URLS["C1large"]: 3}
    assert sorted(sleeps) == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0]  # exponential backoff before retries 1 and 2
    assert report["images"] == {"downloaded": 2, "reused": 1, "failed": 3, "linked": 0, "copied": 0, "unreadable": 0}
    assert report["kept"] == 2
    assert report["skipped"] == {"malformed": 1, "wrong_category": 2, "no_title": 1, "duplicate": 1,
                                 "no_images": 1, "download_failed": 2}  # F has no URL; every image of B, D failed
    assert any(e.startswith(URLS["D"]) and "404" in e for e in report["failed_examples"])
    assert not list(out.rglob("*.part")) and not (out / "Fashion" / B).exists()

    meta = json.loads((out / "meta-fashion.json").read_text())
    assert meta[A]["images"] == [f"{A}_0.jpg", f"{A}_1.png"] and meta[C]["images"] == [f"{C}_0.jpg"]
    assert set(meta) == {A, C} and meta[C]["brand"] == "Nike"
    assert json.loads((out / "split.json").read_text()) == expected_split([A, C], seed=1, fraction=0.5)
    data = AmazonFashion(out, split="train")
    data_test = AmazonFashion(out, split="test")
    both = {ds.product_ids[0]: (ds, 0) for ds in (data, data_test)}
    ds, i = both[A]
    assert np.abs(np.asarray(ds.load_image(i, 1), dtype=int) - (4, 5, 6)).max() <= 3  # the retried download

    # resume: everything that was downloaded is reused, nothing is fetched again
    dead = FakeFetch()
    again = build_amazon_fashion(dumps, out, download=True, fetch=dead, timeout=7.5, retries=1,
                                 test_fraction=0.5, seed=1)
    assert again["images"]["reused"] == 3 and again["images"]["downloaded"] == 0
    assert URLS["A0"] not in dead.calls and URLS["A1"] not in dead.calls and URLS["C0"] not in dead.calls
    assert json.loads((out / "meta-fashion.json").read_text()) == meta


def test_build_argument_and_input_errors(tmp_path):
    dumps = write_dumps(tmp_path / "dumps")
    with pytest.raises(ValueError, match=r"images_dir=.*download=True"):
        build_amazon_fashion(dumps, tmp_path / "out")
    with pytest.raises(ValueError, match="test_fraction"):
        build_amazon_fashion(dumps, tmp_path / "out", download=True, test_fraction=1.0)

    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(dumps[0].read_bytes()[:-12])
    with pytest.raises(DataError, match="truncated.jsonl.gz: unreadable"):
        build_amazon_fashion([truncated], tmp_path / "out", download=True, fetch=FakeFetch())

    # a JSON array of records is read too; no usable product -> DataError, the report is still written
    array = tmp_path / "array.json"
    array.write_text(json.dumps([json.loads(line) for line in dump_2023().splitlines()], indent=2))
    with pytest.raises(DataError, match="no products kept"):
        build_amazon_fashion(array, tmp_path / "out", images_dir=tmp_path / "nothing")
    report = json.loads((tmp_path / "out" / "build-report.json").read_text())
    assert report["records"] == 4 and report["skipped"]["no_images"] == 3 and report["kept"] == 0


def test_a_metadata_file_that_is_not_utf8_is_named_with_the_encoding_option(tmp_path):
    root = write_reference(tmp_path)
    meta = root / "meta-fashion.json"
    meta.write_bytes(meta.read_text().replace("Levi", "Lévi", 1).encode("latin-1"))
    with pytest.raises(DataError, match=r"meta-fashion\.json:\d+: byte 0xe9 is not utf-8 text; give the file's "
                                        r"encoding, e\.g\. encoding=latin-1"):
        AmazonFashion(root, split="train")
    assert AmazonFashion(root, split="train", encoding="latin-1").product(0).tags["brand"] == "Lévi's"


def test_the_builder_checks_the_local_images_it_links(tmp_path):
    dumps = write_dumps(tmp_path / "dumps")
    local = tmp_path / "local"
    for asin, names in {A: ["a.png", "b.png"], B: ["x.png"], C: ["c.png"]}.items():
        (local / asin).mkdir(parents=True)
        for name in names:
            (local / asin / name).write_bytes(image_bytes((9, 9, 9), "PNG"))
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noise, "PNG")
    (local / A / "b.png").write_bytes(noise.getvalue()[:len(noise.getvalue()) // 2])  # cut off mid-transfer
    (local / B / "x.png").write_bytes(b"not an image")
    report = build_amazon_fashion(dumps, tmp_path / "out", images_dir=local, test_fraction=0.34, seed=5)
    assert report["images"]["unreadable"] == 2 and report["kept"] == 2 and report["skipped"]["no_images"] == 3
    truncated, foreign = sorted(report["unreadable_examples"])
    assert truncated.startswith(f"{local / A / 'b.png'}: unreadable image (")
    assert foreign == f"{local / B / 'x.png'}: not a readable image (unknown format or corrupt header)"
    meta = json.loads((tmp_path / "out" / "meta-fashion.json").read_text())
    assert meta[A]["images"] == ["a.png"] and B not in meta
