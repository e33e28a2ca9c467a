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
