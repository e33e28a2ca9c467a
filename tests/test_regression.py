"""Pinned numbers of E2's forward pass: a silent change in the math (token order, fusion, pooling,
heads, text tower) fails here. The weights are set from a seeded generator in name order, so the
numbers do not depend on open_clip's own initialisation."""
from pathlib import Path

import pytest
import torch

import e2_core
from conftest import TINY


def pinned_model(token_attention="full"):
    model = e2_core.create_e2(TINY, token_attention=token_attention).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            noise = torch.randn(tensor.shape, generator=g)
            if tensor.ndim >= 2:  # matrices and embeddings: fan-in scale
                tensor.copy_(noise * tensor.shape[-1] ** -0.5)
            elif tensor.ndim == 1:  # norm weights around 1, biases and the class embedding around 0
                tensor.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model


def test_pinned_forward():
    model = pinned_model("full")  # the paper's attention; numbers pinned before "one-way" existed
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = e2_core.get_tokenizer(TINY)(["a red wool coat", "SHIRTS"])
    with torch.no_grad():
        out = model.encode_image_regions(images)
        text = model.encode_text(tokens)
    torch.testing.assert_close(out.image_features[:, :4], torch.tensor(IMAGE), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.regional_features[:, :, 0], torch.tensor(REGIONAL), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text[:, :4], torch.tensor(TEXT), atol=1e-4, rtol=1e-4)
    assert out.selected_patches.tolist() == SELECTED


IMAGE = [[-0.522047, 0.317477, 0.192368, 0.460236], [-0.341746, -0.016592, 0.145944, -0.122369]]
REGIONAL = [[1.513586, 1.190382, 0.302692, 2.977107, 0.357338], [2.352457, 1.338745, 0.685138, 2.084663, -0.027999]]
TEXT = [[0.391723, 0.390422, 0.576555, 2.328581], [0.369373, -1.027773, 0.565471, 0.837609]]
SELECTED = [[[4, 9, 5, 4, 3, 9, 15, 4, 1, 9], [5, 4, 12, 5, 6, 11, 15, 12, 4, 4]],
            [[5, 15, 15, 12, 2, 11, 12, 2, 6, 2], [1, 1, 2, 12, 15, 1, 9, 15, 1, 15]]]


def test_one_way_attention_leaves_clip_untouched_until_fusion_block_2():
    """With one-way attention, CLS and patches before fusion block 2 are exactly the CLIP's own, whatever
    the selection tokens hold; with full attention they are not."""
    from e2_core.model import run_layers

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for mode, same in (("one-way", True), ("full", False)):
        model = pinned_model(mode)
        visual = model.visual
        second = visual.fusion_layers[1]
        with torch.no_grad():
            out = visual.forward_features(images, output_hidden_states=True)
            clip = run_layers(visual.trunk.transformer, visual.trunk._embeds(images), 0, second)
        e2_state = out.hidden_states[second][:, model.config.num_tokens:]
        assert torch.allclose(e2_state, clip, atol=1e-5) == same, mode



@pytest.mark.parametrize("block_type", ["default", "custom"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("attention", ["one-way", "picks-only", "isolated"])
def test_one_way_mask_holds_in_both_open_clip_blocks(block_type, train, attention):
    # open_clip's default block casts masks to floats and its custom block reads booleans: both must mask, in
    # the fused inference path and with autograd.
    import json

    from open_clip.model import CLIP

    from e2_core.model import run_layers

    config = json.loads((Path(e2_core.__file__).parent / "model_configs" / f"{TINY}.json").read_text())
    torch.manual_seed(0)
    clip = CLIP(config["embed_dim"], {**config["vision_cfg"], "block_type": block_type}, config["text_cfg"])
    model = e2_core.E2Model(clip, e2_core.E2Config(token_attention=attention)).train(train)
    visual = model.visual
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(train):
        out = visual.forward_features(images, output_hidden_states=True)
        clip_states = run_layers(visual.trunk.transformer, visual.trunk._embeds(images), 0, visual.fusion_layers[1])
    e2_states = out.hidden_states[visual.fusion_layers[1]][:, model.config.num_tokens:]
    torch.testing.assert_close(e2_states, clip_states, atol=1e-5, rtol=1e-5)
    if attention != "one-way":  # and the tokens read no patch (picks-only: they read CLS; isolated: not even CLS)
        x = out.hidden_states[0].detach().requires_grad_(True)
        num_tokens, reads = model.config.num_tokens, model.config.num_tokens + (attention == "picks-only")
        mask = visual._attention_mask(x.shape[1], x)
        run_layers(visual.trunk.transformer, x, 0, 1, attn_mask=mask)[:, :num_tokens].sum().backward()
        assert x.grad[:, reads:].abs().max() == 0 and x.grad[:, :reads].abs().min() > 0

    # after fusion block 2 ([tokens, CLS]): only isolated tokens are kept from CLS; CLS reads the tokens in every mode
    after = visual._attention_mask(model.config.num_tokens + 1, out.image_features, after_fusion=True)
    if attention == "isolated":
        assert torch.isinf(after[:-1, -1]).all() and (after[-1] == 0).all() and (after[:-1, :-1] == 0).all()
    else:
        assert after is None


def test_checkpoints_saved_before_token_attention_existed_load_with_full_attention():
    saved = e2_core.E2Config().to_dict()
    del saved["token_attention"]
    assert e2_core.E2Config.from_dict(saved).token_attention == "full"
    assert e2_core.E2Config().token_attention == "one-way"
    assert e2_core.E2Config(compat="reference").token_attention == "full"


def test_checkpoints_saved_before_the_gumbel_noise_existed_load_as_sampled_throughout():
    saved = e2_core.E2Config().to_dict()
    del saved["gumbel_noise_end"]
    assert e2_core.E2Config.from_dict(saved).gumbel_noise_end == 1.0
    assert e2_core.E2Config().gumbel_noise_end == 0.0
