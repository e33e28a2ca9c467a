import json

import pytest
import torch
from PIL import Image

import open_clip

import e2_core
from e2_core.data.builders.synthetic import write_fashiongen
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
    results = json.loads((out / "results.json").read_text())
    assert results[e2]["kind"] == "E2" and results[clip]["kind"] == "CLIP" and results[clip]["role"] == "baseline"
    full = results[e2]["full"]
    assert set(full["i2t"]) == {"1", "5", "10"} and full["sumr"] == pytest.approx(
        sum(full["i2t"].values()) + sum(full["t2i"].values()))
    assert "error" in results[e2]["sample-100"]  # 24 products: too few for 100 same-sub-category negatives
    assert Image.open(out / "top5.png").size[0] > 0 and Image.open(out / "selection.png").size[0] > 0
    cached = sorted((out / "embeddings").glob("*.safetensors"))
    assert len(cached) == 2
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert main(args) == 0  # second run reads the cached embeddings
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert json.loads((out / "results.json").read_text())[e2]["full"] == full


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
    from e2_eval.harness import cached_embeddings

    torch.manual_seed(5)
    e2_core.save_pretrained(e2_core.create_e2(TINY), tmp_path / "e2")
    encoder = e2_core.load_encoder(tmp_path / "e2")
    data = FashionGen(setup / "data", split="validation", transform=encoder.preprocess)
    first = cached_embeddings(encoder, data, tmp_path / "cache")[0]
    assert torch.equal(cached_embeddings(e2_core.load_encoder(tmp_path / "e2"), data, tmp_path / "cache")[0], first)
    torch.manual_seed(6)  # same directory, new weights
    e2_core.save_pretrained(e2_core.create_e2(TINY), tmp_path / "e2")
    second = cached_embeddings(e2_core.load_encoder(tmp_path / "e2"), data, tmp_path / "cache")[0]
    assert not torch.allclose(first, second) and len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
