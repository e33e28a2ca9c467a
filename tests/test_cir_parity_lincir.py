"""LinCIR against LinCIR's own code (navervision/lincir): numbers recorded by running its ``models.Phi``,
``loader.CaptionDataset`` and ``encode_with_pseudo_tokens_HF`` (on a Hugging Face CLIPTextModelWithProjection
holding the weights of the tiny CLIP built here), its released checkpoint layout, and its masking rule."""
import random
import sys
from collections import OrderedDict

import open_clip
import pytest
import torch
import torch.nn.functional as F

import e2_core
from e2_cir.methods import METHODS, QueryBatch, TrainData
from e2_cir.methods.lincir import LinCIR
from e2_cir.phrases import keyword_runs

EMBED, WIDTH = 32, 64

# the original's outputs on these weights (phi: 32 -> 128 -> 64, dropout 0.5, eval)
PHI_FIRST4 = [[-0.2693197, 0.2348892, -0.1334312, -0.6379153], [-0.7059221, -0.3086787, -0.0588264, 0.0691101],
              [-0.0900045, 0.3261918, 0.4676536, -0.6168547], [-0.0023285, -0.0459318, -0.1574546, -0.2160894],
              [-0.3114204, 0.2284109, 0.1544303, -0.1241739], [-0.1531561, 0.2200192, 0.2607331, -0.2653393]]
PHI_ROWSUM = [-2.5278606, -3.5933199, 1.4288906, -2.9208837, -2.710268, -5.1803946]
FEATURES_FIRST4 = [[0.3235655, 1.0663522, -0.8635597, -0.784009], [0.2984095, 0.5500809, -1.4522724, -1.0581552],
                   [-0.6117509, 1.25155, -1.2442632, 0.0237706], [1.9022032, -0.4188343, 0.3125944, -1.0817258]]
FEATURES_NORM = [4.7736034, 5.2238393, 5.646636, 5.8191228]
LOSS = 0.4740063548088074  # train_phi.py's MSE at the fixed noise below, eval-mode phi

CAPTIONS = ["Is darker and has longer sleeves", "has the Kestrel & Co logo on the hem", "",
            "is red, white and 100% wool", "is a Dürer/Lenz relaxed-fit coat", "is O'Hara's SS'24 style",
            "is more colorful", "costs $5 and is red",
            "red  dress with  a belt", "is shorter", "has a smaller print and is less flowy",
            "a model wearing a " + " ".join(["very"] * 80) + " long red dress",
            " ".join(["very"] * 74) + " small red bag", "has a small bag and is an ankle-length gown"]
# CaptionDataset's masked captions (its "[$]" spaced out to "$"), random.seed(k) before item k
MASKED = ["is $ and has $", "has $ & $ on $", "$", "is $ , $ and 100% $", "is $ / $ - $", "is $ 's $", "is more $",
          "$ 5 and is $", "$ r $ e $ d $ $ $ d $ r $ e $ s $ s $ $ w $ i $ t $ h $ $ $ a $ $ b $ e $ l $ t $",
          "is $", "has $ and is less $", "$ " + " ".join(["very"] * 71), " ".join(["very"] * 74) + " $",
          "has $ and is $ - $"]
PROMPTS = ["a photo of $ that is red and has a logo", "a photo of $ that has a logo and is red",
           "a photo of $ that is o'hara's & co, 100% wool", "$"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=EMBED, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16,
                                                           patch_size=16),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=WIDTH, heads=2, layers=2))
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return e2_core.load_encoder(clip.eval())


@pytest.fixture
def method(encoder):
    method = LinCIR()
    torch.manual_seed(1)
    method.network = method.build(encoder).eval()
    return method


@pytest.fixture
def fallback_tagger(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # the function-word fallback, whatever is installed


def _x(seed, rows):
    return 3 * torch.randn(rows, EMBED, generator=torch.Generator().manual_seed(seed))


def test_defaults_are_lincirs():
    o = LinCIR().options
    assert (o["noise"], o["dropout"], o["lr"], o["weight_decay"], o["batch_size"], o["masking"]) == \
        (1.0, 0.5, 1e-4, 0.01, 512, "lincir")


def test_phi_forward_matches_the_original(method):
    with torch.no_grad():
        out = method.network(_x(10, 6))
    assert method.network.layers[0].out_features == 4 * EMBED and method.network.layers[2].p == 0.5
    assert torch.allclose(out[:, :4], torch.tensor(PHI_FIRST4), atol=1e-5)
    assert torch.allclose(out.sum(dim=1), torch.tensor(PHI_ROWSUM), atol=1e-4)


def test_pseudo_token_features_match_the_originals_hf_text_model(method, encoder):
    with torch.no_grad():
        features = method.encode_texts(encoder, PROMPTS, method.network(_x(11, len(PROMPTS))))
    assert torch.allclose(features[:, :4], torch.tensor(FEATURES_FIRST4), atol=1e-5)
    assert torch.allclose(features.norm(dim=-1), torch.tensor(FEATURES_NORM), atol=1e-5)


def test_masking_matches_the_originals_caption_dataset(encoder, fallback_tagger):
    cleaned = [LinCIR.clean(c, encoder.tokenizer) for c in CAPTIONS]
    assert cleaned[7] == "costs 5 and is red" and cleaned[0] == cleaned[0].lower()
    assert cleaned[11].count("very") == 71  # cut to 75 tokens
    assert [LinCIR.self_mask(c, random.Random(k))[0] for k, c in enumerate(cleaned)] == MASKED


def test_training_loss_at_fixed_noise_matches_the_original(method, encoder):
    with torch.no_grad():
        target = method.encode_texts(encoder, [LinCIR.clean(c, encoder.tokenizer) for c in CAPTIONS], None)
    tokens, lost = method.masked_tokens(encoder, MASKED)
    assert not lost.any()
    noise = torch.rand(len(CAPTIONS), generator=torch.Generator().manual_seed(3)).unsqueeze(-1) \
        * torch.randn(len(CAPTIONS), EMBED, generator=torch.Generator().manual_seed(4))
    loss = method.training_loss(encoder, target, tokens, noise)
    assert loss.item() == pytest.approx(LOSS, abs=2e-6)
    loss.backward()
    assert all(p.grad is not None for p in method.network.parameters())


def test_the_released_checkpoint_layout_is_imported(encoder, tmp_path):
    """``{"epoch", "Phi": state_dict}`` as LinCIR's save_phi writes it (lincir_large.pt holds the same keys)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"layers.0": (96, EMBED), "layers.3": (96, 96), "layers.6": (WIDTH, 96)}
    state = OrderedDict()
    for name, shape in shapes.items():
        state[f"{name}.weight"] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        state[f"{name}.bias"] = torch.randn(shape[0], generator=g)
    torch.save({"epoch": 20000, "Phi": state}, tmp_path / "lincir_large.pt")
    converted, options = LinCIR.convert_original(torch.load(tmp_path / "lincir_large.pt", weights_only=True))
    assert options == {"hidden_dim": 96}
    method = LinCIR(**options)
    network = method.build(encoder)
    network.load_state_dict(converted)
    x = _x(12, 3)
    expected = x
    for i, name in enumerate(shapes):
        expected = F.linear(expected, state[f"{name}.weight"], state[f"{name}.bias"])
        expected = F.gelu(expected) if i < 2 else expected
    assert torch.allclose(network.eval()(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="not a LinCIR phi checkpoint"):
        LinCIR.convert_original({"epoch": 1, "state_dict_img2text": state})
    with pytest.raises(ValueError, match="widths do not chain"):
        LinCIR.convert_original({"Phi": {**state, "layers.3.weight": torch.zeros(96, 95)}})


@pytest.mark.parametrize("caption, runs, masked", [
    ("has the kestrel & co logo on the hem", ["the kestrel", "co logo", "the hem"], "has $ & $ on $"),
    ("is red, white and 100% wool", ["red", "white", "wool"], "is $ , $ and 100% $"),
    ("is a dürer/lenz relaxed-fit coat", ["a dürer", "lenz relaxed", "fit coat"], "is $ / $ - $"),
    ("is o'hara's ss'24 style", ["o'hara", "ss'24 style"], "is $ 's $"),
    ("is a 2 tone bag", ["a", "tone bag"], "is $ 2 tone b $ g"),  # "a" replaced everywhere, inside words too
    ("has a small logo", ["a small logo"], "has $"),
])
def test_keyword_runs_and_masking(caption, runs, masked, fallback_tagger):
    assert keyword_runs(caption) == runs
    assert LinCIR.self_mask(caption, random.Random(0)) == (masked, "keyword")


def test_a_caption_without_a_run_gets_a_random_word_and_none_is_dropped(fallback_tagger):
    assert keyword_runs("") == [] and LinCIR.self_mask("", random.Random(0)) == ("$", "random_word")
    assert keyword_runs("is 100") == []
    draws = {LinCIR.self_mask("is 100", random.Random(seed))[0] for seed in range(20)}
    assert draws == {"$ 100", "is $"}
    # a run that is not in the caption as written (spaces rejoined): a random word, and the loop stops
    assert LinCIR.self_mask("red  dress and cap", random.Random(1), runs=["red dress", "cap"])[1] == "random_word"
    assert LinCIR.clean("A $10 <PERSON> Dress ") == "a 10 person dress"


def test_a_placeholder_past_the_context_becomes_a_photo_of(encoder, method):
    tokens, lost = method.masked_tokens(encoder, [" ".join(["very"] * 80) + " $", "is $"])
    assert lost.tolist() == [True, False]
    expected = encoder.tokenizer(["a photo of $"])[0]
    assert torch.equal(tokens[0], expected[:tokens.shape[1]])


def test_fit_from_captions_alone(encoder):
    captions = ["is darker and has longer sleeves", "", "has the kestrel & co logo", "is 100"] * 2
    method = METHODS["lincir"](steps=3, batch_size=4)
    method.fit(encoder, TrainData(torch.empty(0, EMBED), captions), progress=False)
    assert method.notes["captions_left_out"]["count"] == 0 and method.notes["captions_left_out"]["of"] == 8
    assert sum(method.notes["masked"].values()) == 12 and not method.network.training
    refs = _x(13, 2)
    queries = method.queries(encoder, QueryBatch(["a", "b"], refs, [[PROMPTS[0]], [PROMPTS[1]]],
                                                 [("is red",), ("is red",)], "dress"))
    assert torch.allclose(queries.norm(dim=-1), torch.ones(2), atol=1e-5)
