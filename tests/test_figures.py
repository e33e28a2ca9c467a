"""The retrieval task's figures: every selection token countable, every entity labelled, top-5 explained."""
import torch
from PIL import Image, ImageDraw

import e2_core
from e2_core.data import FashionGen
from e2_retrieval.figures import ENTITY_COLOURS, save_selection_figure, save_top5_figure, selection_counts
from conftest import TINY


def test_selection_counts_keep_every_token():
    picked = torch.tensor([[7] * 9 + [3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 9]])
    counts = selection_counts(picked, ["brand", "season"], tokens_per_entity=5)
    assert counts[0] == {"brand": {7: 5}, "season": {7: 4, 3: 1}}
    assert counts[1]["season"] == {6: 1, 7: 1, 8: 1, 9: 2}
    assert all(sum(c.values()) == 5 for image in counts for c in image.values())


def _drawn_texts(monkeypatch):
    texts = []
    original = ImageDraw.ImageDraw.text

    def text(self, xy, message, *args, **kwargs):
        texts.append(message)
        return original(self, xy, message, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return texts


def test_selection_figure_has_one_labelled_panel_per_entity_and_counts_shared_patches(tmp_path, data_root,
                                                                                      monkeypatch):
    torch.manual_seed(0)
    encoder = e2_core.Encoder(e2_core.create_e2(TINY, entities=("brand", "season"), tokens_per_entity=5))
    data = FashionGen(data_root, split="validation", transform=encoder.preprocess)
    picked = torch.tensor([[7] * 9 + [3]] * 3)  # 9 of 10 tokens on one patch, as a collapsed selection does
    encoder.model.encode_image_regions = lambda images, normalize=False: type("Regions", (), {
        "image_features": torch.zeros(len(images), 4), "regional_features": torch.zeros(len(images), 2, 4),
        "selected_patches": torch.stack([picked[:len(images)]] * 2, dim=1)})()
    texts = _drawn_texts(monkeypatch)
    path = save_selection_figure(encoder, data, tmp_path / "selection.png", "cpu", images=3)
    width, height = Image.open(path).size
    assert width == 6 + 2 * (128 + 6) and height == 60 + 3 * (128 + 6)  # 2 entity columns x 3 image rows
    assert "brand" in texts and "season" in texts
    assert texts.count("5") == 3 and texts.count("4") == 3  # per image: 5 brand tokens, 4 season tokens share patch 7


def test_top5_figure_has_a_title_and_a_legend(tmp_path, data_root, monkeypatch):
    data = FashionGen(data_root, split="validation")
    features = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    texts = _drawn_texts(monkeypatch)
    save_top5_figure({"E2": (features, features, list(range(8)), data)}, tmp_path / "top5.png", queries=2)
    assert any("most similar first" in t for t in texts) and any("green frame" in t for t in texts)


def test_a_patch_index_is_the_patch_its_box_frames(tiny_model):
    """Patch i of the image tower (its token states, the fusion blocks' choices) holds the pixels of
    ``patch_boxes(i)``: a change inside one box changes that patch's state and no other."""
    base = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tiny_model.eval()
    with torch.no_grad():
        states = tiny_model.visual.forward_features(base, output_hidden_states=True).hidden_states[0]
        first_patch = states.shape[1] - 16                                   # [tokens, CLS, 4 x 4 patches]
        for patch in (2, 6, 13):                                             # row 0 col 2, row 1 col 2, row 3 col 1
            x0, y0, x1, y1 = tiny_model.visual.patch_boxes(torch.tensor(patch)).tolist()
            marked = base.clone()
            marked[..., y0 + 5:y1 - 5, x0 + 3:x1 - 7] = 1.0
            changed = tiny_model.visual.forward_features(marked, output_hidden_states=True).hidden_states[0]
            moved = (changed - states).abs().amax(dim=-1)[0]
            assert moved.nonzero().flatten().tolist() == [first_patch + patch]


def test_the_selection_figure_frames_the_picked_patch_where_the_tower_saw_it(tmp_path, data_root):
    """A non-square photo is resized and centre-cropped before the tower sees it: the figure shows that crop,
    so the frame of the picked patch holds the marker drawn there (the whole photo squashed into the panel
    would put the marker half outside it)."""
    encoder = e2_core.Encoder(e2_core.create_e2(TINY, entities=("brand",), tokens_per_entity=1))
    photo = Image.new("RGB", (80, 100), (250, 250, 250))                       # 64 px input: 80 x 100 -> 64 x 80,
    ImageDraw.Draw(photo).rectangle([45, 23, 54, 28], fill=(0, 0, 0))          # rows 8..72 kept: the marker lands at
    data = FashionGen(data_root, split="validation", transform=encoder.preprocess)   # y 10..15, x 36..43: patch 2
    data.load_image = lambda index, view=0: photo
    encoder.model.encode_image_regions = lambda images, normalize=False: type("Regions", (), {
        "image_features": torch.zeros(len(images), 4), "regional_features": torch.zeros(len(images), 1, 4),
        "selected_patches": torch.full((len(images), 2, 1), 2)})()
    figure = Image.open(save_selection_figure(encoder, data, tmp_path / "selection.png", "cpu", images=1))
    panel = torch.from_numpy(__import__("numpy").array(figure.crop((6, 60, 6 + 128, 60 + 128)))).int()
    dark = (panel.sum(-1) < 200).nonzero()                                    # the marker (the frame is coloured)
    framed = (panel - torch.tensor(ENTITY_COLOURS[0])).abs().sum(-1) < 10
    rows, cols = framed.nonzero()[:, 0], framed.nonzero()[:, 1]
    assert len(dark) and (rows.min(), cols.min(), rows.max(), cols.max()) == (0, 64, 31, 95)   # patch 2, 2x scale
    assert rows.min() < dark[:, 0].min() and dark[:, 0].max() < rows.max()
    assert cols.min() < dark[:, 1].min() and dark[:, 1].max() < cols.max()


def test_the_detail_probe_counts_the_patches_its_detail_is_drawn_on():
    """The benchmark's "tokens on the mark / on the tag" statistic: the patches it counts as a product's brand mark
    (season tag) are those whose pixels change, in what the tower sees, when only the brand (season) changes."""
    import sys
    from dataclasses import replace
    from pathlib import Path

    import numpy as np
    from e2_data.synthetic import SEASONS, catalog, render

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from e2_vs_clipft import patch_regions

    encoder = e2_core.load_encoder("demo:e2")
    boxes = encoder.model.visual.patch_boxes(torch.arange(64)).tolist()     # an 8 x 8 grid
    for product in catalog(0)[:6]:
        regions = patch_regions(encoder.model, product)
        for entity, other in (("brand", (product.brand + 1) % 32),
                              ("season", next(s for s in SEASONS if s != product.season))):
            seen = [np.array(encoder.input_view(render(p, 0)), dtype=int)
                    for p in (product, replace(product, **{entity: other}))]
            changed = torch.from_numpy(np.abs(seen[0] - seen[1]).sum(-1) > 30)
            touched = torch.tensor([bool(changed[y0:y1, x0:x1].any()) for x0, y0, x1, y1 in boxes])
            assert touched.any() and not (touched & ~regions[entity]).any(), (product, entity)
