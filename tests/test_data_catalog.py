"""Catalog: a user's own products from JSONL or CSV, fixtures written in tmp_path."""
import json

import pytest
from PIL import Image

from e2_core.data.base import DataError
from e2_core.data.catalog import Catalog
from e2_core.texts import TextSpec, build_texts


def save(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def test_jsonl_views_relative_paths_and_inferred_entities(tmp_path):
    save(tmp_path / "img" / "p1a.png", (10, 0, 0))
    save(tmp_path / "img" / "p1b.png", (20, 0, 0))
    elsewhere = save(tmp_path / "other" / "p2.png", (30, 0, 0))
    rows = [
        {"id": "p1", "image": "img/p1a.png", "text": "Black wool coat", "brand": "Acne Studios", "category": "COATS"},
        {"id": "p1", "image": "img/p1b.png"},  # a second view: tags come from the first row
        {"id": "p2", "image": str(elsewhere), "text": "Slim jeans", "brand": "Levi's", "category": "JEANS",
         "sizes": ["S", "M"]},
    ]
    path = tmp_path / "products.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n\n" + json.dumps(rows[2]) + "\n")
    data = Catalog(path)
    assert data.spec == TextSpec(entities=("brand", "category"), global_fields=("text",))
    assert len(data) == 2 and data.product_ids == ["p1", "p2"]
    assert [data.num_views(i) for i in range(2)] == [2, 1]
    assert data.views[0] == [tmp_path / "img" / "p1a.png", tmp_path / "img" / "p1b.png"]
    assert data.views[1] == [elsewhere]
    sample = data[0]
    assert sample.tags == {"text": "Black wool coat", "brand": "Acne Studios", "category": "COATS"}
    assert sample.image.getpixel((0, 0)) == (10, 0, 0) and data[1].image.getpixel((0, 0)) == (30, 0, 0)
    assert build_texts(sample.tags, data.spec) == ("Black wool coat", ["Acne Studios", "COATS"])
    training = Catalog(path, train=True, seed=2)
    seen = set()
    for epoch in range(10):
        training.set_epoch(epoch)
        seen.add(training[0].image.getpixel((0, 0)))
    assert seen == {(10, 0, 0), (20, 0, 0)}  # both views of p1 are drawn


def test_csv_columns_image_root_and_row_ids(tmp_path):
    images = tmp_path / "pictures"
    save(images / "a.png", (1, 1, 1))
    save(images / "b.png", (2, 2, 2))
    save(images / "c.png", (3, 3, 3))
    path = tmp_path / "data" / "shop.csv"
    path.parent.mkdir()
    path.write_text("\ufeffsku,image,title,brand,color\n"
                    'S1,a.png,"Coat, wool",Acne,black\n'
                    "\n"
                    "S2,b.png,Jeans,Levi's,blue\n"
                    "S1,c.png,,,\n")
    data = Catalog(path, id_column="sku", text_column="title", entities=["color", "brand"], image_root=images)
    assert data.spec.entities == ("color", "brand") and data.spec.global_fields == ("title",)
    assert data.product_ids == ["S1", "S2"] and data.num_views(0) == 2
    assert data.product(0).tags == {"title": "Coat, wool", "color": "black", "brand": "Acne"}
    assert data.load_image(0, 1).getpixel((0, 0)) == (3, 3, 3)

    # without an id column every row is a product, numbered in file order; entities from the header
    plain = tmp_path / "data" / "plain.csv"
    plain.write_text("image,brand,text,season\n../pictures/a.png,Acne,Coat,FW16\n../pictures/b.png,Levi's,Jeans,SS17\n")
    data = Catalog(plain)
    assert data.product_ids == ["1", "2"] and data.spec.entities == ("brand", "season")
    assert data[1].image.getpixel((0, 0)) == (2, 2, 2) and data[1].tags["season"] == "SS17"


def test_missing_columns_name_file_line_and_column(tmp_path):
    path = tmp_path / "shop.csv"
    path.write_text("id,image,text,brand\np1,a.png,Coat,Acne\np2,b.png,Jeans\n")  # line 3 is short
    with pytest.raises(DataError, match=r"shop\.csv:3: column 'brand' missing"):
        Catalog(path)
    path.write_text("id,image,text,brand\np1,a.png,Coat,Acne\n")
    with pytest.raises(DataError, match=r"shop\.csv:2: column 'category' missing"):
        Catalog(path, entities=["brand", "category"])
    with pytest.raises(DataError, match=r"shop\.csv:2: column 'sku' missing"):
        Catalog(path, id_column="sku")

    lines = tmp_path / "shop.jsonl"
    lines.write_text('{"id": "p1", "image": "a.png", "text": "Coat", "brand": "Acne"}\n{"id": "p2", "text": "Jeans"}\n')
    with pytest.raises(DataError, match=r"shop\.jsonl:2: column 'image' missing"):
        Catalog(lines)
    lines.write_text('{"id": "p1", "image": "a.png", "text": "Coat"}\n{"id": "p2", "image": "b.png", "text": "Je\n')
    with pytest.raises(DataError, match=r"shop\.jsonl:2:\d+: malformed JSON"):
        Catalog(lines)


def test_empty_files_and_unreadable_images(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "image,text\n"), ("none.csv", "")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: empty file"):
            Catalog(tmp_path / name)
    with pytest.raises(DataError, match="unknown catalog format"):
        (tmp_path / "x.txt").write_text("a")
        Catalog(tmp_path / "x.txt")

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = tmp_path / "shop.jsonl"
    path.write_text('{"image": "missing.png", "text": "Coat", "brand": "Acne"}\n'
                    '{"image": "broken.png", "text": "Jeans", "brand": "Levi\'s"}\n')
    data = Catalog(path)
    assert data.product_ids == ["1", "2"]
    assert data[0].error == f"{tmp_path / 'missing.png'}: no such image file"
    assert str(tmp_path / "broken.png") in data[1].error and data[1].image is None
    with pytest.raises(DataError, match="broken.png"):
        Catalog(path, strict=True)[1]


def test_a_file_that_is_not_utf8_is_named_with_the_encoding_option(tmp_path):
    save(tmp_path / "a.png", (1, 1, 1))
    path = tmp_path / "shop.csv"
    path.write_bytes("image,text,brand\na.png,Robe bleue,Hermès\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        Catalog(path)
    assert str(err.value) == (f"{path}:2: byte 0xe8 is not utf-8 text; give the file's encoding, "
                              "e.g. encoding=latin-1 or encoding=cp1252, or save "
                              "the file as UTF-8")
    assert Catalog(path, encoding="latin-1").product(0).tags["brand"] == "Hermès"
    with pytest.raises(DataError, match="unknown text encoding 'latin-9x'"):
        Catalog(path, encoding="latin-9x")


def test_an_unreadable_first_view_falls_back_to_the_next_readable_one(tmp_path):
    from e2_core.data import E2Collate
    from e2_core import get_tokenizer

    save(tmp_path / "back.png", (9, 9, 9))
    (tmp_path / "front.png").write_bytes(b"\x89PNG not really")
    path = tmp_path / "shop.jsonl"
    path.write_text('{"id": "p1", "image": "front.png", "text": "Coat", "brand": "Acne"}\n'
                    '{"id": "p1", "image": "back.png"}\n{"id": "p2", "image": "gone.png", "text": "Hat", "brand": "B"}\n')
    data = Catalog(path)
    sample = data[0]
    assert sample.error is None and sample.image.getpixel((0, 0)) == (9, 9, 9)
    assert sample.unread == [f"{tmp_path / 'front.png'}: not a readable image (unknown format or corrupt header) "
                             "(view 2 used instead)"]
    data.transform = lambda image: __import__("torch").zeros(3, 4, 4)
    batch = E2Collate(get_tokenizer("ViT-Ti-16-64"), data.spec)([data[0], data[1]])
    assert batch.indices == [0] and batch.skipped == sample.unread + [f"{tmp_path / 'gone.png'}: no such image file"]


def test_strict_in_a_dataloader_worker_raises_the_readers_message_not_a_traceback(tmp_path):
    from torch.utils.data import DataLoader

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    path = tmp_path / "shop.jsonl"
    path.write_text('{"image": "broken.png", "text": "Coat", "brand": "Acne"}\n')
    loader = DataLoader(Catalog(path, strict=True), num_workers=1, collate_fn=list)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert str(err.value) == (f"{tmp_path / 'broken.png'}: not a readable image (unknown format or corrupt header) "
                              "(strict=False skips and reports unreadable images)")


@pytest.mark.parametrize("codec, advice", [("utf-16", "UTF-16 (with a byte-order mark), not utf-8 text; read it with "
                                                      "encoding=utf-16"),
                                           ("utf-16-le", "UTF-16 little-endian (no byte-order mark), not utf-8 text; "
                                                         "read it with encoding=utf-16-le")])
def test_a_utf16_catalog_is_named_and_the_advice_reads_it(codec, advice, tmp_path):
    """A spreadsheet's "Unicode text" export: the advice was latin-1, which then failed on a mangled column name."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "shop.csv"
    path.write_bytes("image,text,brand\na.png,Robe bleue,Hermès\n".encode(codec))
    with pytest.raises(DataError) as err:
        Catalog(path)
    assert str(err.value) == f"{path}: the file is {advice}, or save it as UTF-8"
    assert Catalog(path, encoding=advice.rsplit("encoding=", 1)[1]).product(0).tags["brand"] == "Hermès"
