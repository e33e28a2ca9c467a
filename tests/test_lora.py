"""LoRA fine-tuning (stage 2 / CLIP-FT): what trains, plain merged checkpoints, exact resume."""
import re

import pytest
import torch

import e2_core
from e2_core.model import is_e2_parameter
from e2_train import train
from e2_train.lora import add_lora, has_lora, merged_state_dict
from conftest import TINY, logged_losses, make_batch, train_config

pytest.importorskip("peft")


def random_clip():
    import open_clip
    return open_clip.create_model(TINY)


def weights(path):
    return e2_core.load_encoder(str(path)).model.state_dict()


def config(tmp_path, data_root, **overrides):
    return train_config(tmp_path, data_root, **{"lora_rank": 4, "stages": ["stage2:epochs=1,lr=1e-3"], **overrides})

LORA = {f"{layer}.lora_{ab}.default.weight" for layer in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj") for ab in "AB"}
E2_PARTS = {"visual.proj_cls", "visual.selection_tokens.tokens", "visual.regional_heads.proj",
            "visual.regional_heads.norms.N.weight", "visual.regional_heads.norms.N.bias"} | \
    {f"visual.fusion.N.{x}.weight" for x in "qkv"}


def patterns(names):
    return {re.sub(r"\.\d+\.", ".N.", name) for name in names}


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def outputs(model, images, text):
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


def test_add_lora_trains_adapters_new_parts_and_logit_scale_only(tiny_model):
    names_before = {name for name, _ in tiny_model.named_parameters()}
    assert add_lora(tiny_model, 4) is tiny_model and type(tiny_model) is e2_core.E2Model and has_lora(tiny_model)
    towers = {"transformer.resblocks.N.", "visual.trunk.transformer.resblocks.N."}
    assert patterns(trainable(tiny_model)) == {t + x for t in towers for x in LORA} | E2_PARTS | {"logit_scale"}
    assert len([n for n in trainable(tiny_model) if ".lora_" in n]) == 2 * 3 * (2 + 4)  # text 2, image 4 blocks
    assert {n for n in names_before if is_e2_parameter(n)} <= trainable(tiny_model)  # E2's parts: whole, no LoRA
    assert not any(".lora_" in n or "base_layer" in n for n in names_before if is_e2_parameter(n))
    assert tiny_model.get_parameter("visual.trunk.transformer.resblocks.0.mlp.c_fc.lora_A.default.weight").shape \
        == (4, 64)
    frozen = {n for n, p in tiny_model.named_parameters() if not p.requires_grad}
    assert "visual.trunk.transformer.resblocks.0.attn.in_proj_weight" in frozen and "token_embedding.weight" in frozen

    clip = random_clip()
    add_lora(clip, 2)
    assert type(clip).__name__ == "CLIP"
    towers = {"transformer.resblocks.N.", "visual.transformer.resblocks.N."}
    assert patterns(trainable(clip)) == {t + x for t in towers for x in LORA} | {"logit_scale"}
    with pytest.raises(ValueError, match="already"):
        add_lora(clip, 2)


def test_injection_keeps_the_function_and_every_adapter_gets_a_gradient(tiny_model, tokenizer):
    images, text, entity_text = make_batch(tokenizer)
    before = outputs(tiny_model, images, text)
    add_lora(tiny_model, 4)
    after = outputs(tiny_model, images, text)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # B starts at zero

    perturb_adapters(tiny_model)
    tiny_model.train()
    out = tiny_model(images, text, entity_text)
    (out["image_features"].sum() + out["text_features"].sum()).backward()
    # nn.MultiheadAttention reads out_proj.weight instead of calling out_proj: its adapter must still count
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in tiny_model.named_parameters() if ".lora_" in n)


def test_merged_state_dict_is_a_plain_model_with_the_same_function(tiny_model, tokenizer):
    images, text, _ = make_batch(tokenizer)
    plain_keys = set(tiny_model.state_dict())
    original = outputs(tiny_model, images, text)
    add_lora(tiny_model, 4, alpha=8)
    perturb_adapters(tiny_model)
    injected_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    lora = outputs(tiny_model, images, text)
    assert not torch.allclose(lora[0], original[0], atol=1e-3) and not torch.allclose(lora[1], original[1], atol=1e-3)

    merged = merged_state_dict(tiny_model)
    assert set(merged) == plain_keys
    assert all(torch.equal(v, injected_state[k]) for k, v in tiny_model.state_dict().items())  # model untouched
    fresh = e2_core.create_e2(TINY)
    fresh.load_state_dict(merged, strict=True)
    for a, b in zip(lora, outputs(fresh, images, text)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    clip = random_clip()
    add_lora(clip, 2)
    perturb_adapters(clip)
    fresh = random_clip()
    fresh.load_state_dict(merged_state_dict(clip), strict=True)
    for a, b in zip(outputs(clip, images, text), outputs(fresh, images, text)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_lora_run_writes_plain_checkpoints(tmp_path, data_root):
    result = train(config(tmp_path, data_root, max_steps=2, checkpoint_every=1))
    folder = tmp_path / "run" / "stage2"
    first, second = (weights(folder / "checkpoints" / f"step_000000{i}") for i in (1, 2))
    best = e2_core.create_e2(None, pretrained=result["stage2"]).state_dict()
    assert set(best) == set(e2_core.create_e2(TINY).state_dict()) == set(first)
    assert not any("lora" in k or "base_layer" in k for k in best)
    assert all(torch.equal(best[k], second[k]) for k in best)
    changed = {k for k in first if not torch.equal(first[k], second[k])}
    assert "visual.trunk.transformer.resblocks.0.mlp.c_fc.weight" in changed  # the merged LoRA delta moved
    assert "transformer.resblocks.1.attn.out_proj.weight" in changed
    assert "visual.fusion.0.q.weight" in changed and "logit_scale" in changed
    assert not changed & {"visual.trunk.conv1.weight", "visual.trunk.transformer.resblocks.0.attn.in_proj_weight",
                          "token_embedding.weight", "visual.trunk.transformer.resblocks.0.mlp.c_fc.bias"}
    state = torch.load(folder / "checkpoints" / "step_0000002" / "training_state.pt", weights_only=True)
    assert any(".lora_A." in k for k in state["unmerged_model"])

    clip_result = train(config(tmp_path / "clip", data_root, method="clip-ft", stages=["finetune:epochs=1,lr=1e-3"],
                               max_steps=1))
    clip = e2_core.load_encoder(clip_result["finetune"]).model
    assert type(clip).__name__ == "CLIP" and not has_lora(clip)


class Interrupt(Exception):
    pass


def test_resume_of_a_lora_run_equals_an_uninterrupted_run(tmp_path, data_root):
    train(config(tmp_path / "a", data_root, checkpoint_every=1))

    def crash(stage, step, model, logs):
        if step == 3:
            raise Interrupt

    interrupted = config(tmp_path / "b", data_root, checkpoint_every=1)
    with pytest.raises(Interrupt):
        train(interrupted, callbacks=[crash])
    assert not (tmp_path / "b" / "run" / "stage2" / "done.json").exists()
    train(interrupted)  # resumes from step 2: unmerged base weights and adapters from training_state.pt
    a = weights(tmp_path / "a" / "run" / "stage2" / "best")
    b = weights(tmp_path / "b" / "run" / "stage2" / "best")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = logged_losses(tmp_path / "a" / "run" / "stage2"), logged_losses(tmp_path / "b" / "run" / "stage2")
    assert len(la) == 4 and la == lb  # step 3 ran twice, its record before the crash was dropped on resuming
