import math

import pytest
import torch

from e2_core.fusion import FusionBlock, TemperatureSchedule, straight_through_pick


def test_training_selection_is_one_hot_with_straight_through_gradient():
    torch.manual_seed(0)
    block = FusionBlock(8, value_init="identity").train()
    tokens, patches = torch.randn(2, 3, 8), torch.randn(2, 5, 8, requires_grad=True)
    fused, index, _ = block(tokens, patches)
    chosen = patches[torch.arange(2)[:, None], index]
    assert torch.allclose(fused, (chosen + tokens) / 2, atol=1e-6)  # exactly one patch each
    fused.sum().backward()
    assert block.q.weight.grad.abs().sum() > 0 and block.k.weight.grad.abs().sum() > 0  # through the hard choice


def test_eval_selection_is_the_argmax():
    torch.manual_seed(0)
    block = FusionBlock(8, value_init="random").eval()
    tokens, patches = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    logits = (block.q(tokens) @ block.k.weight) @ patches.transpose(1, 2)
    assert torch.equal(block(tokens, patches)[1], logits.argmax(-1))


def test_gumbel_noise_scales_how_far_training_picks_stray_from_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4000, 6, requires_grad=True)
    seed = torch.random.get_rng_state()
    standard = torch.nn.functional.gumbel_softmax(logits, tau=0.7, hard=True)
    torch.random.set_rng_state(seed)
    assert torch.equal(straight_through_pick(logits, 0.7, noise=1.0), standard)  # noise 1: the usual sampling
    argmax = logits.argmax(-1)
    agree = {noise: (straight_through_pick(logits, 0.7, noise).argmax(-1) == argmax).float().mean().item()
             for noise in (1.0, 0.3, 0.0)}
    expected = logits.softmax(-1).max(-1).values.mean().item()  # P(argmax(l + g) = argmax l)
    assert abs(agree[1.0] - expected) < 0.03 and agree[1.0] < agree[0.3] < agree[0.0] == 1.0
    picked = straight_through_pick(logits, 0.7, noise=0.0)
    (picked * torch.randn(6)).sum().backward()
    assert logits.grad.abs().sum() > 0  # still a gradient through the argmax pick


def test_eval_fusion_gathers_the_chosen_patch():
    torch.manual_seed(0)
    block = FusionBlock(8, value_init="random").eval()
    tokens, patches = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    fused, index, _ = block(tokens, patches)
    chosen = patches[torch.arange(2)[:, None], index]
    assert torch.allclose(fused, (block.v(chosen) + tokens) / 2, atol=1e-6)


def test_trained_token_selects_the_odd_patch():
    """Each image has one patch carrying a feature the objective rewards, at a random position.
    A few dozen straight-through steps teach the token to pick it (chance: 1 in 16)."""
    torch.manual_seed(0)
    width, patches_per_image, batch = 32, 16, 64
    feature = torch.nn.functional.normalize(torch.randn(width), dim=0)
    block = FusionBlock(width, query_init_scale=0.1, value_init="identity")
    block.v.weight.requires_grad_(False)
    token = torch.nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
    optimizer = torch.optim.Adam([token, block.q.weight, block.k.weight], lr=3e-2)

    def sample():
        patches = torch.randn(batch, patches_per_image, width)
        where = torch.randint(patches_per_image, (batch,))
        patches[torch.arange(batch), where] += 4 * feature
        return patches, where

    block.eval()
    patches, where = sample()
    before = (block(token.expand(batch, -1, -1), patches)[1][:, 0] == where).float().mean()
    block.train()
    for _ in range(60):
        patches, _ = sample()
        fused = block(token.expand(batch, -1, -1), patches)[0]
        loss = -(fused[:, 0] @ feature).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    block.eval()
    patches, where = sample()
    after = (block(token.expand(batch, -1, -1), patches)[1][:, 0] == where).float().mean()
    assert before < 0.3
    assert after > 0.9, f"selected the odd patch in {after:.0%} of images"


def test_temperature_schedule():
    schedule = TemperatureSchedule(2.0, 0.5, total_steps=10)
    values = [schedule(step) for step in range(12)]
    assert values[0] == 2.0 and math.isclose(values[10], 0.5) and values[11] == values[10]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        TemperatureSchedule(1, 1, 0)


def _place_and_detail(images=16, n=6, width=8, place=3, seed=0):
    """Patches where one place is strong in every image and each image's detail is a weaker mark elsewhere."""
    g = torch.Generator().manual_seed(seed)
    patches = 0.05 * torch.randn(images, n, width, generator=g)
    detail = (place + 1 + torch.arange(images) % (n - 1)) % n  # never the place
    patches[:, place, 0] += 3.0  # the place: the same in every image
    patches[torch.arange(images), detail, 0] += 2.0  # the detail: weaker, and where it is varies
    return patches, detail


def test_centred_positions_pick_the_detail_not_the_place_every_image_shares():
    torch.manual_seed(0)
    patches, detail = _place_and_detail()
    tokens = torch.zeros(len(patches), 1, 8)
    plain, centred = FusionBlock(8, value_init="identity"), FusionBlock(8, value_init="identity", num_patches=6,
                                                                       momentum=1.0)
    for block in (plain, centred):
        with torch.no_grad():
            block.q.weight.zero_(), block.k.weight.copy_(torch.eye(8))
        block.q.weight.data[0, 0] = 1.0  # the query reads channel 0: one unit per unit of it
        tokens[..., 0] = 10.0
    assert (plain.eval()(tokens, patches)[1][:, 0] == 3).all()  # without centring: the place, in every image
    centred.train().noise = 0.0  # training's pick on the argmax, to compare with evaluation's
    assert torch.equal(centred(tokens, patches)[1][:, 0], detail)  # the batch's mean removed: the detail
    assert torch.allclose(centred.position_mean, patches.mean(dim=0))  # momentum 1: the last batch's mean
    assert torch.equal(centred.eval()(tokens[:2], patches[:2])[1][:, 0], detail[:2])  # evaluation: the running mean


def test_centred_positions_keep_a_running_mean_and_a_lone_training_image_reads_it():
    block = FusionBlock(4, num_patches=3, momentum=0.5).train()
    tokens = torch.randn(2, 1, 4)
    first, second = torch.ones(2, 3, 4), 3 * torch.ones(2, 3, 4)
    block(tokens, first), block(tokens, second)
    assert torch.allclose(block.position_mean, torch.full((3, 4), 0.5 * (0.5 * 1) + 0.5 * 3))  # 0 -> 0.5 -> 1.75
    before = block.position_mean.clone()
    _, _, logits = block(tokens[:1], second[:1])  # one image: its own mean would erase it; the running mean does not
    assert torch.equal(block.position_mean, before)
    assert torch.allclose(logits, block.logits(tokens[:1], second[:1] - before))
    assert FusionBlock(4).position_mean is None and "position_mean" not in FusionBlock(4).state_dict()
