"""The retrieval task's figures: every selection token countable, every entity labelled, top-5 explained."""
import torch
from PIL import Image, ImageDraw

import e2_core
from e2_core.data import FashionGen
from e2_retrieval.figures import save_selection_figure, save_top5_figure, selection_counts
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
