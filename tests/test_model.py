import pytest
import torch
import open_clip

import e2_core
from e2_core import E2Config
from e2_core.model import is_e2_parameter
from conftest import TINY, make_batch


@pytest.mark.parametrize("entities,tokens", [(("brand",), 1), (("brand", "season", "composition"), 3),
                                             (e2_core.FASHIONGEN_ENTITIES, 2)])
def test_output_shapes(tokenizer, entities, tokens):
    model = e2_core.create_e2(TINY, entities=entities, tokens_per_entity=tokens)
    images, text, _ = make_batch(tokenizer, batch=3)
    entity_text = e2_core.tokenize_entities(tokenizer, [[f"{e} {i}" for e in entities] for i in range(3)])
    out = model(images, text, entity_text)
    k, d = len(entities), 64
    assert out["image_features"].shape == (3, d)
    assert out["text_features"].shape == (3, d)
    assert out["image_regional_features"].shape == (3, k, d)
    assert out["entity_text_features"].shape == (3, k, d)
    assert out["logit_scale"].ndim == 0
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    regions = model.encode_image_regions(images)
    assert regions.selected_patches.shape == (3, 2, k * tokens)
    assert int(regions.selected_patches.max()) < 16
    assert model.encode_image(images).shape == (3, d)
    assert model.encode_text(text, normalize=True).shape == (3, d)


def test_entity_buckets_give_the_unbucketed_embeddings(tiny_model, tokenizer):
    long = "a long description of a shirt with a small embroidered logo at the chest"
    rows = [["SHIRTS", "Acne", long, "FW2016", "wool"], ["JEANS", "Prada", long + " and tag", "SS2017", "silk"]]
    bucketed = e2_core.tokenize_entities(tokenizer, rows)
    assert len(bucketed.spans()) >= 2
    one_bucket = e2_core.EntityTokens(bucketed.tokens, bucketed.index)
    tiny_model.eval()
    assert torch.allclose(tiny_model.encode_entity_text(bucketed), tiny_model.encode_entity_text(one_bucket), atol=1e-6)



def test_global_texts_and_entity_buckets_share_one_embedding_lookup(tiny_model, tokenizer):
    # One lookup, so the backward builds one dense gradient of the embedding table, not one per text batch.
    long = "a long description of a shirt with a small embroidered logo at the chest"
    rows = [["SHIRTS", "Acne", long, "FW2016", "wool"], ["JEANS", "Prada", long + " and tag", "SS2017", "silk"]]
    entity_text = e2_core.tokenize_entities(tokenizer, rows)
    _, text, _ = make_batch(tokenizer, batch=2)
    lookups = []
    hook = tiny_model.token_embedding.register_forward_hook(lambda *args: lookups.append(1))
    try:
        out = tiny_model(None, text, entity_text)
    finally:
        hook.remove()
    assert len(lookups) == 1 and len(entity_text.spans()) >= 2
    assert torch.equal(out["text_features"], tiny_model.encode_text(text, normalize=True))
    assert torch.equal(out["entity_text_features"], tiny_model.encode_entity_text(entity_text, normalize=True))

def test_clip_tuple_output(tiny_model, tokenizer):
    images, text, _ = make_batch(tokenizer)
    tiny_model.output_dict = False
    image_features, text_features, logit_scale = tiny_model(images, text)
    assert image_features.shape == text_features.shape == (4, 64)
    assert logit_scale.ndim == 0


def test_eval_is_deterministic_and_training_is_stochastic(tiny_model, tokenizer):
    images, _, _ = make_batch(tokenizer)
    tiny_model.eval()
    a, b = tiny_model.encode_image_regions(images), tiny_model.encode_image_regions(images)
    assert torch.equal(a.image_features, b.image_features)
    assert torch.equal(a.selected_patches, b.selected_patches)
    tiny_model.train()
    torch.manual_seed(1)
    picks = {tuple(tiny_model.encode_image_regions(images).selected_patches.flatten().tolist()) for _ in range(3)}
    assert len(picks) > 1, "Gumbel sampling should vary the selection in training mode"


def test_stochastic_eval_option(tokenizer):
    model = e2_core.create_e2(TINY, stochastic_eval=True).eval()
    images, _, _ = make_batch(tokenizer)
    torch.manual_seed(0)
    picks = {tuple(model.encode_image_regions(images).selected_patches.flatten().tolist()) for _ in range(3)}
    assert len(picks) > 1


def test_gradients_reach_selection_tokens_and_fusion(tiny_model, tokenizer):
    images, text, entity_text = make_batch(tokenizer)
    tiny_model.train()
    loss_fn = e2_core.RegionalContrastiveLoss(tiny_model.entities)
    loss_fn(**tiny_model(images, text, entity_text))["loss"].backward()
    visual = tiny_model.visual
    for name, param in [("selection tokens", visual.selection_tokens.tokens),
                        *[(f"fusion {i} {p}", getattr(visual.fusion[i], p).weight) for i in range(2) for p in "qkv"],
                        ("proj_cls", visual.proj_cls), ("regional proj", visual.regional_heads.proj)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("texts", [["a red shirt", "Raf Simons"], ["FW2016"], ["x " * 40]])
def test_text_tower_is_clips_unchanged(tokenizer, texts):
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY)
    reference = clip.encode_text(tokenizer(texts))
    model = e2_core.E2Model(clip, E2Config(), TINY, open_clip.get_model_config(TINY))
    assert torch.equal(model.encode_text(tokenizer(texts)), reference)
    trimmed = e2_core.trim_padding(tokenizer(texts))
    assert torch.allclose(model.encode_text(trimmed), reference, atol=1e-5)  # padding cannot matter
    assert model.token_embedding is clip.token_embedding and model.transformer is clip.transformer


def test_new_parts_start_from_clip(tokenizer):
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY)
    proj = clip.visual.proj.detach().clone()
    model = e2_core.E2Model(clip, E2Config(), TINY, open_clip.get_model_config(TINY))
    visual = model.visual
    assert torch.equal(visual.proj_cls, proj)
    assert all(torch.equal(p, proj) for p in visual.regional_heads.proj)
    assert torch.equal(visual.fusion[0].v.weight, torch.eye(64))
    # near-uniform first selection: queries start 10x smaller than keys
    ratio = visual.fusion[0].q.weight.std() / visual.fusion[0].k.weight.std()
    assert 0.05 < ratio < 0.2


def test_e2_parameters_are_exactly_the_additions(tiny_model):
    names = {n for n, _ in tiny_model.named_parameters() if is_e2_parameter(n)}
    assert names == {"visual.selection_tokens.tokens", "visual.proj_cls", "visual.regional_heads.proj",
                     *{f"visual.fusion.{i}.{p}.weight" for i in range(2) for p in "qkv"},
                     *{f"visual.regional_heads.norms.{k}.{w}" for k in range(5) for w in ("weight", "bias")}}
    assert len(tiny_model.e2_parameters()) == len(names)


@pytest.mark.parametrize("shape,match", [((2, 3, 32, 32), r"\(B, 3, 64, 64\)"), ((2, 1, 64, 64), "shape"),
                                         ((3, 64, 64), "shape")])
def test_wrong_image_shape_is_a_clear_error(tiny_model, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.encode_image(torch.randn(*shape))


def test_entity_text_mismatch_is_a_clear_error(tiny_model, tokenizer):
    images, text, entity_text = make_batch(tokenizer)
    with pytest.raises(ValueError, match="one row of entity strings per image"):
        tiny_model(images, text, e2_core.EntityTokens(entity_text.tokens, entity_text.index[:2]))
    with pytest.raises(ValueError, match="entities are"):
        tiny_model(images, text, e2_core.EntityTokens(entity_text.tokens, entity_text.index[:, :3]))
    with pytest.raises(TypeError, match="EntityTokens"):
        tiny_model(images, text, entity_text.tokens)


def test_fusion_layers_scale_with_depth():
    cfg = E2Config()
    assert cfg.resolve_fusion_layers(12) == (8, 11)  # the reference placement
    assert cfg.resolve_fusion_layers(24) == (16, 23)
    assert cfg.resolve_fusion_layers(6) == (4, 5)
    assert cfg.resolve_fusion_layers(4) == (2, 3)
    with pytest.raises(ValueError):
        E2Config(fusion_layers=(5, 5)).resolve_fusion_layers(12)


@pytest.mark.parametrize("name", e2_core.list_models())
def test_every_supported_architecture_builds(name):
    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):  # shapes and wiring only, no memory
        model = e2_core.E2Model(open_clip.CLIP(**cfg), E2Config(), name, cfg)
    depth = len(model.visual.trunk.transformer.resblocks)
    assert model.visual.fusion_layers == E2Config().resolve_fusion_layers(depth)
    assert model.visual.selection_tokens.tokens.shape[0] == 10


def test_vit_b16_forward():
    model = e2_core.create_e2("ViT-B-16").eval()
    with torch.no_grad():
        out = model.encode_image_regions(torch.randn(1, 3, 224, 224))
    assert out.image_features.shape == (1, 512) and out.selected_patches.max() < 196


def test_unsupported_architectures_are_refused():
    with pytest.raises(ValueError, match="E2 can extend|which E2 extends"):
        e2_core.create_e2("RN50")
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        e2_core.create_e2("ViT-Nope")


def test_config_round_trip_and_validation():
    cfg = E2Config(entities=("brand", "season"), tokens_per_entity=3, fusion_layers=(2, 3))
    assert E2Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown E2Config field"):
        E2Config.from_dict({"entitys": ["brand"]})
    with pytest.raises(ValueError, match="duplicates"):
        E2Config(entities=("brand", "brand"))
    with pytest.raises(ValueError, match="reference"):
        E2Config(entities=("brand",), compat="reference")


def test_patch_boxes_locate_selected_patches(tiny_model):
    boxes = tiny_model.visual.patch_boxes(torch.tensor([0, 5, 15]))  # 4x4 grid of 16-px patches
    assert boxes.tolist() == [[0, 0, 16, 16], [16, 16, 32, 32], [48, 48, 64, 64]]


def test_the_patch_gate_lets_training_fade_the_patches_out_of_the_last_layers(tiny_model):
    """Gate 1: the layers after fusion block 2 attend to the patches as to any token; a vanishing gate gives the
    patches-dropped pass that evaluation always makes (the gate is ignored there)."""
    from e2_core.model import run_layers

    visual = tiny_model.visual.train()
    visual.set_gumbel_temperature(1.0, noise=0.0)  # training picks the argmax, as evaluation does
    images = torch.randn(2, 3, 64, 64)
    out = {}
    for gate in (0.0, 1e-30, 1.0):
        visual.set_patch_gate(gate)
        out[gate] = visual.forward_features(images, output_hidden_states=True)
    assert torch.allclose(out[1e-30].image_features, out[0.0].image_features, atol=1e-5)
    assert not torch.allclose(out[1.0].image_features, out[0.0].image_features, atol=1e-3)
    # gate 1: the last layers run on [tokens, CLS, patches], unmasked
    num_tokens, (_, second) = visual.config.num_tokens, visual.fusion_layers
    before = out[1.0].hidden_states[second]  # the sequence entering fusion block 2
    tokens, _, _ = visual.fusion[1](before[:, :num_tokens], before[:, num_tokens + 1:])
    full = run_layers(visual.trunk.transformer, torch.cat([tokens, before[:, num_tokens:]], dim=1), second)
    expected = visual.trunk.ln_post(full[:, num_tokens]) @ visual.proj_cls
    assert torch.allclose(out[1.0].image_features, expected, atol=1e-5)
    visual.eval()  # gate 1 still set: evaluation drops the patches all the same
    assert torch.allclose(visual.forward_features(images).image_features, out[0.0].image_features, atol=1e-5)
    with pytest.raises(ValueError, match=r"patch gate must be in \[0, 1\], got 2"):
        visual.set_patch_gate(2)


def test_centre_positions_gives_both_blocks_a_position_mean_that_a_checkpoint_keeps(tiny_model, tmp_path):
    torch.manual_seed(0)
    model = e2_core.create_e2(TINY, centre_positions=True)
    assert [tuple(b.position_mean.shape) for b in model.visual.fusion] == [(16, 64), (16, 64)]  # 4 x 4 patches
    assert not any("position_mean" in name for name in tiny_model.state_dict())  # off: the paper's blocks, as saved
    model.train().visual.set_gumbel_temperature(1.0, noise=0.0)
    model.visual.forward_features(torch.randn(4, 3, 64, 64))  # a training pass moves the running means
    assert all(b.position_mean.abs().sum() > 0 for b in model.visual.fusion)
    e2_core.save_pretrained(model, tmp_path / "ckpt")
    loaded = e2_core.create_e2(None, pretrained=tmp_path / "ckpt")
    assert loaded.config.centre_positions
    for a, b in zip(model.visual.fusion, loaded.visual.fusion):
        assert torch.equal(a.position_mean, b.position_mean)
    images = torch.randn(3, 3, 64, 64)
    assert torch.equal(model.eval().visual.forward_features(images).selected_patches,
                       loaded.eval().visual.forward_features(images).selected_patches)


def test_pick_carry_adds_block_1s_logits_to_block_2s_and_zero_keeps_the_independent_picks(tiny_model):
    images = torch.randn(3, 3, 64, 64)
    state = tiny_model.state_dict()
    visual = tiny_model.visual.eval()
    plain = visual.forward_features(images)
    logits_1, logits_2 = plain.selection_logits.unbind(1)
    assert (plain.selected_patches[:, 0] != plain.selected_patches[:, 1]).any()  # independent picks differ somewhere
    for carry in (0.5, 1e4):
        torch.manual_seed(0)
        carried = e2_core.create_e2(TINY, pick_carry=carry).eval()
        carried.load_state_dict(state)
        out = carried.visual.forward_features(images)
        assert torch.allclose(out.selection_logits[:, 0], logits_1, atol=1e-5)
        assert torch.allclose(out.selection_logits[:, 1], logits_2 + carry * logits_1, atol=1e-4)
        assert torch.equal(out.selected_patches[:, 1], out.selection_logits[:, 1].argmax(-1))
    assert torch.equal(out.selected_patches[:, 1], plain.selected_patches[:, 0])  # a large carry: block 1's patch
    torch.manual_seed(0)
    assert torch.equal(e2_core.create_e2(TINY, pick_carry=0.0).visual.eval().forward_features(images).image_features,
                       plain.image_features)
    def block_2s_gradient_on_block_1(model):  # through the tokens block 1 fused, and the carried logits if any
        model.train().visual.set_gumbel_temperature(1.0, noise=0.0)
        logits = model.visual.forward_features(images).selection_logits[:, 1]
        return torch.autograd.grad(logits.sum(), model.visual.fusion[0].q.weight)[0]

    # block 1's logits are carried without a gradient: block 2's picks train block 1 no more than without the carry
    assert torch.allclose(block_2s_gradient_on_block_1(carried), block_2s_gradient_on_block_1(tiny_model), atol=1e-5)
    with pytest.raises(ValueError, match="pick_carry must be >= 0"):
        E2Config(pick_carry=-1)


def test_centring_and_the_carry_together_add_block_1s_centred_logits_to_block_2s_and_a_checkpoint_keeps_both(
        tmp_path):
    """The pair measured best at 1,800 steps: each block reads the patches less its own position means, and block 2
    picks from its own logits plus block 1's."""
    torch.manual_seed(0)
    model = e2_core.create_e2(TINY, centre_positions=True, pick_carry=1.0)
    visual = model.eval().visual
    for block in visual.fusion:  # position means as training leaves them (random here, so they matter)
        block.position_mean.copy_(torch.randn_like(block.position_mean))
    out = visual.forward_features(torch.randn(3, 3, 64, 64), output_hidden_states=True)
    num_tokens = visual.config.num_tokens
    own, uncentred = [], []
    for block, layer in zip(visual.fusion, visual.fusion_layers):
        entering = out.hidden_states[layer]  # [tokens, CLS, patches] as the block reads them
        tokens, patches = entering[:, :num_tokens], entering[:, num_tokens + 1:]
        own.append(block.logits(tokens, patches - block.position_mean))
        uncentred.append(block.logits(tokens, patches))
    logits_1, logits_2 = out.selection_logits.unbind(1)
    assert torch.allclose(logits_1, own[0], atol=1e-4) and not torch.allclose(logits_1, uncentred[0], atol=1e-2)
    assert torch.allclose(logits_2, own[1] + logits_1, atol=1e-4)
    assert not torch.allclose(logits_2, own[1], atol=1e-2) and not torch.allclose(logits_2, uncentred[1] + logits_1,
                                                                                 atol=1e-2)

    e2_core.save_pretrained(model, tmp_path / "ckpt")
    loaded = e2_core.create_e2(None, pretrained=tmp_path / "ckpt").eval()
    assert (loaded.config.centre_positions, loaded.config.pick_carry) == (True, 1.0)
    images = torch.randn(3, 3, 64, 64)
    assert torch.equal(visual.forward_features(images).selected_patches,
                       loaded.visual.forward_features(images).selected_patches)
