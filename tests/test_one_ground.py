"""The ground every task stands on: one embedding door (the same embeddings whichever task asks, one image
reader, one cache), one side-by-side runner (a failing method costs nothing else), and the registries a
third-party package extends with one file and one line each."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import e2_core
from e2_core.embedding import embed_images, embed_texts
from e2_core.errors import MethodsFailed
from e2_eval.sidebyside import SideBySide, format_table
from e2_plugins.cli import main

from other_data import write_catalog

BATCH = 8


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """Products of the second writer: a catalog, and the same validation images as a FashionIQ gallery."""
    root = write_catalog(tmp_path_factory.mktemp("other") / "catalog", train=24, validation=20)
    rows = [json.loads(line) for line in (root / "validation.jsonl").read_text(encoding="utf-8").splitlines()]
    fiq = root.parent / "fiq"
    for folder in ("images", "captions", "image_splits"):
        (fiq / folder).mkdir(parents=True)
    names = [Path(row["image"]).stem for row in rows]
    for row, name in zip(rows, names):
        shutil.copy(root / row["image"], fiq / "images" / f"{name}.png")
    (fiq / "image_splits" / "split.dress.val.json").write_text(json.dumps(names))
    triplets = [{"candidate": names[i], "target": names[i + 1], "captions": ["is red, white", "has a logo"]}
                for i in range(0, len(names) - 1, 2)]
    (fiq / "captions" / "cap.dress.val.json").write_text(json.dumps(triplets))
    return root, fiq, [root / row["image"] for row in rows]


def test_every_task_embeds_the_same_images_bit_identically(products, tiny_checkpoints, tmp_path, monkeypatch):
    """Retrieval, the FashionIQ gallery, captioning and embed, each run as a task, give the same bits."""
    import e2_caption
    import e2_cir
    import e2_retrieval
    from e2_caption.captioner import Captioner
    from e2_embed import embed

    catalog, fiq, paths = products
    seen = {}
    evaluate, recall, caption_features = (e2_retrieval.evaluate_retrieval, e2_cir.composed_recall,
                                          Captioner.caption_features)

    def keep(name, features):
        seen.setdefault(name, []).append(features.clone())

    monkeypatch.setattr(e2_retrieval, "evaluate_retrieval", lambda images, *a, **k: keep("retrieval", images)
                        or evaluate(images, *a, **k))
    monkeypatch.setattr(e2_cir, "composed_recall", lambda queries, gallery, *a, **k: keep("cir", gallery)
                        or recall(queries, gallery, *a, **k))
    monkeypatch.setattr(Captioner, "caption_features", lambda self, features: keep("caption", features)
                        or caption_features(self, features))
    e2, clip = tiny_checkpoints["e2"], tiny_checkpoints["clip"]
    common = dict(encoder=e2, baseline=clip, batch_size=BATCH, device="cpu")
    e2_retrieval.retrieval(dataset="catalog", data_root=str(catalog), protocol="full", out=tmp_path / "r", **common)
    e2_cir.cir(dataset="fashioniq", data_root=str(fiq), method=["image"], category=["dress"], out=tmp_path / "c",
               figure_queries=0, progress=False, **common)
    e2_caption.caption(dataset="catalog", data_root=str(catalog), method=["decap"], epochs=1, max_images=0,
                       page_images=0, out=tmp_path / "p", progress=False, **common)
    embed(images=catalog / "validation.jsonl", encoder=e2, out=tmp_path / "e.safetensors", batch_size=BATCH,
          device="cpu", workers=0, progress=False)
    embedded = load_file(tmp_path / "e.safetensors")["image_features"]
    encoder = e2_core.load_encoder(e2)
    direct = embed_images(encoder, paths, batch_size=BATCH).features
    # each task ran the baseline first, then E2 (captioning hands them to its decoder a batch at a time)
    for name in ("retrieval", "cir", "caption"):
        baseline, ours = torch.cat(seen[name]).split(len(paths))
        assert torch.equal(ours, embedded), name
        assert not torch.equal(baseline, embedded), name  # the baseline's are its own
    assert torch.equal(direct, embedded) and embedded.shape == (20, encoder.embed_dim)


def test_an_image_over_the_pixel_limit_is_skipped_and_listed_by_every_reader(products, tiny_checkpoints, tmp_path,
                                                                             monkeypatch, capsys):
    _, _, paths = products
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300), (10, 20, 30)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 400 x 300 is over twice the limit: refused by PIL
    encoder = e2_core.load_encoder(tiny_checkpoints["clip"])
    out = embed_images(encoder, [paths[0], big, paths[1]], batch_size=BATCH)
    assert out.indices == [0, 2] and len(out.skipped) == 1 and str(big) in out.skipped[0]
    assert "decompression bomb" in out.skipped[0].lower()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[0]}\n{big}\n")
    args = ["run", "embed", "--images", str(listing), "--encoder", tiny_checkpoints["clip"], "--device", "cpu",
            "--workers", "0", "--out", str(tmp_path / "e.safetensors"), "--no-progress"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["unreadable_images"][0].startswith(str(big))
    assert main(args + ["--strict", "--out", str(tmp_path / "strict.safetensors")]) == 2
    assert capsys.readouterr().err.startswith(f"e2-plugins: error: {big}: unreadable image")
    assert not (tmp_path / "strict.safetensors").exists()


@pytest.mark.parametrize("damage", [b"", b"not safetensors", "truncate"])
def test_a_damaged_cache_entry_is_named_and_computed_again(damage, products, tiny_checkpoints, tmp_path, caplog):
    _, _, paths = products
    encoder = e2_core.load_encoder(tiny_checkpoints["e2"])
    first = embed_images(encoder, paths[:5], batch_size=BATCH, cache_dir=tmp_path)
    texts = embed_texts(encoder, ["a red, white wrap dress", "Kestrel & Co"], cache_dir=tmp_path)
    for entry in tmp_path.glob("*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:50] if damage == "truncate" else damage)
    again = embed_images(encoder, paths[:5], batch_size=BATCH, cache_dir=tmp_path)
    assert torch.equal(again.features, first.features) and again.indices == first.indices
    assert torch.equal(embed_texts(encoder, ["a red, white wrap dress", "Kestrel & Co"], cache_dir=tmp_path), texts)
    assert caplog.text.count("damaged embedding cache entry") == 2
    caplog.clear()
    embed_images(encoder, paths[:5], batch_size=BATCH, cache_dir=tmp_path)  # rewritten: read back silently
    assert "damaged" not in caplog.text and not list(tmp_path.glob("*.tmp"))


def test_a_failing_method_is_one_line_and_every_other_result_is_written(tiny_checkpoints, tmp_path):
    runner = SideBySide(tmp_path, {"baseline": tiny_checkpoints["clip"], "encoder": tiny_checkpoints["e2"]}, "cpu")
    labels = [label for label, _ in runner.encoders()]
    runner.record(labels[0], "works", lambda: {"score": 1.0})
    written = json.loads((tmp_path / "results.json").read_text())  # written as soon as it exists
    assert written["encoders"][labels[0]]["methods"]["works"] == {"score": 1.0}

    def broken():
        raise ZeroDivisionError("division by zero\nsecond line")

    assert runner.record(labels[1], "broken", broken) is None
    runner.record(labels[1], "works", lambda: {"score": 2.0})
    with pytest.raises(MethodsFailed) as failure:
        runner.finish()
    assert str(failure.value) == (f"1 run(s) failed ({labels[1]}/broken: ZeroDivisionError: division by zero); "
                                  f"every other result is in {tmp_path / 'results.json'}")
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["failed"] == {f"{labels[1]}/broken": "ZeroDivisionError: division by zero"}
    assert written["encoders"][labels[1]]["methods"] == {"works": {"score": 2.0}}


def test_a_bad_encoder_is_refused_before_anything_is_written(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="encoder 'nope:xx' is none of"):
        SideBySide(tmp_path / "out", {"baseline": tiny_checkpoints["clip"], "encoder": "nope:xx"}, "cpu")
    assert not (tmp_path / "out").exists()


def test_cir_goes_on_past_a_method_that_fails(products, tiny_checkpoints, tmp_path, capsys):
    _, fiq, _ = products  # no training split: lincir cannot train, the image baseline needs nothing
    out = tmp_path / "out"
    args = ["run", "cir", "--dataset", "fashioniq", "--data-root", str(fiq), "--category", "dress", "--encoder",
            tiny_checkpoints["e2"], "--baseline", tiny_checkpoints["clip"], "--method", "lincir", "image", "--out",
            str(out), "--device", "cpu", "--no-progress", "--figure-queries", "0"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "lincir with" in captured.err and "needs training captions" in captured.err
    assert captured.err.strip().splitlines()[-1].startswith("e2-plugins: error: 2 run(s) failed")
    results = json.loads((out / "results.json").read_text())
    assert all(set(r["methods"]) == {"image"} for r in results["encoders"].values())
    assert len(results["failed"]) == 2 and "failed" in captured.out  # the table marks the failed rows
    image = next(iter(results["encoders"].values()))["methods"]["image"]["dress"]
    assert image["gallery"] == 20 and image["trivial"] == ["R@50"]  # 20 images: R@50 is 100 by construction
    assert "/100.0*" in captured.out and "* 100 by construction: the gallery holds no more images than K (dress 20 " \
        "images)" in captured.out


@pytest.mark.parametrize("task", ["retrieval", "cir"])
def test_every_side_by_side_task_says_which_words_an_encoder_cannot_read(task, products, tiny_checkpoints, tmp_path,
                                                                          caplog):
    """An encoder whose token-embedding rows of some of the task's words are zero (as the compact demo encoders'
    are outside the synthetic products' words) is named in one warning with the share, the words and the command
    that trains it; each encoder's coverage is in results.json."""
    import e2_cir
    import e2_retrieval

    catalog, fiq, _ = products
    clip = e2_core.load_encoder(tiny_checkpoints["clip"])
    word = "Kestrel" if task == "retrieval" else "logo"  # a brand of the catalog; a word of the relative captions
    blind = {int(t) for t in clip.tokenizer([word])[0][1:]} - {0, 49407}
    with torch.no_grad():
        clip.model.token_embedding.weight[sorted(blind)] = 0
    zeroed = str(clip.save_pretrained(tmp_path / "zeroed"))
    sides = dict(encoder=tiny_checkpoints["e2"], baseline=zeroed, out=tmp_path / "out", device="cpu")
    if task == "retrieval":
        e2_retrieval.retrieval(dataset="catalog", data_root=str(catalog), protocol="full", **sides)
        what, where = "validation texts", f"--dataset catalog --data-root {catalog}"
    else:
        e2_cir.cir(dataset="fashioniq", data_root=str(fiq), method=["image"], category=["dress"], figure_queries=0,
                   progress=False, **sides)
        what, where = "relative captions", "--dataset catalog --data-root products.jsonl"
    warnings = [r.getMessage() for r in caplog.records if "has no embedding" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"CLIP ({zeroed}) ({zeroed}) has no embedding for "), warnings
    for said in (f"20 {what}" if task == "retrieval" else what, repr(word), f"e2-plugins train --method clip-ft --pretrained {zeroed} {where}",
                 "--baseline"):
        assert said in warnings[0]
    encoders = json.loads((tmp_path / "out" / "results.json").read_text())["encoders"]
    assert encoders[f"CLIP ({zeroed})"]["vocabulary_coverage"]["unembedded_distinct"] == len(blind)
    assert encoders[f"E2 ({tiny_checkpoints['e2']})"]["vocabulary_coverage"]["unembedded"] == 0


def test_one_table_renderer_aligns_every_tasks_rows():
    table = format_table(["method", "encoder", "R@10"], [["image", "E2", 41.66], ["pic2word", "CLIP-FT", None]],
                         first=2).splitlines()
    assert table == ["method    encoder  R@10", "image     E2       41.7", "pic2word  CLIP-FT     -"]


# --- a third-party package: one file, one entry-point line per method or dataset -------------------
THIRD_PARTY = '''
from e2_caption.capdec import CapDec
from e2_cir.methods.base import CIRMethod
from e2_core.data.fashioniq import load_fashioniq
from e2_core.registry import DatasetReader
from e2_train.methods import CLIPFineTuning
import torch.nn.functional as F


class HalfAndHalf(CIRMethod):
    """The reference image and the captions, weighed equally after normalising each."""
    name = "half-and-half"
    convention = "cirevl"

    def queries(self, encoder, batch):
        text = self.encode_prompts(encoder, batch.prompts, None)
        return F.normalize(F.normalize(batch.reference_features, dim=-1) + F.normalize(text, dim=-1), dim=-1)


class LoudCapDec(CapDec):
    """CapDec with twice the noise."""
    name = "loud-capdec"

    def __init__(self, encoder, config=None, **kwargs):
        super().__init__(encoder, config, noise_variance=0.032, **kwargs)


class ShortFineTuning(CLIPFineTuning):
    """CLIP fine-tuning under another name, to show a training method is one class."""
    name = "short-ft"


STORE = DatasetReader("store-fiq", lambda root, split, category="dress", **o: load_fashioniq(root, category, split, **o),
                      "a shop's composed-retrieval triplets in FashionIQ's layout", kind="triplets")
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A package installed only for this test: its module and its dist-info with the entry points."""
    site = tmp_path / "site"
    (site / "shop_plugins-0.1.dist-info").mkdir(parents=True)
    (site / "shop_plugins.py").write_text(THIRD_PARTY)
    (site / "shop_plugins-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: shop-plugins\n"
                                                                   "Version: 0.1\n")
    (site / "shop_plugins-0.1.dist-info" / "entry_points.txt").write_text(
        "[e2_plugins.datasets]\nstore-fiq = shop_plugins:STORE\n\n"
        "[e2_plugins.cir_methods]\nhalf-and-half = shop_plugins:HalfAndHalf\n\n"
        "[e2_plugins.caption_methods]\nloud-capdec = shop_plugins:LoudCapDec\n\n"
        "[e2_plugins.training_methods]\nshort-ft = shop_plugins:ShortFineTuning\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("shop_plugins", None)


def test_a_third_party_package_adds_a_dataset_and_a_method_of_each_kind(third_party, products, tiny_checkpoints,
                                                                        data_root, tmp_path, capsys):
    _, fiq, _ = products
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in ("store-fiq", "half-and-half", "loud-capdec", "short-ft"):
        assert f"{name} " in listed and "shop-plugins 0.1" in listed.split(f"{name} ", 1)[1].splitlines()[0]
    common = ["--encoder", tiny_checkpoints["e2"], "--baseline", tiny_checkpoints["clip"], "--device", "cpu",
              "--no-progress"]
    assert main(["run", "cir", "--dataset", "store-fiq", "--data-root", str(fiq), "--category", "dress", "--method",
                 "half-and-half", "image", "--out", str(tmp_path / "cir"), "--figure-queries", "0", *common]) == 0
    scores = json.loads((tmp_path / "cir" / "results.json").read_text())["encoders"]
    assert all(r["methods"]["half-and-half"]["dress"]["queries"] == 10 for r in scores.values())
    assert main(["run", "caption", "--data-root", data_root, "--method", "loud-capdec", "--epochs", "1",
                 "--max-images", "4", "--page-images", "0", "--out", str(tmp_path / "cap"), *common]) == 0
    assert "loud-capdec" in json.loads((tmp_path / "cap" / "results.json").read_text())["encoders"]["E2 (" + str(
        tiny_checkpoints["e2"]) + ")"]["methods"]
    from conftest import train_config
    from e2_train import train

    cfg = train_config(tmp_path, data_root, method="short-ft", stages=["finetune:steps=1"])
    assert (Path(train(cfg)["finetune"]) / "model.safetensors").is_file()
    with pytest.raises(SystemExit):  # --method offers what is installed
        main(["train", "--method", "nope"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "'short-ft'" in err


# --- a full disk --------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled but for a few KB, where one can be mounted (as root); else None."""
    import subprocess

    folder = tmp_path / "fs"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        yield None
        return
    try:
        (folder / "filler").write_bytes(b"\0" * (1024 * 1024 - 12 * 1024))
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def _run_with_a_file_size_limit(args, limit=8 * 1024):
    """The command line in a process whose files cannot grow past ``limit`` bytes (EFBIG, as a full disk)."""
    import subprocess

    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from e2_plugins.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(full_disk, products, tiny_checkpoints, tmp_path, capsys):
    _, _, paths = products
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(map(str, paths)) + "\n")
    folder = full_disk or tmp_path / "limited"
    folder.mkdir(exist_ok=True)
    args = ["run", "embed", "--images", str(listing), "--encoder", tiny_checkpoints["e2"], "--regions", "--device",
            "cpu", "--workers", "0", "--no-progress", "--out", str(folder / "emb.safetensors")]
    if full_disk is not None:
        assert main(args) == 2
        err = capsys.readouterr().err
    else:  # no tmpfs to mount: the same through a file-size limit
        run = _run_with_a_file_size_limit(args)
        assert run.returncode == 2, run.stderr[-1000:]
        err = run.stderr
    assert err.strip().splitlines()[-1].startswith(f"e2-plugins: error: {folder / 'emb.safetensors'}: no space left "
                                                   "on the device to write it (about ")
    assert "free space and run the same command again" in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir() if p.name != "filler") == []  # nothing half-written


def test_synthetic_data_on_a_full_disk_is_refused_before_writing(full_disk, tmp_path, capsys):
    if full_disk is None:
        pytest.skip("no tmpfs can be mounted here (the check reads the free space of a real device)")
    assert main(["data", "synthetic", "--size", "tiny", "--out", str(full_disk / "syn")]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device for" in err and "synthetic images" in err
    assert not list((full_disk / "syn").glob("*.h5")) and not list((full_disk / "syn").glob(".*tmp"))


def test_a_killed_runs_temporary_cache_file_is_removed_and_a_running_ones_kept(products, tiny_checkpoints, tmp_path):
    import os
    import time

    _, _, paths = products
    tmp_path.joinpath("cache").mkdir()
    old, fresh = tmp_path / "cache" / ".images-abc.safetensors.x1.tmp", tmp_path / "cache" / ".images-d.safetensors.x2.tmp"
    old.write_bytes(b"")  # what a SIGKILL during a cache write leaves
    fresh.write_bytes(b"")  # another process writing right now
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    embed_images(e2_core.load_encoder(tiny_checkpoints["clip"]), paths[:3], cache_dir=tmp_path / "cache")
    assert not old.exists() and fresh.exists()
