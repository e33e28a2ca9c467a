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
