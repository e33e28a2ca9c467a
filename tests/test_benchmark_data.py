"""The data the E2-vs-CLIP-FT benchmarks train and score on: the synthetic generator's harder mark settings
and the second generator (``benchmarks/other_products.py``), read through the dataset registry."""
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from e2_core.data import open_dataset
from e2_data.synthetic import MARK_CELL, brand_glyph, catalog, layout, render, write_fashiongen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def changed_pixels(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).sum(-1) > 0


def inside(mask: np.ndarray, box) -> bool:
    x0, y0, x1, y1 = (int(v) for v in box)
    outside = mask.copy()
    outside[y0:y1, x0:x1] = False
    return mask.any() and not outside.any()


def test_one_ink_marks_tell_brands_apart_by_their_pattern_alone():
    glyphs = [brand_glyph(b, ink="one") for b in range(32)]
    assert len({cells.tobytes() for cells, _, _ in glyphs}) == 32  # the default glyphs repeat one pattern
    assert len({(fg, bg) for _, fg, bg in glyphs}) == 1
    product = catalog(0)[3]
    other = replace(product, brand=(product.brand + 1) % 32)
    seen = [render(p, 0, mark_ink="one") for p in (product, other)]
    assert inside(changed_pixels(*seen), layout(product, 0).mark_box)
    with pytest.raises(ValueError, match="mark ink 'gold'"):
        brand_glyph(0, ink="gold")


def test_the_mark_cell_sets_the_marks_size_and_the_default_renders_as_before():
    product = catalog(0)[7]
    small = layout(product, 0, mark_cell=MARK_CELL / 3)
    side = lambda box: box[2] - box[0]  # noqa: E731
    assert side(small.mark_box) == 3 * round(256 * MARK_CELL / 3) < side(layout(product, 0).mark_box)
    assert np.array_equal(np.asarray(render(product, 0)), np.asarray(render(product, 0, mark_cell=MARK_CELL)))
    differs = changed_pixels(render(product, 0), render(product, 0, mark_cell=MARK_CELL / 3))
    assert inside(differs, layout(product, 0).mark_box)


def test_written_mark_settings_are_recorded_and_read(tmp_path):
    write_fashiongen(tmp_path, {"validation": 4}, mark_ink="one", mark_cell=0.03)
    assert '"mark_ink": "one"' in (tmp_path / "synthetic.json").read_text()
    data = open_dataset("synthetic", str(tmp_path), "validation")
    product = catalog(0)[int(data.product_ids[0])]
    assert np.array_equal(np.asarray(data.load_image(0, 0)),
                          np.asarray(render(product, 0, mark_ink="one", mark_cell=0.03)))


def test_the_second_generator_writes_a_catalog_the_registry_reads(tmp_path):
    import other_products as other

    root = other.write(tmp_path / "data", {"train": 24, "validation": 12})
    train = open_dataset("catalog", str(root), "train")
    validation = open_dataset("catalog", str(root), "validation")
    assert (len(train), len(validation)) == (24, 12)
    assert set(validation.entities) == {"description", "brand", "subcategory", "season", "composition"}
    assert not set(train.product_ids) & set(validation.product_ids)
    later = open_dataset("catalog", str(other.write(tmp_path / "later", {"train": 8}, offset=36)), "train")
    assert not set(later.product_ids) & (set(train.product_ids) | set(validation.product_ids))
    names = other.brands()
    assert any("&" in n for n in names) and any("/" in n for n in names) and any("," in n for n in names)
    image = validation.load_image(0, 0)
    assert image.size == other.SIZE
    item = {i.number: i for i in other.items()}[int(validation.product_ids[0])]
    assert validation.product(0).tags["brand"] == names[item.brand]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(other.draw(item)))
    # one attribute changed, one detail redrawn: the brand's mark and the season's label are small
    for field, value in (("brand", (item.brand + 1) % other.NUM_BRANDS),
                         ("season", next(s for s in other.SEASONS if s != item.season))):
        share = changed_pixels(other.draw(item), other.draw(replace(item, **{field: value}))).mean()
        assert 0 < share < 0.01, (field, share)


def test_the_variant_table_reads_each_variants_saved_runs(tmp_path, capsys):
    import json

    from e2_vs_clipft import compare_variants

    def block(brand, season, sharing, top):
        saved = {"on_detail": {"brand": brand, "season": season}, "distinct_share": 0.5,
                 "entity_pairs_sharing": sharing, "top_position_share": top, "random_picks": {"t2i_r1": 40.0}}
        if top is None:  # results saved before the share and the random picks' score existed
            del saved["top_position_share"], saved["random_picks"]
        return saved

    saved_runs = (("clip-ft", 50.0, None, None), ("e2", 53.0, 0.4, 0.25), ("e2-lever", 49.0, 0.1, None))
    for kind, t2i, brand, top in saved_runs:
        for seed, shift in ((0, 0.0), (1, 2.0)):
            record = {"final": {"t2i_r1": t2i + shift, "i2t_r1": t2i}}
            if brand is not None:
                record["mechanism"] = {"selection_chance": {"brand": 0.068, "season": 0.041},
                                       "blocks": [block(0.9, 0.2, 0.1, top), block(brand, 0.05, 0.3, top)]}
            (tmp_path / kind).mkdir(exist_ok=True)
            (tmp_path / kind / f"seed{seed}-results.json").write_text(json.dumps(record))
    compare_variants(tmp_path, ["e2", "e2-lever"], [0, 1])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| e2")]
    assert rows[0].startswith("| e2 | 54.0 ± 1.0 | 53.0 ± 0.0 | +3.0 ± 0.0 (+3.0, +3.0) | 1 | 90.0 ± 0.0% |")
    # token pairs on one patch, the top position, T2I R@1 with the block's picks random
    assert rows[0].endswith("| 10.0 ± 0.0% | 25.0 ± 0.0% | 40.0 ± 0.0 |")
    assert rows[1].startswith("| e2-lever | 50.0 ± 1.0 | 49.0 ± 0.0 | -1.0 ± 0.0 (-1.0, -1.0) |")
    assert rows[1].endswith("| nan ± nan% | nan ± nan |")


def test_random_picks_join_each_token_with_a_random_patch_and_give_the_block_back(tiny_model):
    import torch

    from e2_core.fusion import patches_at
    from e2_vs_clipft import random_picks

    vision = tiny_model.eval().visual
    images = torch.randn(2, 3, *vision.image_size, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = vision.fusion[1].register_forward_hook(lambda block, args, out: seen.append((args, out)))
    with torch.no_grad():
        own = vision.forward_features(images)
        with random_picks(vision.fusion[1], seed=1):
            shuffled = vision.forward_features(images)
        with random_picks(vision.fusion[1], seed=1):
            repeated = vision.forward_features(images)
        after = vision.forward_features(images)
    hook.remove()
    assert torch.equal(after.selected_patches, own.selected_patches)  # the block is given back
    assert torch.equal(after.image_features, own.image_features)
    assert torch.equal(shuffled.selected_patches[:, 0], own.selected_patches[:, 0])  # block 1 untouched
    assert (shuffled.selected_patches[:, 1] != own.selected_patches[:, 1]).any()
    assert shuffled.selected_patches[:, 1].unique().numel() > 8  # spread over the grid, not one place
    assert torch.equal(shuffled.selection_logits, own.selection_logits)  # it returns its own logits
    assert torch.equal(repeated.selected_patches, shuffled.selected_patches)  # the seed fixes the patches
    assert not torch.allclose(shuffled.image_features, own.image_features)
    (tokens, patches, _), (fused, index, _) = seen[1]
    # each token is joined with its random patch
    assert torch.equal(fused, vision.fusion[1].fuse(tokens, patches_at(patches, index)))


def test_the_second_generator_writes_fashioniq_triplets_its_encoders_never_trained_on(tmp_path):
    from dataclasses import astuple

    import other_products as other

    counts = other.write_fashioniq(tmp_path, triplets=6, seed=3, distractors=2)
    assert counts == {f"{s}/{c}": 6 for s in ("train", "val") for c in ("dress", "shirt", "toptee")}
    by_number, names = {i.number: i for i in other.items()}, other.brands()
    item = lambda name: by_number[int(name[2:])]  # noqa: E731
    fields = ("colour", "fabric", "brand", "place")
    references = {}
    for category, garment in other.FASHIONIQ_GARMENTS.items():
        for split in ("train", "val"):
            data = open_dataset("fashioniq", str(tmp_path), split, kind="triplets", category=category)
            assert len(data.triplets) == 6 and not data.dropped and not data.missing_images
            references[split] = {t.reference for t in data.triplets}
            for triplet in data.triplets:
                ref, target = item(triplet.reference), item(triplet.target)
                changed = [f for f in fields if getattr(ref, f) != getattr(target, f)]
                assert 1 <= len(changed) <= 2 and ref.garment == target.garment == garment
                assert ref.season == target.season
                said = " | ".join(triplet.captions)
                for f in changed:  # each change is said, in the vocabulary's own spelling
                    value = getattr(target, f)
                    assert (names[value] if f == "brand" else value) in said, (f, said)
                assert len(triplet.captions) == 2
            for name in data.gallery:  # no image of an item the benchmark trains or pre-trains on
                assert item(name).number >= len(by_number) // 3
            assert Path(data.image_path(data.gallery[0])).suffix == ".png"
        assert not references["train"] & references["val"]
    # the last target's distractors: the same garment, colour, brand and fabric, one of season and mark place apart
    twins = [item(n) for n in data.gallery if astuple(item(n))[1:5] == astuple(target)[1:5] and item(n) != target]
    assert len(twins) >= 2
    assert all((t.season != target.season) + (t.place != target.place) == 1 for t in twins)
    with pytest.raises(ValueError, match="distractors: at most 5 per triplet"):
        other.write_fashioniq(tmp_path / "many", triplets=1, distractors=6)
    assert other.write_fashioniq(tmp_path / "again", triplets=6, seed=3) == counts
    again = (tmp_path / "again" / "captions" / "cap.toptee.val.json").read_text(encoding="utf-8")
    assert again == (tmp_path / "captions" / "cap.toptee.val.json").read_text(encoding="utf-8")


def test_the_downstream_benchmarks_take_each_seeds_encoder_or_say_what_to_run(tmp_path, monkeypatch):
    import other_products as other

    assert other.trained_encoder("e2", 2, "runs/e2/seed{seed}/stage2/best") == "runs/e2/seed2/stage2/best"
    monkeypatch.setenv("E2_PLUGINS_CACHE", str(tmp_path))
    with pytest.raises(SystemExit, match=r"clip-ft/seed1/finetune/best: no such checkpoint: run `python "
                                         r"benchmarks/other_products.py --seeds 1` first"):
        other.trained_encoder("clip-ft", 1)
    best = other.best_checkpoint("e2", 1)
    best.mkdir(parents=True)
    (best / "config.json").write_text("{}")
    assert other.trained_encoder("e2", 1) == str(best) and str(best).startswith(str(tmp_path))


def test_the_cir_benchmark_trains_on_the_training_products_descriptions_one_per_line(tmp_path):
    import other_products as other
    from cir_methods import write_descriptions
    from e2_core.data.base import read_captions

    root = other.write(tmp_path / "data", {"train": 6, "validation": 2})
    path = write_descriptions(tmp_path / "descriptions.txt", "catalog", str(root))
    train = open_dataset("catalog", str(root), "train")
    expected = [train.product(i).tags["description"] for i in range(len(train))]
    assert read_captions(path) == expected and len(path.read_text().splitlines()) == 6
    assert all("\n" not in d and d.endswith(".") for d in expected)
    path.write_text("kept\n")  # written once: a second call reads what is there
    assert read_captions(write_descriptions(path, "catalog", str(root))) == ["kept"]


def test_the_inversion_check_ranks_each_reference_by_its_own_pseudo_word_prompt():
    from types import SimpleNamespace

    import torch
    from cir_inversion import reference_kept

    gallery = torch.randn(30, 8)
    data = SimpleNamespace(gallery=[f"g{i}" for i in range(30)],
                           triplets=[SimpleNamespace(reference=f"g{i}") for i in (3, 7, 11, 29)])
    encoder = SimpleNamespace(device="cpu")
    for sign, kept, cosine in ((1.0, 100.0, 1.0), (-1.0, 0.0, -1.0)):  # the word says the image, or its opposite
        method = SimpleNamespace(network=lambda x: x, encode_texts=lambda e, texts, words, s=sign: s * words)
        result = reference_kept(method, encoder, data, gallery)
        assert result["kept"] == kept and abs(result["cosine"] - cosine) < 1e-5
