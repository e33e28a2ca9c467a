import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e2_core import RegionalContrastiveLoss, contrastive_loss


def reference_infonce(a, b, scale, labels=None):
    """Independent numpy implementation of the symmetric (multi-positive) InfoNCE."""
    a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    logits = scale * a @ b.T
    n = len(a)
    pos = np.eye(n) if labels is None else (labels[:, None] == labels[None, :]).astype(float)

    def xent(lg, p):
        lg = lg - lg.max(1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return -(p / p.sum(1, keepdims=True) * logp).sum(1).mean()

    return 0.5 * (xent(logits, pos) + xent(logits.T, pos.T))


@pytest.mark.parametrize("labels", [None, np.array([0, 1, 2, 3, 4]), np.array([0, 0, 1, 2, 0]),
                                    np.array([1, 1, 1, 1, 1])])
def test_contrastive_loss_matches_reference(labels):
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    got = contrastive_loss(a, b, torch.tensor(10.0), None if labels is None else torch.tensor(labels))
    assert math.isclose(got.item(), reference_infonce(a, b, 10.0, labels), rel_tol=1e-5)


def test_distinct_labels_equal_plain_infonce():
    a, b = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    assert torch.allclose(contrastive_loss(a, b, torch.tensor(5.0)),
                          contrastive_loss(a, b, torch.tensor(5.0), torch.arange(6)))


def features(batch=4, k=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return dict(image_features=norm(batch, d), text_features=norm(batch, d), logit_scale=torch.tensor(10.0),
                image_regional_features=norm(batch, k, d), entity_text_features=norm(batch, k, d))


def test_total_is_the_weighted_combination():
    f = features()
    out = RegionalContrastiveLoss(["brand", "season"], global_weight=0.3, entity_weights={"season": 0})(**f)
    assert set(out) == {"loss", "loss_global", "loss_brand", "loss_season"}
    assert torch.allclose(out["loss"], 0.3 * out["loss_global"] + 0.7 * out["loss_brand"])
    ref = RegionalContrastiveLoss(["brand", "season"])(**f)  # the reference balance
    assert torch.allclose(ref["loss"], 0.5 * ref["loss_global"] + 0.25 * (ref["loss_brand"] + ref["loss_season"]))


def test_multi_positive_pulls_together_what_labels_group():
    """Items 0 and 1 carry the same brand written differently (different texts, one label).
    Single-positive InfoNCE pushes image 0 away from text 1; multi-positive pulls it closer."""
    torch.manual_seed(0)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    text[1] = F.normalize(text[0] + 0.5 * torch.randn(8), dim=0)
    labels = torch.tensor([0, 0, 1, 2])

    def descent_towards_other(labels):
        image = text.clone().requires_grad_(True)
        contrastive_loss(image, text, torch.tensor(10.0), labels).backward()
        return (-image.grad[0] @ text[1]).item()

    assert descent_towards_other(None) < 0 < descent_towards_other(labels)


def test_identical_texts_give_multi_positive_the_same_gradient():
    """When shared values have identical text embeddings (the same string), the text columns are
    equal, so multi- and single-positive targets differ by a constant only: same gradients."""
    torch.manual_seed(0)
    text = F.normalize(torch.randn(4, 8), dim=-1)[[0, 0, 1, 2]]
    image = F.normalize(torch.randn(4, 8), dim=-1)
    grads = []
    for labels in (None, torch.tensor([0, 0, 1, 2])):
        img = image.clone().requires_grad_(True)
        contrastive_loss(img, text, torch.tensor(10.0), labels).backward()
        grads.append(img.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_multi_positive_needs_labels():
    with pytest.raises(ValueError, match="entity_labels"):
        RegionalContrastiveLoss(["brand", "season"], multi_positive=True)(**features())


def test_bad_inputs_are_clear_errors():
    f = features(k=2)
    with pytest.raises(ValueError, match="do not match"):
        RegionalContrastiveLoss(["brand", "season", "composition"])(**f)
    with pytest.raises(ValueError, match="unknown entities"):
        RegionalContrastiveLoss(["brand"], entity_weights={"colour": 1.0})
    with pytest.raises(ValueError, match="all zero"):
        RegionalContrastiveLoss(["brand"], entity_weights={"brand": 0.0})


def test_patch_sharing_is_the_chance_two_entities_sample_one_patch():
    from e2_core.loss import patch_sharing

    sharp = torch.full((1, 2, 4, 6), -30.0)  # (image, block, 2 entities x 2 tokens, 6 patches)
    sharp[..., 0, 1] = sharp[..., 1, 1] = 30.0  # entity 0's tokens share patch 1: not penalised
    sharp[..., 2, 3] = sharp[..., 3, 4] = 30.0
    assert patch_sharing(sharp, num_entities=2).item() < 1e-6
    sharp[..., 2, 3], sharp[..., 2, 1] = -30.0, 30.0  # one of entity 1's tokens joins entity 0's patch
    # it now shares with both of entity 0's tokens: 4 of the 8 ordered token pairs across entities
    assert patch_sharing(sharp, num_entities=2).item() == pytest.approx(4 / 8)
    torch.manual_seed(0)  # by sampling: the share of cross-entity pairs whose picks coincide
    logits = torch.randn(1, 1, 4, 6)
    picks = torch.distributions.Categorical(logits=logits[0, 0]).sample((20000,))  # (draws, tokens)
    cross = [(t, u) for t in range(4) for u in range(4) if t // 2 != u // 2]
    sampled = sum((picks[:, t] == picks[:, u]).float().mean() for t, u in cross) / len(cross)
    assert patch_sharing(logits, 2).item() == pytest.approx(sampled.item(), abs=0.01)
    with pytest.raises(ValueError, match="5 selection tokens do not split into 2 entities"):
        patch_sharing(torch.zeros(1, 5, 6), 2)


def test_patch_sharing_weight_adds_the_penalty_and_its_gradient_parts_entities():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    regional = F.normalize(torch.randn(4, 2, 8), dim=-1)
    logits = torch.zeros(4, 2, 4, 6)
    logits[..., 1] = 3.0  # every token of both entities leans to patch 1
    logits.requires_grad_(True)
    args = dict(image_features=a, text_features=b, logit_scale=torch.tensor(10.0), image_regional_features=regional,
                entity_text_features=regional.flip(0))
    plain = RegionalContrastiveLoss(("brand", "season"))(**args, selection_logits=logits)
    out = RegionalContrastiveLoss(("brand", "season"), patch_sharing_weight=0.5)(**args, selection_logits=logits)
    assert "patch_sharing" not in plain and out["loss"].item() == pytest.approx(
        plain["loss"].item() + 0.5 * out["patch_sharing"].item())
    out["loss"].backward()
    assert (logits.grad[..., 1] > 0).all()  # descending lowers the shared patch's logit for every token
    with pytest.raises(ValueError, match="needs the selection_logits"):
        RegionalContrastiveLoss(("brand", "season"), patch_sharing_weight=0.5)(**args)
    with pytest.raises(ValueError, match="patch_sharing_weight must be >= 0"):
        RegionalContrastiveLoss(("brand",), patch_sharing_weight=-1)
