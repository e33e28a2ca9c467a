"""Pic2Word against numbers recorded from Pic2Word's own code (google-research/composed_image_retrieval
@ 8c05329: its CLIP class and IM2TEXT given the same tiny weights; mapping output, composed query and
training loss agreed to <= 2e-7), and the import of a network saved as its training script saves it."""
import math
import types

import open_clip
import pytest
import torch
import torch.nn.functional as F

import e2_core
from e2_cir.methods.base import QueryBatch, frozen
from e2_cir.methods.pic2word import Pic2Word
from e2_eval.fashioniq import compose

CFG = dict(embed_dim=32, quick_gelu=True,
           vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=2, head_width=64),
           text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
CAPTIONS = [("is red with a logo", "is shorter."), ("Has long sleeves", "is blue and white?"),
            ("is a darker shade", "has buttons, and is longer"), ("is striped", "is plain"),
            ("has a v-neck and no sleeves", "is made of lace"), ("is more casual", "is black.")]


def original_layout(shapes, seed, scale=0.1):
    """A state dict keyed as Pic2Word's IM2TEXT writes it under DistributedDataParallel, seeded values."""
    g = torch.Generator().manual_seed(seed)
    return {f"module.{k}": torch.randn(shape, generator=g) * scale for k, shape in shapes}


def shapes_of(input_dim, hidden_dim, output_dim, n_layer):
    shapes = [("fc_out.weight", (output_dim, hidden_dim)), ("fc_out.bias", (output_dim,))]
    for i in range(n_layer):
        shapes += [(f"layers.{i}.0.weight", (hidden_dim, input_dim if i == 0 else hidden_dim)),
                   (f"layers.{i}.0.bias", (hidden_dim,))]
    return shapes


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**CFG)
    clip.logit_scale.data.fill_(math.log(50.0))
    encoder = frozen(e2_core.Encoder(clip))
    checkpoint = {"epoch": 30, "state_dict_img2text": original_layout(shapes_of(32, 512, 64, 2), seed=2)}
    state, options = Pic2Word.convert_original(checkpoint)
    method = Pic2Word(**options)
    method.network = method.build(encoder)
    method.network.load_state_dict(state)
    method.network.eval()
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = encoder.encode_image(images)
    return encoder, method, raw, options


def test_outputs_match_numbers_recorded_from_the_original(setup):
    encoder, method, raw, options = setup
    assert options == {"hidden_dim": 512, "n_layer": 2}
    close = dict(atol=2e-5, rtol=0)
    torch.testing.assert_close(raw[0, :4], torch.tensor([1.140823, 1.487722, 2.701176, -0.853731]), **close)
    with torch.no_grad():
        tokens = method.network(raw)
        prompts = [compose("pic2word", c) for c in CAPTIONS]
        queries = method.queries(encoder, QueryBatch([str(i) for i in range(6)], raw, prompts, CAPTIONS, "dress"))
        loss = method.loss(encoder, raw).item()
    torch.testing.assert_close(tokens[0, :4], torch.tensor([0.86098, 1.161296, 0.87593, 1.996221]), **close)
    torch.testing.assert_close(tokens[5, -3:], torch.tensor([1.072492, 2.573454, -1.155898]), **close)
    torch.testing.assert_close(queries[0, :4], torch.tensor([0.002894, 0.029209, -0.363375, -0.201958]), **close)
    torch.testing.assert_close(queries[3, -3:], torch.tensor([0.22042, -0.262419, 0.011671]), **close)
    assert loss == pytest.approx(2.198812, abs=2e-5)  # at the CLIP's logit scale, 50


def test_loss_is_at_the_encoders_logit_scale_unless_a_temperature_is_given(setup):
    encoder, method, raw, options = setup
    with torch.no_grad():
        text = F.normalize(method.encode_texts(encoder, ["a photo of $"] * 6, method.network(raw)), dim=-1)
        cos = F.normalize(raw, dim=-1) @ text.t()
        target = torch.arange(6)

        def by_hand(scale):
            return ((F.cross_entropy(scale * cos, target) + F.cross_entropy(scale * cos.t(), target)) / 2).item()

        assert method.loss(encoder, raw).item() == pytest.approx(by_hand(50.0), abs=1e-5)
        other = Pic2Word(temperature=0.25, **options)
        other.network = method.network
        assert other.loss(encoder, raw).item() == pytest.approx(by_hand(4.0), abs=1e-5)
        assert abs(by_hand(4.0) - by_hand(50.0)) > 0.1


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_an_original_network_imports_and_computes_the_same_math(prefix):
    n_layer, widths = 3, (8, 16, 12)
    source = original_layout(shapes_of(*widths, n_layer), seed=5, scale=0.5)
    source = {prefix + k[len("module."):]: v for k, v in source.items()}
    state, options = Pic2Word.convert_original({"state_dict_img2text": source, "epoch": 1})
    assert options == {"hidden_dim": 16, "n_layer": 3}
    method = Pic2Word(**options)
    network = method.build(types.SimpleNamespace(embed_dim=8, token_width=12))
    network.load_state_dict(state)
    network.eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(6))
    h = x
    for i in range(n_layer):  # Linear, (dropout), ReLU per layer; then fc_out
        h = torch.relu(h @ source[f"{prefix}layers.{i}.0.weight"].t() + source[f"{prefix}layers.{i}.0.bias"])
    expected = h @ source[f"{prefix}fc_out.weight"].t() + source[f"{prefix}fc_out.bias"]
    with torch.no_grad():
        torch.testing.assert_close(network(x), expected, atol=1e-5, rtol=1e-5)
    assert Pic2Word.convert_original(source)[1] == options  # the state dict alone works too
    with pytest.raises(ValueError, match="not a key of Pic2Word's mapping network"):
        Pic2Word.convert_original({**source, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a whole Pic2Word mapping network"):
        Pic2Word.convert_original({k: v for k, v in source.items() if "fc_out" not in k})
