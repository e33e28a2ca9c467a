"""The shipped demo encoders (``e2_core.demo``): the files the README's numbers came from, a score floor on
the synthetic validation products, a clear message when they are missing or corrupt, and their recipe
(``e2_train.demo``) writing compact copies; loading them imports no training code."""
import os
import shutil

import pytest
import torch

import e2_core
from e2_core import CheckpointError
from e2_core import demo

# T2I / I2T R@1 (full protocol) on the first 300 of the 1,000 synthetic validation products, measured
# with the shipped files; floors one point lower (other CPUs may flip a near-tie or two)
MEASURED_300 = {"clip-ft": (90.0, 90.7), "e2": (91.0, 93.3)}


@pytest.fixture(scope="module")
def validation_300(tmp_path_factory):
    from e2_data.synthetic import SIZES, write_fashiongen

    root = tmp_path_factory.mktemp("synthetic-validation")
    # the small split's validation products come after its training products
    write_fashiongen(root, {"validation": 300}, offset=SIZES["small"]["train"])
    return str(root)


def test_shipped_demo_encoders_are_the_measured_ones(validation_300):
    from e2_core.data import open_dataset
    from e2_eval.harness import embed_dataset
    from e2_eval.retrieval import cross_modal_retrieval

    scores = {}
    for kind in demo.KINDS:
        assert demo.sha256(demo.demo_checkpoint(kind) / "model.safetensors") == demo.SHIPPED_SHA256[kind]
        encoder = e2_core.load_encoder(f"demo:{kind}")
        assert encoder.has_regions == (kind == "e2")
        data = open_dataset("synthetic", validation_300, "validation", transform=encoder.preprocess)
        images, texts, _, skipped = embed_dataset(encoder, data, 128, "cpu")
        assert not skipped
        result = cross_modal_retrieval(images, texts)
        scores[kind] = (result["t2i"][1], result["i2t"][1])
    for kind, (t2i, i2t) in scores.items():
        floor_t2i, floor_i2t = MEASURED_300[kind]
        assert t2i >= floor_t2i - 1.0 and i2t >= floor_i2t - 1.0, (kind, scores[kind], MEASURED_300[kind])


def test_loading_a_demo_encoder_imports_no_training_code():
    import subprocess
    import sys

    code = "import sys, e2_core; e2_core.load_encoder('demo:e2'); print(sorted(m for m in sys.modules if 'train' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "e2_train" not in out, out


def test_a_missing_or_corrupt_shipped_encoder_says_how_to_reproduce_it(tmp_path, monkeypatch):
    shutil.copytree(demo.SHIPPED / "e2", tmp_path / "e2")
    monkeypatch.setattr(demo, "SHIPPED", tmp_path)
    weights = tmp_path / "e2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"demo:e2 is corrupt .*does not match its SHA-256.*python -m e2_train\.demo"):
        e2_core.load_encoder("demo:e2")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"demo:e2 is missing .*python -m e2_train\.demo"):
        e2_core.load_encoder("demo:e2")
    with pytest.raises(CheckpointError, match=r"demo:clip-ft is missing"):
        e2_core.load_encoder("demo:clip-ft")


def test_the_reproduce_command_writes_compact_copies_that_load(tiny_checkpoints, tmp_path, monkeypatch, tokenizer):
    from e2_train import demo

    monkeypatch.setenv("E2_PLUGINS_CACHE", str(tmp_path / "cache"))
    runs = {"e2": tiny_checkpoints["e2"], "clip-ft": tiny_checkpoints["clip"]}
    monkeypatch.setattr(demo, "recipe_run", lambda kind, recipe, root, seed, **options: runs[kind])
    monkeypatch.setattr(demo, "pretrain_clip", lambda *args, **options: None)
    text = tokenizer(["a red shirt"])
    monkeypatch.setattr(demo, "generator_vocabulary", lambda tokenizer: text.unique())
    demo.main(["--out", str(tmp_path / "weights")])
    for kind, source in runs.items():
        full, compact = e2_core.load_encoder(source), e2_core.load_encoder(str(tmp_path / "weights" / kind))
        assert torch.allclose(full.encode_text(text), compact.encode_text(text), atol=5e-3), kind
        size = (tmp_path / "weights" / kind / "model.safetensors").stat().st_size
        assert size < os.path.getsize(f"{source}/model.safetensors") / 1.9, kind


def test_a_token_row_training_moved_outside_the_vocabulary_is_not_dropped(tiny_checkpoints, tmp_path, tokenizer):
    from e2_train import demo

    vocabulary = tokenizer(["a red shirt"]).unique()
    run = tiny_checkpoints["e2"]
    demo.export_compact(run, tmp_path / "same", vocabulary, start=run)  # nothing moved: fine
    with pytest.raises(ValueError, match=r"moved \d+ token embedding row\(s\) outside the generator's vocabulary"):
        demo.export_compact(run, tmp_path / "other", vocabulary, start=tiny_checkpoints["clip"])
