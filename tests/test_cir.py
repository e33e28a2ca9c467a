"""Composed image retrieval: the FashionIQ harness (layouts, protocol, bad input) and the methods."""
import json
import shutil

import pytest
import torch
from PIL import Image

import e2_core
from e2_core.data import DataError
from e2_data.synthetic import write_fashioniq
from e2_core.data.fashioniq import load_fashioniq
from e2_eval.fashioniq import compose, composed_recall, summarize
from e2_cir.methods import METHODS, NetworkMismatch, QueryBatch, TrainData, load_network, save_network
from e2_cir.phrases import keyword_phrases, mask_phrase


@pytest.fixture(scope="module")
def fiq(tmp_path_factory):
    root = tmp_path_factory.mktemp("fiq")
    write_fashioniq(root, triplets_per_category=3, distractors=1)
    return root


def test_both_public_layouts_are_read(fiq, tmp_path):
    searle = load_fashioniq(fiq, "dress", "val")
    assert searle.layout == "captions" and len(searle.triplets) == 3 and len(searle.gallery) >= 6
    # Pic2Word's layout: json/ instead of captions/, under a fashion-iq/ folder, .jpg images as FashionIQ ships them
    other = tmp_path / "data" / "fashion-iq"
    shutil.copytree(fiq / "image_splits", other / "image_splits")
    shutil.copytree(fiq / "captions", other / "json")
    (other / "images").mkdir()
    for png in (fiq / "images").glob("*.png"):
        Image.open(png).convert("RGB").save(other / "images" / f"{png.stem}.jpg")
    pic2word = load_fashioniq(tmp_path / "data", "dress", "val")
    assert pic2word.layout == "json" and pic2word.triplets == searle.triplets and pic2word.gallery == searle.gallery
    assert pic2word.image_path(searle.gallery[0]).suffix == ".jpg"


def test_recall_on_hand_made_features_with_known_ranks():
    gallery = torch.eye(4)
    names = ["a", "b", "c", "d"]
    queries = torch.tensor([[1.0, 0, 0, 0],     # target a: rank 0
                            [0.9, 0.5, 0, 0],   # target b: a scores higher -> rank 1
                            [0.5, 0, 0.5, 0],   # target c ties with a; the lower gallery index (a) first -> rank 1
                            [0, 0, 0, 0.1],     # target d: rank 0
                            [1.0, 0, 0, 0]])    # target e: not in the gallery -> not scored, not a miss
    result = composed_recall(queries, gallery, names, ["a", "b", "c", "d", "e"], ks=(1, 2))
    assert result["ranks"] == [0, 1, 1, 0]
    assert result["R@1"] == 50.0 and result["R@2"] == 100.0 and result["queries"] == 4
    assert result["not_scored"] == ["e: not in the gallery"] and result["trivial"] == []
    assert composed_recall(queries, gallery, names, ["a", "b"], ks=(1, 4, 10))["trivial"] == ["R@4", "R@10"]
    twice = composed_recall(queries[:1], torch.eye(4)[[0, 0, 1, 2]], ["a", "a", "b", "c"], ["a"])
    assert twice["queries"] == 0 and twice["not_scored"] == ["a: 2 times in the gallery"]
    assert summarize({"dress": {"R@10": 10.0, "R@50": 40.0}, "shirt": {"R@10": 20.0, "R@50": 60.0}}) == \
        {"mean R@10": 15.0, "mean R@50": 50.0}


def test_conventions_are_the_methods_own():
    c = ("is red.", "has a logo?")
    assert compose("searle", c) == ["a photo of $ that is red and has a logo", "a photo of $ that has a logo and is red"]
    assert compose("pic2word", c) == ["a photo of $ , has a logo? and is red."]
    assert compose("cirevl", c) == ["is red and has a logo"]
    with pytest.raises(ValueError, match="unknown prompt convention 'x'"):
        compose("x", c)


def test_bad_input_is_reported_not_hidden(fiq, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(fiq, root)
    triplets = json.loads((root / "captions" / "cap.shirt.val.json").read_text())
    (root / "images" / f"{triplets[0]['target']}.png").unlink()
    data = load_fashioniq(root, "shirt", "val")
    assert len(data.triplets) == 2 and data.dropped[0].startswith(f"{triplets[0]['candidate']} -> ")
    assert data.missing_images == [triplets[0]["target"]]
    (root / "captions" / "cap.dress.val.json").write_text('[{"candidate": "x", "target": "y", "captions": ["a"]}]')
    with pytest.raises(DataError, match=r"cap\.dress\.val\.json: entry 0: \"captions\" must be a list of two"):
        load_fashioniq(root, "dress", "val")
    (root / "captions" / "cap.dress.val.json").write_text('[{"candidate": "x",')
    with pytest.raises(DataError, match=r"cap\.dress\.val\.json:1:\d+: malformed JSON"):
        load_fashioniq(root, "dress", "val")
    with pytest.raises(ValueError, match="unknown FashionIQ category 'shoes'"):
        load_fashioniq(root, "shoes", "val")
    with pytest.raises(ValueError, match="unknown FashionIQ split 'dev'"):
        load_fashioniq(root, "dress", "dev")
    with pytest.raises(DataError, match="no captions/cap.dress.val.json or json/cap.dress.val.json"):
        load_fashioniq(tmp_path / "nowhere", "dress", "val")



@pytest.mark.parametrize("option, value, message", [
    ("batch_size", 0, "batch_size=0: must be >= 1"), ("figure_queries", -2, "figure_queries=-2: must be >= 0"),
    ("option", ["searle.steps=3"], "searle has no setting 'steps'; its settings are oti_steps"),
    ("option", ["lincir.epochs=two"], r"option='lincir.epochs=two': epochs takes a int \(default"),
    ("option", ["epochs=2"], "write METHOD.NAME=VALUE"),
    ("network", ["lincir"], "write METHOD=FILE"), ("network", ["image=x.pt"], "image trains no network"),
    ("network", ["lincir=missing.pt"], "no such file missing.pt"),
    ("train_images", "nowhere", "nowhere: no such folder of images"),
    ("train_captions", "none.txt", "none.txt: no such caption file")])
def test_cir_refuses_counts_out_of_range_before_any_work(option, value, message, tmp_path):
    from e2_cir import cir

    with pytest.raises((ValueError, OSError), match=message):
        cir(dataset="fashioniq", data_root=str(tmp_path / "nowhere"), out=tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()

def test_keyword_phrases_and_masking():
    assert keyword_phrases("is made of checked wool and has the Arlo logo") == ["checked wool", "Arlo logo"]
    assert keyword_phrases("is red instead of navy") == ["red", "navy"]
    assert mask_phrase("has the Arlo logo on the hem", "Arlo logo") == "has the $ on the hem"
    assert METHODS["lincir"].mask("is beige instead of navy") == "is $ instead of $"


@pytest.mark.parametrize("caption, phrases, masked", [
    ("has the Kestrel & Co logo on the hem", ["Kestrel & Co logo", "hem"], "has the $ on the $"),
    ("is red, white and 100% wool", ["red, white", "100% wool"], "is $ and $"),
    ("is a Dürer/Lenz relaxed-fit coat", ["Dürer/Lenz relaxed-fit coat"], "is a $"),
    ("is O'Hara's SS'24 style", ["O'Hara's SS'24 style"], "is $"),
    ("", [], ""),
])
def test_phrases_are_written_as_the_caption_writes_them_so_they_can_be_masked(caption, phrases, masked):
    """Names with &, commas, slashes, digits, apostrophes and accents: a phrase is the caption's own text
    (it was rejoined with spaces, "Kestrel Co", which no caption holds, and SEARLE's regulariser then
    encoded a caption without its pseudo word)."""
    from e2_cir.phrases import Vocabulary

    assert keyword_phrases(caption) == phrases
    assert all(mask_phrase(caption, p) != caption for p in phrases)
    assert METHODS["lincir"].mask(caption) == masked
    assert mask_phrase("a Kestrel & Coats coat", "Kestrel & Co") == "a Kestrel & Coats coat"  # not inside a word
    vocabulary = Vocabulary([caption, "is navy"])
    assert all("$" in mask_phrase(c, p) for p in vocabulary.phrases for c in vocabulary.captions[p])


def _train_and_queries(encoder, fiq):
    from e2_eval.fashioniq import embed_names

    splits = [load_fashioniq(fiq, c, "train") for c in ("dress", "shirt", "toptee")]
    train = TrainData(torch.cat([embed_names(encoder, d.gallery, d, normalize=False) for d in splits]),
                      [c for d in splits for t in d.triplets for c in t.captions])
    val = load_fashioniq(fiq, "dress", "val")
    refs = embed_names(encoder, [t.reference for t in val.triplets], val, normalize=False)
    return train, val, refs


SMALL = {"pic2word": dict(epochs=2), "searle": dict(oti_steps=3, epochs=2), "lincir": dict(epochs=2)}


@pytest.mark.parametrize("kind", ["e2", "clip"])
def test_every_method_gives_normalised_queries_with_either_encoder(kind, fiq, tiny_checkpoints):
    encoder = e2_core.load_encoder(tiny_checkpoints[kind])
    train, val, refs = _train_and_queries(encoder, fiq)
    for name, method_class in METHODS.items():
        method = method_class(**SMALL.get(name, {}))
        method.prepare(encoder, train)
        method.fit(encoder, train, progress=False)
        batch = QueryBatch([t.reference for t in val.triplets], refs,
                           [compose(method.convention, t.captions) for t in val.triplets],
                           [t.captions for t in val.triplets], "dress", val.load_image)
        queries = method.queries(encoder, batch)
        assert queries.shape == (3, encoder.embed_dim), name
        assert torch.allclose(queries.norm(dim=-1), torch.ones(3), atol=1e-5), name
    assert torch.equal(METHODS["image"]().queries(encoder, batch), torch.nn.functional.normalize(refs, dim=-1))


def test_pic2word_learns_to_invert_images(fiq, tiny_checkpoints):
    """Trained on images only, the pseudo-word prompts match their own images better (InfoNCE falls)."""
    from e2_cir.methods.base import info_nce

    encoder = e2_core.load_encoder(tiny_checkpoints["e2"])
    train, _, _ = _train_and_queries(encoder, fiq)
    method = METHODS["pic2word"](epochs=1, lr=1e-3)

    def loss():
        with torch.no_grad():
            text = method.encode_texts(encoder, ["a photo of $"] * len(train.image_features),
                                       method.network(train.image_features))
        return info_nce(train.image_features, text, 0.07).item()

    method.fit(encoder, train, progress=False)
    before = loss()
    method.options["epochs"] = 40
    method.fit(encoder, train, progress=False)
    assert loss() < before - 0.1


def test_a_network_made_for_another_encoder_is_refused(fiq, tiny_checkpoints, tmp_path):
    e2, clip = (e2_core.load_encoder(tiny_checkpoints[k]) for k in ("e2", "clip"))
    train, _, _ = _train_and_queries(e2, fiq)
    method = METHODS["lincir"](epochs=1)
    method.fit(e2, train, progress=False)
    path = save_network(method, e2, tmp_path / "lincir.safetensors")
    again = METHODS["lincir"]()
    load_network(again, e2, path)
    assert all(torch.equal(a, b) for a, b in zip(method.network.state_dict().values(),
                                                  again.network.state_dict().values()))
    with pytest.raises(NetworkMismatch, match=rf"trained for the encoder {tiny_checkpoints['e2']} .* not for "
                                              rf"{tiny_checkpoints['clip']}"):
        load_network(METHODS["lincir"](), clip, path)
    with pytest.raises(NetworkMismatch, match="holds a lincir network, not a searle one"):
        load_network(METHODS["searle"](), e2, path)


def test_cir_task_side_by_side_with_json_and_figures(fiq, tiny_checkpoints, tmp_path, capsys):
    from e2_plugins.cli import main

    out = tmp_path / "out"
    args = ["run", "cir", "--data-root", str(fiq), "--encoder", tiny_checkpoints["e2"], "--baseline",
            tiny_checkpoints["clip"], "--method", "image", "text", "cirevl", "--category", "dress", "shirt",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "conventions: image cirevl, text cirevl, cirevl cirevl" in printed and "Recall@10 / Recall@50" in printed
    results = json.loads((out / "results.json").read_text())
    scores = results["encoders"][f"E2 ({tiny_checkpoints['e2']})"]["methods"]["cirevl"]
    assert set(scores) == {"dress", "shirt", "mean R@10", "mean R@50", "notes"} and scores["dress"]["queries"] == 3
    assert scores["notes"] == {"rewriter_prompt": "built in"}
    assert scores["mean R@10"] == pytest.approx((scores["dress"]["R@10"] + scores["shirt"]["R@10"]) / 2)
    assert Image.open(out / "cir-cirevl.png").size[0] > 400
    assert main(["run", "cir", "--dataset", "fashioniq"]) == 2
    assert "dataset 'fashioniq' needs --data-root" in capsys.readouterr().err
    assert main([*args, "--method", "searle", "--convention", "cirevl"]) == 2
    assert "gives no place for the reference image" in capsys.readouterr().err


def test_cirevl_takes_local_hugging_face_captioners_and_rewriters(fiq, tiny_checkpoints, tiny_hf_models):
    from e2_cir.methods.cirevl import HFCaptioner, HFRewriter

    encoder = e2_core.load_encoder(tiny_checkpoints["e2"])
    train, val, refs = _train_and_queries(encoder, fiq)
    method = METHODS["cirevl"](captioner=f"hf:{tiny_hf_models / 'captioner'}",
                               rewriter=f"hf:{tiny_hf_models / 'rewriter'}")
    method.prepare(encoder, train)
    batch = QueryBatch([t.reference for t in val.triplets], refs, [compose("cirevl", t.captions) for t in val.triplets],
                       [t.captions for t in val.triplets], "dress", val.load_image)
    captions = HFCaptioner(str(tiny_hf_models / "captioner"))([val.load_image(n) for n in batch.reference_names])
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    queries = method.queries(encoder, batch)
    assert queries.shape == (3, encoder.embed_dim)
    rewriter = HFRewriter(str(tiny_hf_models / "rewriter"))
    expected = [method.rewrite(c, p[0]) for c, p in zip(captions, batch.prompts)]
    assert method.last_texts == expected and all(expected)
    assert rewriter("a photo of red")  # the continuation of a greedy decode
    with pytest.raises(ValueError, match=r"rewriter='gpt-4': use template or hf:PATH"):
        METHODS["cirevl"](rewriter="gpt-4")


def test_cirevl_captions_with_a_decoder_of_the_caption_task(fiq, tiny_checkpoints, tmp_path):
    from e2_caption import METHODS as CAPTIONERS
    from e2_caption.captioner import CaptionerMismatch
    from e2_caption.decoder import DecoderConfig

    e2, clip = (e2_core.load_encoder(tiny_checkpoints[k]) for k in ("e2", "clip"))
    train, val, refs = _train_and_queries(e2, fiq)
    texts = ["a red wool dress", "a blue cotton shirt with a logo"]
    with torch.no_grad():
        features = e2.encode_text(e2_core.trim_padding(e2.tokenizer(texts)), normalize=True)
    decap = CAPTIONERS["decap"](e2, DecoderConfig(layers=1, heads=2, width=32, max_tokens=12))
    decap.fit(texts, features, epochs=2, progress=False)
    path = decap.save(tmp_path / "decap.safetensors")
    method = METHODS["cirevl"](captioner=str(path))
    method.prepare(e2, train)
    batch = QueryBatch([t.reference for t in val.triplets], refs, [compose("cirevl", t.captions) for t in val.triplets],
                       [t.captions for t in val.triplets], "dress", val.load_image)
    method.queries(e2, batch)
    assert method.last_texts == [method.rewrite(c, p[0]) for c, p in zip(decap.caption_features(refs), batch.prompts)]
    with pytest.raises(CaptionerMismatch, match="was trained for the encoder"):
        METHODS["cirevl"](captioner=str(path)).prepare(clip, train)


def test_gallery_cache_is_safetensors_and_a_broken_one_is_recomputed(tmp_path, tiny_checkpoints):
    from e2_eval.fashioniq import embed_names

    root = tmp_path / "fiq"
    write_fashioniq(root, triplets_per_category=2, seed=0, splits=("val",))
    data = load_fashioniq(root, "dress", "val")
    encoder = e2_core.load_encoder(tiny_checkpoints["e2"])
    names = data.gallery[:3]
    first = embed_names(encoder, names, data, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("images-*.safetensors")
    cache.write_bytes(b"not safetensors")
    assert torch.equal(embed_names(encoder, names, data, cache_dir=tmp_path / "cache"), first)
    assert cache.read_bytes() != b"not safetensors"  # replaced


def test_every_method_scores_on_a_fashioniq_folder_of_another_writer(tiny_checkpoints, tmp_path, capsys):
    """Another vocabulary (names with &, /, commas, digits, accents, an empty caption), 60 gallery images per
    category: every method trains and is scored (SEARLE and LinCIR failed on such captions: a phrase rejoined
    with spaces could not be masked, and "$)" was one token); LinCIR keeps every caption, as its code does."""
    from other_data import write_fashioniq as write_other
    from e2_plugins.cli import main

    root = write_other(tmp_path / "fiq", gallery=60, triplets=8)
    out = tmp_path / "out"
    assert main(["run", "cir", "--dataset", "fashioniq", "--data-root", str(root), "--encoder", tiny_checkpoints["e2"],
                 "--baseline", tiny_checkpoints["clip"], "--out", str(out), "--device", "cpu", "--no-progress",
                 "--figure-queries", "0", "--option", "searle.oti_steps=3", "searle.epochs=2"]) == 0, \
        capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert not results["failed"]
    for entry in results["encoders"].values():
        assert set(entry["methods"]) == set(METHODS)
        assert all(entry["methods"][m]["mean R@10"] is not None for m in METHODS)
        lincir = entry["methods"]["lincir"]["notes"]
        assert lincir["captions_left_out"]["count"] == 0 and lincir["captions_left_out"]["of"] > 20
        assert lincir["masked"]["random_word"] >= 1  # the empty caption and those without a run: a word masked


def test_methods_train_on_an_image_folder_and_a_caption_file_and_say_what_they_used(fiq, tiny_checkpoints,
                                                                                     tmp_path, capsys):
    """The originals' training data kinds: unlabeled images (Pic2Word) and a caption corpus (LinCIR, CC3M's
    tab-separated caption/url file); each network is saved with what it was trained on, reused only for the same
    data and settings, and a given network file is used as it is."""
    from e2_plugins.cli import main

    folder = tmp_path / "unlabeled"
    (folder / "sub").mkdir(parents=True)
    for i, png in enumerate(sorted((fiq / "images").glob("*.png"))[:9]):
        shutil.copy(png, folder / ("sub" if i % 2 else ".") / png.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    corpus = tmp_path / "captions.tsv"
    corpus.write_text("caption\turl\n" + "".join(f"a {c} dress by Kestrel & Co, size 1{i}/2\thttp://x/{i}.jpg\n"
                                                 for i, c in enumerate(["red", "navy blue", "café-au-lait"] * 4)))
    out = tmp_path / "out"

    def run(methods=("pic2word", "lincir")):
        args = ["run", "cir", "--data-root", str(fiq), "--encoder", tiny_checkpoints["e2"], "--baseline",
                tiny_checkpoints["clip"], "--method", *methods, "--category", "dress", "--train-images", str(folder),
                "--train-captions", str(corpus), "--option", *[f"{m}.epochs=1" for m in methods], "--out", str(out),
                "--device", "cpu", "--no-progress", "--figure-queries", "0"]
        assert main(args) == 0, capsys.readouterr().err
        return json.loads((out / "results.json").read_text())["encoders"]

    first = run()
    assert "broken.jpg" in capsys.readouterr().err  # the unreadable image is named, and left out
    for entry in first.values():
        pic2word = entry["methods"]["pic2word"]["notes"]["network"]
        lincir = entry["methods"]["lincir"]["notes"]["network"]
        assert pic2word["trained_now"] and lincir["trained_now"]
        assert pic2word["trained_on"]["images"] == str(folder) and pic2word["trained_on"]["image_count"] == 9
        assert pic2word["trained_on"]["images_left_out"] == 1
        assert lincir["trained_on"]["captions"] == str(corpus) and lincir["trained_on"]["caption_count"] == 12
    again = run()  # same data and settings: the saved networks, with what they were trained on
    for label, entry in again.items():
        network = entry["methods"]["lincir"]["notes"]["network"]
        assert "trained_now" not in network and network["file"] == first[label]["methods"]["lincir"]["notes"][
            "network"]["file"]
        assert network["trained_on"]["captions"] == str(corpus)
    saved = first[next(iter(first))]["methods"]["lincir"]["notes"]["network"]["file"]
    corpus.write_text("caption\nanother corpus, another network\n")
    other = run(["lincir"])  # other captions: trained anew
    assert all(e["methods"]["lincir"]["notes"]["network"].get("trained_now") for e in other.values())
    # a given file is used as it is; one made for the other encoder is refused by name, the other encoder scores
    assert main(["run", "cir", "--data-root", str(fiq), "--encoder", tiny_checkpoints["e2"], "--baseline",
                 tiny_checkpoints["clip"], "--method", "lincir", "--category", "dress", "--network",
                 f"lincir={saved}", "--out", str(tmp_path / "given"), "--device", "cpu", "--no-progress",
                 "--figure-queries", "0"]) == 2
    err = capsys.readouterr().err
    assert "was trained for the encoder" in err
    given = json.loads((tmp_path / "given" / "results.json").read_text())
    assert len(given["failed"]) == 1
    scored = [e for e in given["encoders"].values() if "lincir" in e["methods"]]
    assert len(scored) == 1 and scored[0]["methods"]["lincir"]["notes"]["network"]["file"] == saved


def test_caption_files_and_image_folders_are_read_or_refused_by_name(tmp_path):
    from e2_core.data.base import image_files, read_captions

    (tmp_path / "a.txt").write_text("one\n\n  two  \n")
    (tmp_path / "coco.json").write_text(json.dumps({"annotations": [{"caption": "x & y"}, {"caption": " "}]}))
    (tmp_path / "list.json").write_text(json.dumps(["a", {"caption": "b"}]))
    (tmp_path / "cc3m.tsv").write_text("a 100% wool coat\thttp://x\nsize 10/12, navy\thttp://y\n")
    (tmp_path / "t.csv").write_text("url,caption\nhttp://x,\"red, white\"\n")
    assert read_captions(tmp_path / "a.txt") == ["one", "two"]
    assert read_captions(tmp_path / "coco.json") == ["x & y"]
    assert read_captions(tmp_path / "list.json") == ["a", "b"]
    assert read_captions(tmp_path / "cc3m.tsv") == ["a 100% wool coat", "size 10/12, navy"]
    assert read_captions(tmp_path / "t.csv") == ["red, white"]
    (tmp_path / "bad.json").write_text('{"annotations": [{"text": "x"}]}')
    with pytest.raises(DataError, match=r"bad\.json: every item must be a string or an object with a \"caption\""):
        read_captions(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('["a",')
    with pytest.raises(DataError, match=r"broken\.json:1:\d+: malformed JSON"):
        read_captions(tmp_path / "broken.json")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match=r"empty\.txt: no captions in it"):
        read_captions(tmp_path / "empty.txt")
    with pytest.raises(DataError, match=r"x\.parquet: not a caption file"):
        (tmp_path / "x.parquet").write_bytes(b"")
        read_captions(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no image files"):
        image_files(tmp_path)
