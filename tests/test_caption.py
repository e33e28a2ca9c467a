"""Zero-shot captioning: the decoders, the memory projection, the noise, the metrics, the task."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import e2_core
from e2_caption import METHODS, caption_text
from e2_caption.capdec import inject_noise
from e2_caption.captioner import CaptionerMismatch
from e2_caption.vocab import _bpe_decoder
from e2_caption.decap import project_to_memory
from e2_caption.decoder import DecoderConfig
from e2_eval.captions import caption_metrics, coco_results

SMALL = dict(layers=1, heads=2, width=64, max_tokens=16)
CAPTIONS = ["a red wool coat by acme", "blue denim jeans with a logo", "a white silk shirt",
            "a black leather jacket with zips", "a green cotton dress"]


def _features(encoder, texts):
    with torch.no_grad():
        return encoder.encode_text(e2_core.trim_padding(encoder.tokenizer(texts)), normalize=True)


@pytest.mark.parametrize("name", ["decap", "capdec"])
def test_a_decoder_overfits_a_handful_of_captions_and_regenerates_them(name, tiny_checkpoints):
    encoder = e2_core.load_encoder(tiny_checkpoints["e2"])
    features = _features(encoder, CAPTIONS)
    mapper = "linear" if name == "decap" else "transformer"
    captioner = METHODS[name](encoder, DecoderConfig(**SMALL, prefix_length=1 if name == "decap" else 2,
                                                     mapper=mapper, mapper_layers=1))
    if name == "capdec":
        captioner.options["noise_variance"] = 0.0  # memorise exactly
    losses = captioner.fit(CAPTIONS, features, epochs=100 if name == "decap" else 200, batch_size=5, lr=3e-3,
                           label_smoothing=0.0,
                           progress=False)
    assert losses[-1] < 0.2 * losses[0]
    regenerated = [captioner.decode(ids) for ids in captioner.decoder.generate(features, beams=1)]
    expected = [_bpe_decoder().decode([t for t in encoder.tokenizer([c])[0].tolist() if t not in (0, 49406, 49407)]).strip()
                for c in CAPTIONS]  # open_clip's normalisation: lower case, one space between words
    assert regenerated == expected
    beamed = [captioner.decode(ids) for ids in captioner.decoder.generate(features, beams=3)]
    assert beamed == expected


def test_memory_projection_is_a_convex_combination_of_memory_rows():
    memory = torch.eye(4)
    features = torch.tensor([[0.9, 0.3, -0.2, 0.1], [-1.0, -1.0, -1.0, 0.2]])
    out = project_to_memory(features, memory, tau=0.5)
    assert torch.all(out >= 0) and torch.allclose(out.norm(dim=-1), torch.ones(2))  # in the cone of the rows
    sharp = project_to_memory(features, memory, tau=1e-4)
    assert torch.allclose(sharp, torch.eye(4)[[0, 3]], atol=1e-6)  # tau -> 0: the nearest row


def test_noise_injection_has_the_stated_variance():
    torch.manual_seed(0)
    d, variance = 256, 0.016
    x = F.normalize(torch.randn(1, d), dim=-1).expand(20000, -1)
    noisy = inject_noise(x, variance, torch.Generator().manual_seed(1))
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(20000), atol=1e-5)
    # before re-normalisation ||x + n||^2 = 1 + d * variance on average: the kept component shrinks by it
    along = (noisy * x).sum(dim=-1)
    assert along.mean().item() == pytest.approx((1 + d * variance) ** -0.5, rel=0.02)
    residual = noisy - along[:, None] * x
    per_coordinate = residual.pow(2).sum(dim=-1).mean().item() / (d - 1) * (1 + d * variance)
    assert per_coordinate == pytest.approx(variance, rel=0.05)


def test_metrics_on_hand_checked_cases():
    refs = {"1": ["a red wool coat by acme", "red coat"], "2": ["blue jeans with a logo on the pocket"]}
    same = caption_metrics({"1": "a red wool coat by acme", "2": "blue jeans with a logo on the pocket"}, refs,
                           spice=False)["metrics"]
    assert same["BLEU-1"] == same["BLEU-4"] == same["ROUGE-L"] == 100.0 and same["METEOR"] == pytest.approx(100, abs=1)
    disjoint = caption_metrics({"1": "zebra piano", "2": "quantum orbit"}, refs, spice=False)["metrics"]
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in disjoint.values())
    unscored = caption_metrics({"1": "red coat", "3": "a hat"}, {**refs, "3": ["  "]}, spice=False)
    assert unscored["not_scored"] == ["3"] and unscored["scored"] == 1
    assert coco_results({"1": "red coat"}) == [{"image_id": "1", "caption": "red coat"}]


def test_without_java_the_java_metrics_are_skipped_and_the_rest_reported(monkeypatch):
    import e2_eval.captions as captions

    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    result = caption_metrics({"1": "a red coat."}, {"1": ["A red coat!"]})
    assert "METEOR" not in result["metrics"] and result["metrics"]["BLEU-1"] == pytest.approx(100.0)
    assert any(n.startswith("METEOR skipped: it needs Java") for n in result["notes"])
    assert any("regex tokenisation (no Java" in n for n in result["notes"])


def test_awkward_captions_train_and_a_decoder_for_another_encoder_is_refused(tiny_checkpoints, tmp_path):
    e2, clip = (e2_core.load_encoder(tiny_checkpoints[k]) for k in ("e2", "clip"))
    awkward = ["", "long " * 300, "café crème — 日本の服", "a coat"]
    captioner = METHODS["decap"](e2, DecoderConfig(**SMALL))
    captioner.fit(awkward, _features(e2, awkward), epochs=1, progress=False)
    assert len(captioner.caption_features(_features(e2, ["a coat"]))) == 1
    path = captioner.save(tmp_path / "decap.safetensors")
    again = METHODS["decap"](e2).load(path)
    assert again.caption_features(_features(e2, ["a coat"])) == captioner.caption_features(_features(e2, ["a coat"]))
    with pytest.raises(CaptionerMismatch, match=rf"trained for the encoder {tiny_checkpoints['e2']} .* not for "
                                                rf"{tiny_checkpoints['clip']}"):
        METHODS["decap"](clip).load(path)


def test_caption_text_prefers_the_description():
    assert caption_text({"description": " A  red coat. ", "brand": "Acme"}) == "A red coat."
    assert caption_text({"title": "Jeans", "brand": "Acme"}) == "Jeans"


def test_caption_task_side_by_side_with_page(data_root, tiny_checkpoints, tmp_path, capsys):
    from e2_plugins.cli import main

    out = tmp_path / "out"
    assert main(["run", "caption", "--data-root", data_root, "--encoder", tiny_checkpoints["e2"], "--baseline",
                 tiny_checkpoints["clip"], "--method", "decap", "--epochs", "1", "--max-images", "8", "--page-images", "3", "--out",
                 str(out), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "BLEU-4" in printed and "CIDEr" in printed and "SPICE skipped" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["encoders"]) == {f"E2 ({tiny_checkpoints['e2']})", f"CLIP ({tiny_checkpoints['clip']})"}
    scores = results["encoders"][f"E2 ({tiny_checkpoints['e2']})"]["methods"]["decap"]
    assert scores["scored"] == 8 and {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(scores["metrics"])
    predictions = json.loads(next(out.glob("captions-e2-*-decap.json")).read_text())
    assert len(predictions) == 8 and set(predictions[0]) == {"image_id", "caption"}
    page = (out / "captions.html").read_text()
    assert page.count('class="item"') == 3 and "References:" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:  # looked at in a real headless browser: it renders the images
        shot = tmp_path / "page.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=900,700", (out / "captions.html").as_uri()], capture_output=True, timeout=120)
        from PIL import Image
        assert shot.is_file() and Image.open(shot).convert("L").getextrema()[0] < 200


def test_capdec_on_a_local_language_model_uses_its_tokenizer(tiny_checkpoints, tiny_hf_models, tmp_path):
    encoder = e2_core.load_encoder(tiny_checkpoints["e2"])
    texts = ["a red wool dress", "a blue cotton shirt with logo"]
    config = DecoderConfig(prefix_length=2, mapper="transformer", mapper_layers=1, max_tokens=8,
                           language_model=str(tiny_hf_models / "rewriter"))
    captioner = METHODS["capdec"](encoder, config)
    captioner.fit(texts, _features(encoder, texts), epochs=2, progress=False)
    assert captioner.vocab.kind == "hf" and captioner.config.vocab_size == len(captioner.vocab.tokenizer)
    captions = captioner.caption_features(_features(encoder, texts))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    again = METHODS["capdec"](encoder).load(captioner.save(tmp_path / "capdec.safetensors"))
    assert again.caption_features(_features(encoder, texts)) == captions


@pytest.mark.parametrize("option, value, message", [("beams", 0, "beams=0: must be >= 1"),
                                                      ("epochs", 0, "epochs=0: must be >= 1"),
                                                      ("max_images", -3, "max_images=-3: must be >= 0"),
                                                      ("page_images", -1, "page_images=-1: must be >= 0"),
                                                      ("decoder", "large", "decoder='large': one of demo, paper"),
                                                      ("language_model", "no-gpt2", "no-gpt2: no such model folder")])
def test_caption_refuses_counts_out_of_range_before_any_work(option, value, message, tmp_path):
    from e2_caption import caption

    with pytest.raises((ValueError, OSError), match=message):
        caption(encoder="nope:xx", out=tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("written", ["100% cotton, relaxed-fit.", "men's o'hara red/white coat (slim) #12",
                                     "55% linen, 45% cotton; 1.5 cm hem", "kestrel & co wool-blend coat.",
                                     "dürer/lenz ss'24 crop tee"])
def test_a_caption_reads_as_written_after_the_bpe_round_trip(written):
    """open_clip's decoder writes "100%" as "1 0 0 %" and "relaxed-fit" as "relaxed - fit": every score was
    too low. The decoder's text is written back as text (the BPE lower-cases)."""
    import open_clip
    from e2_caption.vocab import BPEVocab

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    vocab = BPEVocab.from_captions(tokenizer, [written])
    ids, mask = vocab.encode([written], max_tokens=40)
    assert vocab.decode(ids[0][mask[0]].tolist()) == written


def test_decoders_belong_to_their_training_captions_and_say_so(tiny_checkpoints, tmp_path, caplog, monkeypatch):
    """A decoder is keyed by its encoder and its training captions: pointed at another dataset the task trains
    one (said in one line) instead of reusing one that writes the other dataset's products; results.json
    records each decoder, what it learnt from and the tokenisation; the references are written in COCO's
    format. Few training captions get more epochs, up to min_steps optimizer steps (said)."""
    from other_data import write_catalog
    from e2_caption import caption

    first = write_catalog(tmp_path / "first", train=20, validation=6, seed=1)
    second = write_catalog(tmp_path / "second", train=20, validation=6, seed=2)
    options = dict(dataset="catalog", encoder=tiny_checkpoints["e2"], baseline=tiny_checkpoints["clip"],
                   method=["decap"], min_steps=12, page_images=0, device="cpu", progress=False,
                   decoders=tmp_path / "decoders")
    caption(data_root=str(first), out=tmp_path / "a", **options)
    assert "20 training captions: 3 epochs would be 3 optimizer steps, too few to learn to write; training 12 " \
           "epochs (12 steps, min_steps)" in caplog.text
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    entry = next(iter(results["encoders"].values()))["methods"]["decap"]
    assert entry["trained_on"]["captions"] == 20 and entry["trained_on"]["epochs"] == 12
    assert Path(entry["decoder"]).is_file() and entry["notes"][0].startswith("tokenised with")
    references = json.loads(Path(results["references"]).read_text())
    assert len(references["images"]) == 6 and {"image_id", "id", "caption"} <= set(references["annotations"][0])
    caplog.clear()
    caption(data_root=str(second), out=tmp_path / "b", **options)
    assert "were trained on other captions or settings" in caplog.text and "training one on these" in caplog.text
    assert len(list((tmp_path / "decoders").glob("decap-*.safetensors"))) == 4  # 2 encoders x 2 datasets
    caplog.clear()
    caption(data_root=str(second), out=tmp_path / "c", **options)  # the same captions again: reused, silently
    assert "training" not in caplog.text
    caption(data_root=str(second), out=tmp_path / "d", seed=1, **options)  # another seed: another decoder
    assert "trained on other captions or settings" in caplog.text
    assert len(list((tmp_path / "decoders").glob("decap-*.safetensors"))) == 6
    entry = next(iter(json.loads((tmp_path / "d" / "results.json").read_text())["encoders"].values()))
    assert entry["methods"]["decap"]["trained_on"]["seed"] == 1
    assert entry["methods"]["decap"]["trained_on"]["preset"] == "demo"
    # the same preset name with other values (a release that changes the demo decoder): other decoders
    from dataclasses import replace
    caplog.clear()
    made = METHODS["decap"].preset("demo")
    monkeypatch.setattr(METHODS["decap"], "preset", classmethod(
        lambda cls, name: replace(made, config=replace(made.config, max_tokens=20))))
    caption(data_root=str(second), out=tmp_path / "e", seed=1, **options)
    assert "trained on other captions or settings" in caplog.text
    assert len(list((tmp_path / "decoders").glob("decap-*.safetensors"))) == 8


def test_vocabulary_coverage_counts_the_tokens_whose_embedding_row_is_zero(tiny_checkpoints):
    encoder = e2_core.load_encoder(tiny_checkpoints["clip"])
    texts = ["a trench coat", "a red coat", "trench"]
    unread = [int(t) for t in encoder.tokenizer(["trench"])[0][1:] if int(t) not in (0, 49407)]
    with torch.no_grad():
        encoder.model.token_embedding.weight[unread] = 0
    ids = [int(t) for row in encoder.tokenizer(texts) for t in row if int(t) not in (0, 49406, 49407)]
    coverage = encoder.vocabulary_coverage(texts)
    assert coverage["tokens"] == len(ids) and coverage["distinct"] == len(set(ids))
    assert coverage["unembedded"] == 2 * len(unread) and coverage["unembedded_distinct"] == len(unread)
    assert coverage["share"] == round(2 * len(unread) / len(ids), 4) and coverage["words"] == ["trench"]


def test_an_encoder_blind_to_the_captions_words_is_warned_about_once_and_recorded(tiny_checkpoints, tmp_path, caplog):
    """A checkpoint whose token-embedding rows of some of the training captions' words are zero (as the compact
    demo encoders' are outside the synthetic products' words): one warning naming it, the share and the words,
    what it means and what to do; the coverage of each encoder in results.json."""
    from other_data import write_catalog
    from e2_caption import caption

    clip = e2_core.load_encoder(tiny_checkpoints["clip"])
    blind = {int(t) for word in ("trench", "kestrel") for t in clip.tokenizer([word])[0][1:]} - {0, 49407}
    with torch.no_grad():
        clip.model.token_embedding.weight[sorted(blind)] = 0
    zeroed = str(clip.save_pretrained(tmp_path / "zeroed"))
    root = write_catalog(tmp_path / "catalog", train=40, validation=4)
    caption(dataset="catalog", data_root=str(root), encoder=tiny_checkpoints["e2"], baseline=zeroed, method=["decap"],
            epochs=1, min_steps=1, out=tmp_path / "out", page_images=0, device="cpu", progress=False)
    warnings = [r.getMessage() for r in caplog.records if "has no embedding" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"CLIP ({zeroed}) ({zeroed}) has no embedding for ")
    assert "'Kestrel'" in warnings[0] or "'trench'" in warnings[0]
    for said in ("look the same to this encoder", f"e2-plugins train --method clip-ft --pretrained {zeroed} "
                 f"--dataset catalog --data-root {root}", "--baseline", "a CLIP with a full vocabulary"):
        assert said in warnings[0]
    encoders = json.loads((tmp_path / "out" / "results.json").read_text())["encoders"]
    coverage = encoders[f"CLIP ({zeroed})"]["vocabulary_coverage"]
    assert 0 < coverage["share"] < 1 and coverage["unembedded_distinct"] == len(blind)
    assert set(coverage["words"]) <= {"Kestrel", "trench"}
    assert encoders[f"E2 ({tiny_checkpoints['e2']})"]["vocabulary_coverage"]["unembedded"] == 0


def test_the_demo_encoders_read_every_word_of_the_synthetic_products(data_root, tmp_path, caplog):
    from e2_caption import caption

    caption(data_root=data_root, method=["decap"], epochs=1, min_steps=1, max_images=2, out=tmp_path / "out",
            page_images=0, device="cpu", progress=False)
    assert "has no embedding" not in caplog.text
    encoders = json.loads((tmp_path / "out" / "results.json").read_text())["encoders"]
    assert set(encoders) == {"CLIP-FT", "E2"}
    for entry in encoders.values():
        assert entry["vocabulary_coverage"]["tokens"] > 0 and entry["vocabulary_coverage"]["unembedded"] == 0


def test_the_demo_decoders_learn_whole_captions_and_may_write_them_whole(tiny_checkpoints):
    """A catalog's descriptions run to 35-45 tokens: the demo preset keeps each training caption whole (CapDec's
    length rule, not a fixed 20 tokens) and generates up to 64, so no caption is cut before its end."""
    encoder = e2_core.load_encoder(tiny_checkpoints["e2"])
    long = [f"Kestrel & Co relaxed-fit wrap dress in red, white, 100% wool; SS'24 collection, style #{i}."
            for i in range(4)]                                      # (the tiny tokenizer holds 30 tokens at most)
    captioner = METHODS["decap"](encoder, DecoderConfig(layers=1, heads=2, width=64))
    seen = []
    captioner.build(long, _features(encoder, long))
    loss = captioner.decoder.loss
    captioner.build = lambda captions, features: captioner.decoder
    captioner.decoder.loss = lambda inputs, tokens, mask, smoothing: seen.append(mask) or loss(inputs, tokens, mask,
                                                                                                smoothing)
    captioner.fit(long, _features(encoder, long), epochs=1, batch_size=4, progress=False)
    lengths = [len([t for t in row.tolist() if t not in (0, 49406, 49407)]) for row in encoder.tokenizer(long)]
    assert min(lengths) > 20 and seen[0].sum(dim=1).tolist() == [n + 1 for n in lengths]   # every token and the end
    assert captioner.max_tokens == 64
