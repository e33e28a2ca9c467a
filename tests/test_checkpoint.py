import json
import re
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP

import e2_core
from e2_core import CheckpointError, save_pretrained
from e2_core.reference import convert_state_dict as convert_reference_state_dict, is_reference_checkpoint
from conftest import TINY, make_batch


def test_round_trip_is_bit_exact(tiny_model, tokenizer, tmp_path):
    tiny_model.eval()
    save_pretrained(tiny_model, tmp_path / "ckpt")
    loaded = e2_core.create_e2(None, pretrained=tmp_path / "ckpt").eval()
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    images, text, entity_text = make_batch(tokenizer)
    a, b = tiny_model(images, text, entity_text), loaded(images, text, entity_text)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == tiny_model.config
    assert loaded.visual.preprocess_cfg == tiny_model.visual.preprocess_cfg
    assert e2_core.get_tokenizer(tmp_path / "ckpt")(["x"]).shape == (1, 32)


def test_compact_checkpoint_keeps_the_rows_it_names_in_half_precision(tiny_model, tokenizer, tmp_path):
    from e2_core.checkpoint import compact_state_dict

    tiny_model.eval()
    images, text, entity_text = make_batch(tokenizer)
    used = torch.cat([text.flatten(), entity_text.tokens.flatten()]).unique()
    state = tiny_model.state_dict()
    save_pretrained(tiny_model, tmp_path / "ckpt", state_dict=compact_state_dict(state, {"token_embedding.weight": used}))
    loaded = e2_core.create_e2(None, pretrained=tmp_path / "ckpt").eval()
    table = loaded.token_embedding.weight.detach()
    assert table.dtype == torch.float32 and table.shape == state["token_embedding.weight"].shape
    assert torch.equal(table[used], state["token_embedding.weight"][used].half().float())
    others = torch.ones(len(table), dtype=torch.bool)
    others[used] = False
    assert others.any() and not table[others].any()  # rows not kept load as zeros
    for name, tensor in loaded.state_dict().items():
        if name != "token_embedding.weight" and tensor.is_floating_point():
            assert torch.equal(tensor, state[name].half().float()), name
    with torch.no_grad():
        a, b = tiny_model(images, text, entity_text), loaded(images, text, entity_text)
    for key in ("image_features", "text_features", "entity_text_features", "image_regional_features"):
        assert torch.allclose(a[key], b[key], atol=5e-3), key  # texts of kept rows only: fp16 rounding apart
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_size < 0.6 * sum(
        v.numel() * v.element_size() for v in state.values())


def test_compact_rows_that_do_not_fit_are_refused(tiny_model, tmp_path):
    from e2_core.checkpoint import compact_state_dict

    state = compact_state_dict(tiny_model.state_dict(), {"token_embedding.weight": torch.arange(10)})
    state["token_embedding.weight.kept_rows"] = torch.arange(10) + 10 ** 6
    save_pretrained(tiny_model, tmp_path / "ckpt", state_dict=state)
    with pytest.raises(CheckpointError, match=r"token_embedding\.weight\.kept_rows does not index token_embedding"):
        e2_core.create_e2(None, pretrained=tmp_path / "ckpt")


def test_checkpoint_config_overrides(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    loaded = e2_core.create_e2(TINY, pretrained=tmp_path / "ckpt", stochastic_eval=True)
    assert loaded.config.stochastic_eval and loaded.visual.fusion[0].stochastic_eval


def test_wrong_architecture_names_both(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"ViT-Ti-16-64.*ViT-B-32.*was requested"):
        e2_core.create_e2("ViT-B-32", pretrained=tmp_path / "ckpt")


def test_weights_of_another_e2_shape_are_refused(tmp_path):
    save_pretrained(e2_core.create_e2(TINY, entities=("brand",)), tmp_path / "one")
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    config["e2_config"]["entities"] = ["brand", "season"]
    (tmp_path / "one" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit E2Model\(ViT-Ti-16-64, 2 entities\)"):
        e2_core.create_e2(None, pretrained=tmp_path / "one")


def test_not_a_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"format_version"', '"format_version" 1,', 1))
    with pytest.raises(CheckpointError, match=r"config\.json: malformed JSON at line 3"):
        e2_core.create_e2(None, pretrained=tmp_path / "ckpt")
    config.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not an E2 checkpoint config"):
        e2_core.create_e2(None, pretrained=tmp_path / "ckpt")
    edited = json.loads(text)
    edited["e2_config"]["gumbel_noise_end"] = -1
    config.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=r"config\.json describes a model this version cannot build: "
                                              r"E2Config\.gumbel_noise_end must be >= 0, got -1"):
        e2_core.load_encoder(tmp_path / "ckpt")
    config.write_text(text)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        e2_core.create_e2(None, pretrained=tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        e2_core.create_e2(None, pretrained=tmp_path / "ckpt")
    with pytest.raises(ValueError, match="neither a file"):
        e2_core.create_e2(TINY, pretrained=tmp_path / "nothing-here")


def test_local_clip_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(3)
    clip = open_clip.create_model(TINY)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    model = e2_core.create_e2(TINY, pretrained=str(tmp_path / "clip.pt"))
    assert torch.equal(model.visual.trunk.conv1.weight, clip.visual.conv1.weight)
    assert torch.equal(model.visual.proj_cls, clip.visual.proj)
    assert torch.equal(model.token_embedding.weight, clip.token_embedding.weight)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "notes.txt").write_text("red shirt\nblue jeans\n")   # torch's unpickler fails with an IndexError
    config = json.loads((Path(e2_core.__file__).parent / "model_configs" / f"{TINY}.json").read_text())
    other = CLIP(config["embed_dim"], config["vision_cfg"], {**config["text_cfg"], "width": 32})
    torch.save(other.state_dict(), tmp_path / "other.pt")             # another text width: open_clip asserts
    for name in ("garbage.pt", "notes.txt", "other.pt"):
        with pytest.raises(CheckpointError, match="could not load CLIP weights .*is it a CLIP weights file of this"):
            e2_core.create_e2(TINY, pretrained=str(tmp_path / name))


def test_unreachable_pretrained_tag_fails_fast_offline():
    with pytest.raises(CheckpointError, match="local CLIP weights file"):
        e2_core.create_e2("ViT-B-32", pretrained="laion2b_s34b_b79k")


# --- reference checkpoints -----------------------------------------------------------------------

def to_reference_layout(model):
    """Inverse of the importer, written independently here: our state dict in the authors' key layout."""
    state, out = model.state_dict(), {}
    n = model.config.num_tokens
    for key, value in state.items():
        if key == "visual.selection_tokens.tokens":
            for j in range(n):
                out[f"visual.token_{n - j}_embedding"] = value[j]
        elif m := re.fullmatch(r"visual\.fusion\.(\d)\.([qkv])\.weight", key):
            out[f"visual.proj_{m.group(2)}{'2' if m.group(1) == '1' else ''}"] = value.t()
        elif m := re.fullmatch(r"visual\.regional_heads\.norms\.(\d)\.(\w+)", key):
            out[f"visual.ln_s{int(m.group(1)) + 1}.{m.group(2)}"] = value
        elif key == "visual.regional_heads.proj":
            for k in range(value.shape[0]):
                out[f"visual.proj_s{k + 1}"] = value[k]
        elif key.startswith("visual.trunk."):
            out["visual." + key.removeprefix("visual.trunk.")] = value
        else:
            out[key] = value
    width = state["visual.proj_cls"].shape[0]
    out["visual.proj"] = torch.randn_like(state["visual.proj_cls"])  # defined but unused by the reference
    out["visual.proj_cls_mid"] = torch.randn_like(state["visual.proj_cls"])
    out["visual.ln_selection.weight"], out["visual.ln_selection.bias"] = torch.ones(width), torch.zeros(width)
    return out


def test_reference_checkpoint_import_round_trip(tokenizer, tmp_path):
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY, force_quick_gelu=True)  # the reference is OpenAI's CLIP
    model = e2_core.E2Model(clip, e2_core.E2Config(compat="reference"), TINY, {}).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in to_reference_layout(model).items()}},
               tmp_path / "best.pth")
    assert is_reference_checkpoint(tmp_path / "best.pth")
    imported = e2_core.create_e2(TINY, pretrained=tmp_path / "best.pth").eval()
    assert imported.config.compat == "reference"
    images, _, _ = make_batch(tokenizer)
    a, b = model.encode_image_regions(images), imported.encode_image_regions(images)
    assert torch.equal(a.image_features, b.image_features)
    assert torch.equal(a.regional_features, b.regional_features)
    assert torch.equal(a.selected_patches, b.selected_patches)


def test_reference_token_order_and_quirks():
    torch.manual_seed(0)
    model = e2_core.create_e2(TINY, compat="reference")
    ref = to_reference_layout(model)
    for i in range(1, 11):
        ref[f"visual.token_{i}_embedding"] = torch.full((64,), float(i))
    converted = convert_reference_state_dict(ref, 10)
    # the reference prepends token_1 first, so its sequence starts with token_10
    assert converted["visual.selection_tokens.tokens"][:, 0].tolist() == [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    heads = model.visual.regional_heads
    assert [list(g) for g in heads.groups] == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]  # last token dropped
    assert heads.norm_index == [0, 1, 2, 3, 3]  # group 5 reuses group 4's norm


def test_training_state_pickles_are_refused(tmp_path):
    import argparse
    torch.save({"state_dict": {"visual.token_1_embedding": torch.zeros(2)}, "args": argparse.Namespace(lr=1)},
               tmp_path / "ckpt.pth.tar")
    with pytest.raises(CheckpointError, match=r"holds more than tensors \(Unsupported global: GLOBAL argparse.Namespace") as err:
        e2_core.load_encoder(f"{TINY}:{tmp_path / 'ckpt.pth.tar'}")
    assert "weights_only=False" not in str(err.value) and len(str(err.value)) < 400
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, tmp_path / "other.pth")
    assert not is_reference_checkpoint(tmp_path / "other.pth")


@pytest.mark.parametrize("layout", ["model_key", "bare", "legacy"])
def test_reference_checkpoints_in_other_containers_are_imported(tokenizer, tmp_path, layout):
    torch.manual_seed(0)
    model = e2_core.E2Model(open_clip.create_model(TINY, force_quick_gelu=True),
                            e2_core.E2Config(compat="reference")).eval()
    state = to_reference_layout(model)
    path = tmp_path / "best.pth"
    if layout == "model_key":
        torch.save({"model": state, "epoch": 3}, path)
    elif layout == "bare":
        torch.save(state, path)
    else:  # the pre-1.6 (non-zip) torch.save format
        torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    assert is_reference_checkpoint(path)
    imported = e2_core.load_encoder(f"{TINY}:{path}").eval()
    images, _, _ = make_batch(tokenizer)
    assert torch.equal(model.encode_image(images), imported.encode_image(images))


def test_a_file_that_is_not_a_reference_checkpoint_says_what_it_holds(tmp_path):
    torch.save({"weights": {"visual.token_1_embedding": torch.zeros(2)}, "step": 1}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"not a reference E2 checkpoint: no visual.token_1_embedding "
                                              r"\(it holds \['step', 'weights'\]\)"):
        e2_core.load_encoder(f"{TINY}:{tmp_path / 'odd.pth'}")


ABSURD = [  # (edit of a saved config.json, what the message names)
    (lambda c: c["clip_config"]["vision_cfg"].update(layers=1e7), "clip_config.vision_cfg.layers must be an integer"),
    (lambda c: c["clip_config"]["vision_cfg"].update(width=10**9), "clip_config.vision_cfg.width is 1000000000"),
    (lambda c: c["clip_config"]["text_cfg"].update(vocab_size=10**12), "clip_config.text_cfg.vocab_size is"),
    (lambda c: c["e2_config"].update(tokens_per_entity=10**6), "e2_config.tokens_per_entity is 1000000"),
    (lambda c: c.update(clip_config="ViT-B-32"), "clip_config must be an object, not str"),
    (lambda c: c["preprocess_cfg"].update(std=[0, 0, 0]), "preprocess_cfg.std must be positive"),
    (lambda c: c["preprocess_cfg"].update(mean="rgb"), "preprocess_cfg.mean must be a list of 3 numbers"),
    (lambda c: c.update(format_version="2"), "format_version must be an integer, not '2'"),
    (lambda c: c["clip_config"]["vision_cfg"].update(layers=200, width=16384, head_width=64),
     "parameters alone need about .* GiB, more than this machine's"),
]


def test_an_absurd_config_is_one_line_before_anything_is_built(tiny_model, tmp_path):
    """config.json values are checked for type and range, and the parameters' memory against the machine's,
    before a model is built: a damaged config must never grow a process until the system stops it. Loaded in
    one subprocess whose data segment is capped, so that a missed check fails instead of taking the machine."""
    import subprocess
    import sys

    folders = []
    for i, (edit, _) in enumerate(ABSURD):
        save_pretrained(tiny_model, tmp_path / f"ckpt{i}")
        config = json.loads((tmp_path / f"ckpt{i}" / "config.json").read_text())
        edit(config)
        (tmp_path / f"ckpt{i}" / "config.json").write_text(json.dumps(config))
        folders.append(str(tmp_path / f"ckpt{i}"))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30)); import e2_core\n"
            "for folder in sys.argv[1:]:\n    try:\n        e2_core.load_encoder(folder)\n        print('LOADED')\n"
            "    except e2_core.CheckpointError as err:\n        print(str(err).replace(chr(10), ' '))")
    run = subprocess.run([sys.executable, "-c", code, *folders], capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and len(lines) == len(ABSURD), run.stderr[-800:]
    for folder, line, (_, message) in zip(folders, lines, ABSURD):
        assert line.startswith(f"{folder}/config.json") and re.search(message, line), line


@pytest.mark.parametrize("content, message", [(b'{"format": "e2-plugins/encoder", "x": "\xff\xfe"}', "not UTF-8 text"),
                                              (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply")],
                         ids=["not-utf8", "nested"])
def test_a_config_that_is_not_json_text_names_the_file(content, message, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_bytes(content)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / 'ckpt' / 'config.json'))}: {message}"):
        e2_core.load_encoder(tmp_path / "ckpt")
