"""The encoder contract and the one door (``load_encoder``): CLIP and E2 behind one interface."""
from importlib.metadata import EntryPoint

import open_clip
import pytest
import torch

import e2_core
from e2_core import CheckpointError, Encoder, load_encoder, registry
from conftest import TINY


@pytest.fixture(params=["clip", "e2"])
def encoder(request):
    torch.manual_seed(0)
    model = open_clip.create_model(TINY) if request.param == "clip" else e2_core.create_e2(TINY)
    return Encoder(model, arch=TINY).eval()


def prompts(encoder, texts=("a photo of $ that is red", "a $ , with a logo and a zip")):
    return encoder.tokenizer(list(texts)), encoder.token_id("$")


def test_substituting_the_placeholders_own_embedding_is_encode_text(encoder):
    tokens, placeholder = prompts(encoder)
    own = encoder.model.token_embedding.weight[placeholder].expand(2, -1)
    for text in (tokens, e2_core.trim_padding(tokens)):  # full context and trimmed padding alike
        torch.testing.assert_close(encoder.encode_text_with_pseudo_tokens(text, own, placeholder),
                                   encoder.encode_text(tokens), atol=1e-5, rtol=0)


def test_the_query_changes_exactly_when_its_pseudo_token_changes(encoder):
    tokens, placeholder = prompts(encoder)
    own = encoder.model.token_embedding.weight[placeholder].detach().expand(2, -1).clone()
    other = own.clone()
    other[1] += torch.randn(encoder.token_width)
    a = encoder.encode_text_with_pseudo_tokens(tokens, own, placeholder)
    b = encoder.encode_text_with_pseudo_tokens(tokens, other, placeholder)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_substitution_is_differentiable_in_the_pseudo_token(encoder):
    tokens, placeholder = prompts(encoder)
    pseudo = torch.randn(2, encoder.token_width, requires_grad=True)
    encoder.encode_text_with_pseudo_tokens(tokens, pseudo, placeholder, normalize=True).sum().backward()
    assert pseudo.grad is not None and pseudo.grad.abs().sum(dim=1).min() > 0


def test_several_placeholders_take_their_own_pseudo_tokens(encoder):
    tokens, placeholder = prompts(encoder, ["$ and $", "a $ or a $"])
    weight = encoder.model.token_embedding.weight.detach()
    word = encoder.tokenizer(["red"])[0][1]
    pseudo = torch.stack([weight[placeholder], weight[word]]).expand(2, -1, -1)  # first stays "$", second is "red"
    expected = encoder.encode_text(encoder.tokenizer(["$ and red", "a $ or a red"]))
    torch.testing.assert_close(encoder.encode_text_with_pseudo_tokens(tokens, pseudo, placeholder), expected,
                               atol=1e-5, rtol=0)


def test_text_without_the_placeholder_is_refused(encoder):
    tokens, placeholder = prompts(encoder, ["a photo of $", "no placeholder here"])
    with pytest.raises(ValueError, match=r"texts \[1\] do not hold the placeholder"):
        encoder.encode_text_with_pseudo_tokens(tokens, torch.zeros(2, encoder.token_width), placeholder)
    with pytest.raises(ValueError, match="2 tokens"):
        encoder.token_id("$$ a")


def test_both_kinds_give_the_same_interface(encoder):
    images = torch.randn(3, 3, 64, 64)
    features = encoder.encode_image(images, normalize=True)
    assert features.shape == (3, encoder.embed_dim) and torch.allclose(features.norm(dim=-1), torch.ones(3))
    assert encoder.encode_text(encoder.tokenizer(["a coat"])).shape == (1, encoder.embed_dim)
    assert encoder.preprocess(__import__("PIL").Image.new("RGB", (90, 70))).shape == (3, 64, 64)
    assert all(hasattr(encoder, attr) for attr in e2_core.CONTRACT)
    if encoder.has_regions:
        out = encoder.encode_image_regions(images, normalize=True)
        assert out.regional_features.shape == (3, len(encoder.entities), encoder.embed_dim)
        torch.testing.assert_close(out.image_features, features)
    else:
        assert encoder.entities == ()
        with pytest.raises(ValueError, match="no regional embeddings"):
            encoder.encode_image_regions(images)


def test_a_clip_built_by_open_clip_is_saved_and_loaded_exactly(tmp_path):
    torch.manual_seed(1)
    clip = open_clip.create_model("ViT-S-16-128")  # no architecture name given to the package
    e2_core.save_pretrained(clip, tmp_path / "clip")
    loaded = load_encoder(tmp_path / "clip")
    assert loaded.kind == "CLIP" and loaded.name == str(tmp_path / "clip")
    for (name, a), (_, b) in zip(clip.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    images = torch.randn(2, 3, 128, 128)
    assert torch.equal(clip.encode_image(images), loaded.encode_image(images))
    assert torch.equal(loaded.tokenizer(["a red coat"]), open_clip.get_tokenizer("ViT-S-16-128")(["a red coat"]))


def test_every_loaded_encoder_saves_and_reloads(tmp_path, tiny_checkpoints):
    for kind, path in tiny_checkpoints.items():
        encoder = load_encoder(path)
        encoder.save_pretrained(tmp_path / kind)
        again = load_encoder(tmp_path / kind)
        assert again.kind == encoder.kind and again.fingerprint() == encoder.fingerprint()



def test_a_loaded_encoder_is_ready_for_inference(tiny_checkpoints):
    # The README's use: load, then encode, no .eval() in between. E2 in train mode samples its
    # selection, so two calls would differ; loaded, it gives one embedding per image.
    images = torch.randn(4, 3, 64, 64)
    for kind, path in tiny_checkpoints.items():
        encoder = load_encoder(path)
        assert not encoder.training and not any(m.training for m in encoder.modules()), kind
        with torch.no_grad():
            assert torch.equal(encoder.encode_image(images), encoder.encode_image(images)), kind
    e2 = load_encoder(tiny_checkpoints["e2"])
    with torch.no_grad():
        assert torch.equal(e2.encode_image_regions(images).selected_patches,
                           e2.encode_image_regions(images).selected_patches)
        e2.train()
        sampled = [e2.encode_image_regions(images).selected_patches for _ in range(3)]
    assert not all(torch.equal(sampled[0], s) for s in sampled[1:])      # what eval mode prevents
    mine = Encoder(e2_core.create_e2(TINY), arch=TINY)
    assert load_encoder(mine).training                                    # an object keeps its mode

def test_weights_file_needs_its_architecture_and_is_loaded_with_it(tmp_path):
    torch.manual_seed(3)
    clip = open_clip.create_model(TINY)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match=f"MODEL:FILE, e.g. ViT-B-32:{tmp_path / 'clip.pt'}"):
        load_encoder(tmp_path / "clip.pt")
    encoder = load_encoder(f"{TINY}:{tmp_path / 'clip.pt'}")
    assert encoder.kind == "CLIP" and torch.equal(encoder.model.visual.conv1.weight, clip.visual.conv1.weight)


def test_a_source_of_no_known_form_names_the_forms(tmp_path):
    with pytest.raises(ValueError, match=r"is none of: a checkpoint directory.*demo:e2.*MODEL:TAG"):
        load_encoder("no-such-thing")
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag of ViT-B-32"):
        load_encoder("ViT-B-32:no-such-tag")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder without config.json"):
        load_encoder(tmp_path / "empty")


def test_an_installed_encoder_scheme_is_a_source(monkeypatch, tiny_checkpoints):
    monkeypatch.setattr(registry, "entry_points", lambda group: [
        EntryPoint("tiny", "tests_tiny_scheme:load", registry.ENCODER_GROUP)] if group == registry.ENCODER_GROUP else [])
    module = type("M", (), {"load": staticmethod(lambda name: tiny_checkpoints[name])})
    monkeypatch.setitem(__import__("sys").modules, "tests_tiny_scheme", module)
    encoder = load_encoder("tiny:e2")
    assert encoder.kind == "E2" and encoder.name == "tiny:e2"
    with pytest.raises(KeyError):
        load_encoder("tiny:nothing")


def test_a_third_party_encoder_missing_part_of_the_contract_is_refused(encoder):
    class Partial:
        name, embed_dim = "partial", 64

        def encode_image(self, images, normalize=False):
            return images

    with pytest.raises(TypeError, match=r"Partial is not an encoder: it lacks token_width, tokenizer, preprocess"):
        e2_core.as_encoder(Partial())

    class Delegate:  # a complete stand-in is used as it is
        def __getattr__(self, name):
            return getattr(encoder, name)

    stand_in = Delegate()
    assert e2_core.as_encoder(stand_in) is stand_in


def test_fingerprint_follows_the_weights(encoder):
    before = encoder.fingerprint()
    assert encoder.fingerprint() == before
    with torch.no_grad():
        encoder.model.logit_scale.add_(1e-3)
    assert encoder.fingerprint() != before
