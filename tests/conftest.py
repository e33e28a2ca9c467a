import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import e2_core  # noqa: E402

TINY = "ViT-Ti-16-64"  # 64 px, patch 16 (16 patches), width 64, 4 layers; shipped in e2_core/model_configs


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return e2_core.create_e2(TINY)


@pytest.fixture
def tokenizer():
    return e2_core.get_tokenizer(TINY)


def make_batch(tokenizer, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 64, 64, generator=g)
    tags = [dict(subcategory=["SHIRTS", "JEANS"][i % 2], brand=f"brand {i % 3}", description=f"item {i}",
                 season="FW2016", composition=["cotton", "wool"][i % 2]) for i in range(batch)]
    texts = [e2_core.build_texts(t) for t in tags]
    text = tokenizer([g for g, _ in texts])
    entity_text = e2_core.tokenize_entities(tokenizer, [e for _, e in texts])
    return images, text, entity_text


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Synthetic products in FashionGen's layout: 64 for training, 16 for validation."""
    from e2_core.data.builders.synthetic import write_fashiongen

    root = tmp_path_factory.mktemp("synthetic")
    write_fashiongen(root, {"train": 64, "validation": 16}, seed=0)
    return str(root)


def train_config(tmp_path, data_root, **overrides):
    """A tiny, fast training run, one epoch of one stage (E2's stage 2, or CLIP-FT's); ``overrides``
    are TrainConfig fields (``stages`` as strings such as ``"stage1:epochs=1"``)."""
    from e2_train import TrainConfig

    method = overrides.get("method", "e2")
    base = dict(out=str(tmp_path / "run"), model=TINY, dataset="synthetic", data_root=data_root, batch_size=16,
                stages=["stage2:epochs=1" if method == "e2" else "finetune:epochs=1"], workers=0,
                checkpoint_every=1000, progress=False, warmup_steps=1)
    return TrainConfig(**{**base, **overrides})


def logged_losses(folder):
    import json

    return [json.loads(line)["loss"] for line in open(folder / "metrics.jsonl") if '"loss"' in line]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Checkpoint directories of a tiny E2 and a tiny CLIP (random weights): encoder sources."""
    import open_clip

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    e2_core.save_pretrained(e2_core.create_e2(TINY), root / "e2")
    e2_core.save_pretrained(open_clip.create_model(TINY), root / "clip", arch=TINY)
    return {"e2": str(root / "e2"), "clip": str(root / "clip")}
