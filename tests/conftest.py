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
    from e2_data.synthetic import write_fashiongen

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


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory):
    """A tiny local text-generation model and a tiny image-to-text model, built from configs (random weights)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("hf")
    words = "a photo of dress shirt top red blue with logo that is and the made wool cotton <unk> <eos>".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                                     pad_token="<eos>")
    eos = len(words) - 1
    torch.manual_seed(0)
    small = dict(vocab_size=len(words), n_positions=256, n_embd=16, n_layer=1, n_head=2, eos_token_id=eos,
                 bos_token_id=eos)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**small)).save_pretrained(root / "rewriter")
    tokenizer.save_pretrained(root / "rewriter")
    vision = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=16,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32))
    decoder = transformers.GPT2LMHeadModel(transformers.GPT2Config(**small, add_cross_attention=True))
    captioner = transformers.VisionEncoderDecoderModel(encoder=vision, decoder=decoder)
    captioner.config.decoder_start_token_id = captioner.config.pad_token_id = 0
    captioner.generation_config.decoder_start_token_id = 0
    captioner.generation_config.eos_token_id = captioner.generation_config.pad_token_id = eos
    captioner.save_pretrained(root / "captioner")
    tokenizer.save_pretrained(root / "captioner")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "captioner")
    return root
