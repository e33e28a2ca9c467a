import json
import shutil

import pytest
import torch
from PIL import Image

import open_clip

import e2_core
from e2_data.synthetic import write_fashiongen
from e2_plugins.cli import main
from conftest import TINY


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    write_fashiongen(root / "data", {"train": 32, "validation": 24}, seed=0)
    e2_core.save_pretrained(e2_core.create_e2(TINY), root / "e2")
    e2_core.save_pretrained(open_clip.create_model(TINY), root / "clip")
    return root


def test_retrieval_task_side_by_side(setup, capsys):
    out = setup / "out"
    args = ["run", "retrieval", "--data-root", str(setup / "data"), "--encoder", str(setup / "e2"),
            "--baseline", str(setup / "clip"), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    e2, clip = f"E2 ({setup / 'e2'})", f"CLIP ({setup / 'clip'})"
    assert "full protocol" in printed and e2 in printed and clip in printed
    results = json.loads((out / "results.json").read_text())["encoders"]
    assert results[e2]["kind"] == "E2" and results[clip]["kind"] == "CLIP" and results[clip]["role"] == "baseline"
    full = results[e2]["protocols"]["full"]
    assert set(full["i2t"]) == {"1", "5", "10"} and full["sumr"] == pytest.approx(
        sum(full["i2t"].values()) + sum(full["t2i"].values()))
    assert "error" in results[e2]["protocols"]["sample-100"]  # 24 products: too few for 100 same-sub-category negatives
    assert Image.open(out / "top5.png").size[0] > 0 and Image.open(out / "selection.png").size[0] > 0
    cached = sorted((out / "embeddings").glob("*.safetensors"))
    assert len(cached) == 4  # images and texts of each encoder
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert main(args) == 0  # second run reads the cached embeddings
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert json.loads((out / "results.json").read_text())["encoders"][e2]["protocols"]["full"] == full


def test_train_command_keeps_the_best_by_validation_sumr(setup, capsys):
    out = setup / "run"
    assert main(["train", "--out", str(out), "--model", TINY, "--dataset", "synthetic", "--data-root",
                 str(setup / "data"), "--batch-size", "8", "--stages", "stage1:steps=1", "stage2:steps=2",
                 "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
    evals = [json.loads(line) for line in open(out / "stage2" / "metrics.jsonl") if "eval_step" in line]
    assert evals and all(0 <= e["sumr"] <= 600 for e in evals)
    assert e2_core.load_encoder(str(out / "stage2" / "best")).entities == e2_core.FASHIONGEN_ENTITIES


def test_harness_embeds_with_trimmed_text_for_clip_too(setup):
    """Trimmed global texts (shorter than a 77-token context) go through CLIP's text tower as well."""
    from e2_core.data import FashionGen
    from e2_eval.harness import embed_dataset

    clip = open_clip.create_model("ViT-S-16-128")  # built by open_clip itself
    data = FashionGen(setup / "data", split="validation")
    images, texts, indices, skipped = embed_dataset(clip, data, batch_size=8)
    assert images.shape == texts.shape == (24, 128) and indices == list(range(24)) and not skipped
    reference = clip.encode_text(open_clip.get_tokenizer("ViT-S-16-128")([e2_core.build_texts(data.product(0).tags)[0]]),
                                 normalize=True)
    assert torch.allclose(texts[:1], reference, atol=1e-5)


def test_embedding_cache_follows_the_checkpoints_weights(setup, tmp_path):
    from e2_core.data import FashionGen
    from e2_eval.harness import embed_dataset

    torch.manual_seed(5)
    e2_core.save_pretrained(e2_core.create_e2(TINY), tmp_path / "e2")
    encoder = e2_core.load_encoder(tmp_path / "e2")
    data = FashionGen(setup / "data", split="validation", transform=encoder.preprocess)
    first = embed_dataset(encoder, data, cache_dir=tmp_path / "cache")[0]
    assert torch.equal(embed_dataset(e2_core.load_encoder(tmp_path / "e2"), data, cache_dir=tmp_path / "cache")[0], first)
    torch.manual_seed(6)  # same directory, new weights
    e2_core.save_pretrained(e2_core.create_e2(TINY), tmp_path / "e2")
    second = embed_dataset(e2_core.load_encoder(tmp_path / "e2"), data, cache_dir=tmp_path / "cache")[0]
    assert not torch.allclose(first, second) and len(list((tmp_path / "cache").glob("images-*.safetensors"))) == 2


def test_sample_100_on_small_groups_names_the_commands_option(setup, capsys):
    out = setup / "small-groups"
    args = ["run", "retrieval", "--data-root", str(setup / "data"), "--encoder", str(setup / "clip"), "--baseline",
            str(setup / "clip"), "--out", str(out), "--device", "cpu", "--protocol", "sample-100"]
    assert main(args) == 0
    error = json.loads((out / "results.json").read_text())["encoders"][f"CLIP ({setup / 'clip'})"]["protocols"][
        "sample-100"]["error"]
    groups = e2_core.data.FashionGen(setup / "data", split="validation").groups("subcategory")
    name = min(set(groups), key=groups.count)
    size = groups.count(name)
    assert error == (f"group {name!r} has only {size} item(s), so {size - 1} possible negatives per item, but "
                     f"100 negatives were asked for; ask for at most {size - 1} (or score the full protocol only)")
    assert main(args + ["--num-negatives", str(size - 1)]) == 0
    scores = json.loads((out / "results.json").read_text())["encoders"][f"CLIP ({setup / 'clip'})"]["protocols"][
        "sample-100"]
    assert scores["negatives"] == f"{size - 1} drawn from the query's sub-category" and "sumr" in scores


def _catalog(root, products=12, broken=(3,)):
    root.mkdir()
    rows = []
    for i in range(products):
        if i in broken:
            (root / f"p{i}.png").write_bytes(b"\x89PNG not really")
        else:
            Image.new("RGB", (64, 64), (i * 20, 80, 160)).save(root / f"p{i}.png")
        rows.append(json.dumps({"image": f"p{i}.png", "text": f"coat {i}", "brand": f"b{i % 3}"}))
    (root / "products.jsonl").write_text("\n".join(rows) + "\n")
    return root / "products.jsonl"


def test_skips_are_reported_on_the_console_and_sample_100_states_its_protocol(setup, tmp_path, capsys):
    catalog = _catalog(tmp_path / "catalog")
    args = ["run", "retrieval", "--dataset", "catalog", "--data-root", str(catalog), "--encoder", str(setup / "clip"),
            "--baseline", str(setup / "clip"), "--out", str(tmp_path / "out"), "--device", "cpu", "--num-negatives", "5"]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    broken = tmp_path / "catalog" / "p3.png"
    assert (f"CLIP ({setup / 'clip'}): 1 unreadable image(s) skipped, e.g. {broken}: not a readable image (unknown "
            f"format or corrupt header) (all listed under \"skipped_images\" in {tmp_path / 'out' / 'results.json'})"
            ) in captured.err
    assert "sample-100 protocol: negatives per query, 5 drawn from all products (the dataset has no sub-category)" \
        in printed
    # the embeddings are cached now; --strict still stops at the unreadable image, with workers too
    for workers in ("0", "1"):
        assert main(args + ["--strict", "--workers", workers]) == 2
        error = capsys.readouterr().err
        assert error == (f"e2-plugins: error: {broken}: not a readable image (unknown format or corrupt header) "
                         "(--no-strict skips and reports unreadable images)\n")
        shutil.rmtree(tmp_path / "out" / "embeddings", ignore_errors=True)  # the second round reads the images


def test_embedding_shows_its_progress(setup, monkeypatch):
    from e2_core.data import FashionGen
    from e2_core import embedding
    from e2_eval import harness

    shown = []
    monkeypatch.setattr(embedding, "tqdm", lambda batches, **options: shown.append(options) or batches)
    encoder = e2_core.load_encoder(str(setup / "e2"))
    harness.embed_dataset(encoder, FashionGen(setup / "data", split="validation"), batch_size=8)
    assert shown and shown[0]["desc"] == f"embedding 24 products with E2 ({setup / 'e2'})"


@pytest.mark.parametrize("option, value, message", [("--batch-size", "0", "--batch-size=0: must be >= 1"),
                                                    ("--num-negatives", "0", "--num-negatives=0: must be >= 1"),
                                                    ("--workers", "-1", "--workers=-1: must be >= 0")])
def test_retrieval_refuses_counts_out_of_range_before_any_work(option, value, message, tmp_path, capsys):
    """--batch-size 0 ended in a ZeroDivisionError traceback after the encoders had loaded."""
    assert main(["run", "retrieval", option, value, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"e2-plugins: error: {message}\n"
    assert not (tmp_path / "out").exists()
