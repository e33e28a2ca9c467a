"""SEARLE against numbers recorded from SEARLE's own code (miccunifi/SEARLE @ a9c314b, with OpenAI's CLIP
class given the same tiny weights): its Phi, ``encode_with_pseudo_tokens``, the OTI objective of
``oti_inversion.py`` and the loss of ``train_phi.py``; and the import of its released phi."""
import inspect

import open_clip
import pytest
import torch
import torch.nn.functional as F

import e2_core
from e2_cir.methods.base import NetworkMismatch, frozen, load_original
from e2_cir.methods.searle import PALAVRA_TEMPLATES, SEARLE, Concepts, contrastive_loss
from e2_cir.phrases import Vocabulary

CFG = dict(embed_dim=64, quick_gelu=True,
           vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=1, head_width=64),
           text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
TEXTS = ["a photo of $ that is crimson velvet and has a teal logo", "This is a photo of a $", "$",
         "is $ with ochre denim trim"]
TEMPLATES = ["This is a photo of a $", "We see a $ in this image", "$ photo", "A sketch of a $"]
PHRASES = ["is crimson velvet with teal satin trim", "is ochre denim with navy lace trim",
           "is jade tweed with ivory mesh trim", "is navy lace with amber linen trim"]
MASKED = ["is $ with teal satin trim", "is ochre denim with $ trim", "is jade tweed with $ trim",
          "is $ with amber linen trim"]


def tiny_encoder():
    torch.manual_seed(0)
    return frozen(e2_core.Encoder(open_clip.model.CLIP(**CFG)))


def inputs():
    """Pseudo words for TEXTS; OTI's words and image embeddings; phi's targets and estimates; phi's input."""
    g = torch.Generator().manual_seed(1)
    return dict(pseudo=torch.randn(4, 64, generator=g) * 0.05, tokens=torch.randn(4, 64, generator=g) * 0.02,
                images=torch.randn(4, 64, generator=g), targets=torch.randn(4, 64, generator=g) * 0.02,
                estimated=torch.randn(4, 64, generator=g) * 0.02, x=torch.randn(3, 64, generator=g) * 3)


def original_checkpoint(seed=2, input_dim=64, hidden_dim=256, output_dim=64):
    """What SEARLE's ``save_phi`` writes (and its torch.hub entry reads): ``{"epoch", "Phi": state_dict}``,
    the state dict keyed as its Phi class (``layers`` = Linear, GELU, Dropout, Linear, GELU, Dropout, Linear)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.weight": (hidden_dim, input_dim), "layers.0.bias": (hidden_dim,),
              "layers.3.weight": (hidden_dim, hidden_dim), "layers.3.bias": (hidden_dim,),
              "layers.6.weight": (output_dim, hidden_dim), "layers.6.bias": (output_dim,)}
    return {"epoch": 100, "Phi": {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}}


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder()


# recorded from SEARLE's code on the same weights and inputs
FEATURES_HEAD = [[1.111657, -1.526775, -1.546462], [1.435718, -1.056881, -1.835639], [0.162809, -0.185449, -0.22314],
                 [-0.686438, -1.172936, 0.398473]]
FEATURES_NORM = [7.940674, 7.21447, 8.473558, 8.667431]
OTI = (0.948835, 0.139837, 0.679169)  # cosine loss, regulariser, (1 * cosine + 0.5 * regulariser) / 1.5
DISTILLATION = (1.908036, 0.120624, 1.998504)  # contrastive at 0.25, regulariser, 1 * contrastive + 0.75 * regulariser
PHI_HEAD = [[1.943378, -7.667261, 3.692887], [-1.032435, -8.875963, -0.598228], [-4.507671, -3.506282, 0.710305]]
PHI_NORM = [26.155869, 28.520044, 20.198099]


def test_text_features_with_pseudo_words_match_the_original(encoder):
    with torch.no_grad():
        features = SEARLE().encode_texts(encoder, TEXTS, inputs()["pseudo"])
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(features[:, :3], torch.tensor(FEATURES_HEAD), **close)
    torch.testing.assert_close(features.norm(dim=-1), torch.tensor(FEATURES_NORM), **close)


def test_oti_objective_and_distillation_loss_match_the_original(encoder):
    method, x = SEARLE(), inputs()
    with torch.no_grad():
        oti = method.oti_loss(encoder, x["tokens"], x["images"], TEMPLATES, PHRASES, MASKED)
        distillation = method.distillation_loss(encoder, x["targets"], x["estimated"], PHRASES, MASKED)
    assert [float(v) for v in (*oti[1:], oti[0])] == pytest.approx(OTI, abs=2e-6)
    assert [float(v) for v in (*distillation[1:], distillation[0])] == pytest.approx(DISTILLATION, abs=2e-6)


def test_released_phi_is_imported(encoder, tmp_path):
    path = tmp_path / "SEARLE_tiny.pt"
    torch.save(original_checkpoint(), path)
    method = SEARLE()
    load_original(method, encoder, path)
    assert method.options["hidden_dim"] == 256 and not method.network.training
    x = inputs()["x"]
    with torch.no_grad():
        out = method.network(x)
    torch.testing.assert_close(out[:, :3], torch.tensor(PHI_HEAD), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.tensor(PHI_NORM), atol=1e-5, rtol=0)
    w = original_checkpoint()["Phi"]  # and by hand: Linear, GELU, Linear, GELU, Linear
    h = F.gelu(F.linear(F.gelu(F.linear(x, w["layers.0.weight"], w["layers.0.bias"])), w["layers.3.weight"],
                        w["layers.3.bias"]))
    torch.testing.assert_close(out, F.linear(h, w["layers.6.weight"], w["layers.6.bias"]))
    state, options = SEARLE.convert_original(original_checkpoint()["Phi"])  # the bare state dict too
    assert options == {"hidden_dim": 256} and set(state) == set(original_checkpoint()["Phi"])


def test_a_released_phi_of_other_widths_or_keys_is_refused(encoder, tmp_path):
    path = tmp_path / "SEARLE_ViTL14.pt"
    torch.save(original_checkpoint(input_dim=768, hidden_dim=3072, output_dim=768), path)
    with pytest.raises(NetworkMismatch, match="does not fit"):
        load_original(SEARLE(), encoder, path)
    broken = original_checkpoint()
    broken["Phi"]["layers.9.weight"] = broken["Phi"].pop("layers.6.weight")
    with pytest.raises(ValueError, match="'layers.9.weight' is not a key of SEARLE's phi"):
        SEARLE.convert_original(broken)


def test_defaults_are_the_originals_settings():
    defaults = {k: p.default for k, p in inspect.signature(SEARLE).parameters.items()}
    assert defaults == dict(  # oti_inversion.py's and train_phi.py's argument defaults; seed aside
        oti_steps=350, oti_lr=2e-2, oti_weight_decay=0.01, oti_batch_size=32, ema_decay=0.99, top_k_concepts=15,
        oti_cosine_weight=1.0, oti_regulariser_weight=0.5, oti_draw="phrases", epochs=100, batch_size=256, lr=1e-4,
        weight_decay=0.01, temperature=0.25, distillation_weight=1.0, regulariser_weight=0.75,
        phi_top_k_concepts=150, dropout=0.5, hidden_dim=None, drop_last=True, templates="palavra",
        vocabulary_size=256, seed=0)
    assert len(PALAVRA_TEMPLATES) == 24 and SEARLE().templates() == PALAVRA_TEMPLATES
    assert SEARLE(templates="a photo of $|$ photo").templates() == ("a photo of $", "$ photo")
    with pytest.raises(ValueError, match="each with one"):
        SEARLE(templates="a photo")


def test_contrastive_loss_is_the_2n_way_loss():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    z = F.normalize(torch.cat([a, b]), dim=-1)
    terms = []
    for i in range(10):  # row i's pair against every other row, the pair included
        others = [j for j in range(10) if j != i]
        logits = torch.stack([z[i] @ z[j] for j in others]) / 0.25
        terms.append(torch.logsumexp(logits, 0) - z[i] @ z[(i + 5) % 10] / 0.25)
    torch.testing.assert_close(contrastive_loss(a, b, 0.25), torch.stack(terms).mean())


def test_unmaskable_concepts_are_dropped_and_counted(encoder, monkeypatch):
    class WithAnUnmaskablePhrase(Vocabulary):
        def __init__(self, captions, size):
            super().__init__(captions, size)
            self.captions[self.phrases[0]].append(f"is {self.phrases[0]}s")  # inside a longer word: not maskable

    monkeypatch.setattr("e2_cir.methods.searle.Vocabulary", WithAnUnmaskablePhrase)
    method = SEARLE(top_k_concepts=1, templates="a photo of $")
    concepts = method.concepts(encoder, inputs()["images"], PHRASES)
    gone = concepts.vocabulary.phrases[0]
    assert concepts.dropped == {gone}
    assert method.notes["concepts_dropped"] == {"count": 1, "of": len(concepts.vocabulary),
                                                "why": method.notes["concepts_dropped"]["why"]}
    first = [concepts.vocabulary.phrases[j] for j in concepts.ranking[:, 0].tolist()]
    assert method.notes["images_given_nearest_concept"]["count"] == first.count(gone)
    for row in range(4):
        assert gone not in concepts.top(row, len(concepts.vocabulary)) and len(concepts.top(row, 1)) == 1


def test_oti_draws_uniformly_over_the_pooled_phrases():
    """SEARLE's code draws one phrase of all its concepts' phrases (oti_draw="phrases"); "concepts" draws a
    concept first. Here one concept has 3 captions, the other 1."""
    import random

    vocabulary = Vocabulary(["is red wool", "is red wool", "is red wool", "is blue silk"], size=8)
    ranking = torch.tensor([[vocabulary.phrases.index("red wool"), vocabulary.phrases.index("blue silk")]])
    concepts = Concepts(vocabulary, set(), ranking, ranking[:, 0])
    rng = random.Random(0)
    counts = {}
    for draw in ("phrases", "concepts"):
        method = SEARLE(top_k_concepts=2, oti_draw=draw)
        counts[draw] = sum(method.oti_draw(rng, [0], concepts)[1] == ["is blue silk"] for _ in range(400))
    assert 60 < counts["phrases"] < 140 and 150 < counts["concepts"] < 250  # 1 of 4 phrases vs 1 of 2 concepts
