import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import e2_core
from e2_train import TrainConfig, train
from conftest import TINY, logged_losses as losses, train_config as config


def weights(path):
    return e2_core.load_encoder(str(path)).model.state_dict()




def test_loss_decreases(tmp_path, data_root):
    cfg = config(tmp_path, data_root, stages=["stage2:epochs=3,lr=2e-3"])
    train(cfg)
    history = losses(tmp_path / "run" / "stage2")
    assert len(history) == 12
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3 - 0.1, history
    done = json.loads((tmp_path / "run" / "stage2" / "done.json").read_text(), parse_constant=pytest.fail)
    assert done["steps"] == 12 and done["best"] is None  # no evaluator; strict JSON, no -Infinity
    assert done["device"] == "cpu" and done["processes"] == 1 and done["cpu_threads"] == torch.get_num_threads()


def test_two_stages_train_what_they_should(tmp_path, data_root):
    cfg = config(tmp_path, data_root, stages=["stage1:epochs=1", "stage2:epochs=1"], max_steps=2, checkpoint_every=1)
    start = e2_core.create_e2(TINY).state_dict()  # same seed-free init is not guaranteed; compare stages instead
    result = train(cfg)
    stage1, stage2 = weights(result["stage1"]), weights(result["stage2"])
    trunk_key, new_key = "visual.trunk.conv1.weight", "visual.fusion.0.q.weight"
    first = weights(tmp_path / "run" / "stage1" / "checkpoints" / "step_0000001")
    assert torch.equal(first[trunk_key], stage1[trunk_key])  # stage 1 leaves CLIP frozen
    assert not torch.equal(first[new_key], stage1[new_key])
    assert not torch.equal(stage1[trunk_key], stage2[trunk_key])  # stage 2 trains everything
    assert start.keys() == stage2.keys()


class Interrupt(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(tmp_path, data_root):
    straight = config(tmp_path / "a", data_root, stages=["stage1:epochs=1"], checkpoint_every=1)
    train(straight)

    def crash(stage, step, model, logs):
        if step == 3:
            raise Interrupt

    interrupted = config(tmp_path / "b", data_root, stages=["stage1:epochs=1"], checkpoint_every=1)
    with pytest.raises(Interrupt):
        train(interrupted, callbacks=[crash])
    assert not (tmp_path / "b" / "run" / "stage1" / "done.json").exists()
    train(interrupted)  # resumes from the step-2 checkpoint
    a = weights(tmp_path / "a" / "run" / "stage1" / "best")
    b = weights(tmp_path / "b" / "run" / "stage1" / "best")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "a" / "run" / "stage1") == losses(tmp_path / "b" / "run" / "stage1")  # step 3 once


def test_clip_ft_baseline_and_gradient_accumulation(tmp_path, data_root):
    cfg = config(tmp_path, data_root, method="clip-ft", batch_size=8, accumulate=2, max_steps=2)
    result = train(cfg)
    assert list(result) == ["finetune"]
    encoder = e2_core.load_encoder(result["finetune"])
    assert type(encoder.model).__name__ == "CLIP" and encoder.kind == "CLIP"
    assert len(losses(tmp_path / "run" / "finetune")) == 2
    # the settings only E2 trains with do not keep a CLIP-FT run folder from being resumed
    saved = tmp_path / "run" / "train_config.json"
    saved.write_text(saved.read_text().replace('"tokens_per_entity": 2', '"tokens_per_entity": 4'))
    assert train(cfg) == result


def test_evaluator_selects_the_best_checkpoint(tmp_path, data_root):
    scores = iter([3.0, 5.0, 4.0, 1.0])
    seen = []

    def evaluate(model, dataset):
        seen.append(len(dataset))
        return {"sumr": next(scores)}

    train(config(tmp_path, data_root, eval_every=1, checkpoint_every=1), evaluate=evaluate)
    folder = tmp_path / "run" / "stage2"
    evals = [json.loads(line) for line in open(folder / "metrics.jsonl") if "eval_step" in line]
    assert [e["sumr"] for e in evals] == [3.0, 5.0, 4.0, 1.0] and seen == [16] * 4
    assert json.loads((folder / "done.json").read_text())["best"] == 5.0
    best, step2 = weights(folder / "best"), weights(folder / "checkpoints" / "step_0000004")
    assert any(not torch.equal(best[k], step2[k]) for k in best)  # the best is step 2's model, not the last


def test_other_settings_refuse_an_existing_run(tmp_path, data_root):
    train(config(tmp_path, data_root, max_steps=1))
    with pytest.raises(ValueError, match="batch_size=16, not batch_size=8"):
        train(config(tmp_path, data_root, max_steps=1, batch_size=8))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(TrainConfig(**cfg_dict))
    torch.distributed.destroy_process_group()


def test_two_process_ddp_equals_one_process_with_the_global_batch(tmp_path, data_root):
    """gloo on CPU: 2 processes x 8 items, features gathered for the loss == 1 process x 16 items."""
    common = dict(method="clip-ft", max_steps=2, device="cpu")
    single = config(tmp_path / "single", data_root, batch_size=16, **common)
    train(single)
    ddp = config(tmp_path / "ddp", data_root, batch_size=8, **common)
    mp.spawn(_ddp_worker, args=(2, _free_port(), ddp.__dict__), nprocs=2, join=True)
    a = weights(tmp_path / "single" / "run" / "finetune" / "best")
    b = weights(tmp_path / "ddp" / "run" / "finetune" / "best")
    # Adam turns float-level gradient noise on near-zero gradients into steps of size lr (5e-5)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2 * 5e-5
    assert losses(tmp_path / "single" / "run" / "finetune") == pytest.approx(
        losses(tmp_path / "ddp" / "run" / "finetune"), abs=1e-5)


def test_stage_one_trains_exactly_the_new_parts(tmp_path, data_root, tiny_checkpoints):
    """From a CLIP checkpoint: after stage 1 the text tower, logit scale and image trunk are the CLIP's."""
    from e2_core.model import is_e2_parameter

    result = train(config(tmp_path, data_root, pretrained=tiny_checkpoints["clip"], stages=["stage1:steps=2"]))
    start, trained = weights(tiny_checkpoints["clip"]), weights(result["stage1"])
    clip_keys = {k.replace("visual.trunk.", "visual.") if k.startswith("visual.trunk.") else k: k for k in trained
                 if not is_e2_parameter(k)}
    assert set(clip_keys) == set(start) - {"visual.proj"}  # proj_cls replaces CLIP's image projection
    assert all(torch.equal(start[k], trained[ours]) for k, ours in clip_keys.items())
    init = e2_core.load_encoder(result["stage1"])  # every new part moved away from its initial value
    fresh = e2_core.create_e2(pretrained=tiny_checkpoints["clip"]).state_dict()
    new = [k for k in trained if is_e2_parameter(k)]
    assert new and all(not torch.equal(trained[k], fresh[k]) for k in new if "proj_cls" not in k), init


def test_gumbel_temperature_and_noise_follow_their_schedules_during_training(tmp_path, data_root):
    seen = []

    def record(stage, step, model, logs):
        block = model.visual.fusion[1]
        seen.append(((logs["tau"], logs["gumbel_noise"]), (block.tau, block.noise)))

    train(config(tmp_path, data_root, stages=["stage2:steps=4"], gumbel_noise_end=0.0), callbacks=[record])
    tau, noise = e2_core.TemperatureSchedule(2.0, 0.5, total_steps=4), e2_core.TemperatureSchedule(1.0, 0.0, 4)
    assert [logged for logged, _ in seen] == [(tau(step), noise(step)) for step in range(4)]
    assert all(logged == applied for logged, applied in seen) and seen[0][0] == (2.0, 1.0) and seen[-1][0][1] < 0.2
    with pytest.raises(ValueError, match="gumbel_noise_end=-1.0: must be >= 0"):
        config(tmp_path, data_root, gumbel_noise_end=-1.0)


def test_weight_decay_spares_norms_biases_scales_embeddings_and_selection_tokens(tiny_model):
    from e2_train import E2Training

    method = E2Training(tiny_model, config(Path("unused"), None))
    for name, p in tiny_model.named_parameters():
        p.requires_grad_(True)
    decay, rest = method.parameter_groups(1e-4)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decayed, spared = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in rest["params"]}
    assert decay["weight_decay"] == 1e-4 and rest["weight_decay"] == 0.0
    assert {"logit_scale", "visual.selection_tokens.tokens", "visual.trunk.class_embedding",
            "visual.trunk.positional_embedding", "positional_embedding", "token_embedding.weight",
            "visual.trunk.ln_pre.weight", "visual.trunk.ln_pre.bias", "ln_final.bias",
            "visual.regional_heads.norms.0.weight", "transformer.resblocks.0.mlp.c_fc.bias"} <= spared
    assert {"visual.trunk.conv1.weight", "visual.fusion.0.q.weight", "visual.fusion.1.v.weight", "visual.proj_cls",
            "visual.regional_heads.proj", "transformer.resblocks.0.attn.in_proj_weight", "text_projection"} <= decayed
    assert not decayed & spared and len(decayed | spared) == len(list(tiny_model.parameters()))


def test_a_run_that_fails_before_its_first_step_leaves_no_settings_behind(tmp_path, data_root):
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Nope'"):
        train(config(tmp_path, data_root, model="ViT-Nope"))
    with pytest.raises(Exception, match="unknown dataset 'no-such-data'; installed product datasets: .*synthetic"):
        train(config(tmp_path, data_root, dataset="no-such-data"))
    assert not (tmp_path / "run" / "train_config.json").exists()
    train(config(tmp_path, data_root, max_steps=1))  # the corrected command runs


def test_a_run_folder_is_resumed_only_with_the_settings_it_was_trained_with(tmp_path, data_root):
    import json

    cfg = config(tmp_path, data_root, max_steps=1)
    first = train(cfg)
    assert train(cfg) == first  # finished: the same settings return it at once
    with pytest.raises(ValueError, match=r"other settings \(stages=stage2:lr=5e-05,epochs=1.0,trains=all,"
                                         r"new_lr=0.0005, not stages=stage2:lr=5e-05,epochs=1.0,trains=all,"
                                         r"new_lr=0.001\); use another output folder"):
        train(config(tmp_path, data_root, max_steps=1, stages=["stage2:epochs=1,new_lr=1e-3"]))
    with pytest.raises(ValueError, match=r"other settings \(global_weight=0.8, not global_weight=0.5; "
                                         r"entity_weights=\{\}, not entity_weights=\{'season': 0.0\}\)"):
        train(config(tmp_path, data_root, max_steps=1, global_weight=0.5, entity_weights="season=0"))
    # a folder saved before some settings existed: missing keys are their defaults, an unset new_lr the default's
    saved = tmp_path / "run" / "train_config.json"
    old = json.loads(saved.read_text())
    for key in ("tokens_per_entity", "entity_weights"):
        del old[key]
    del old["stages"][0]["new_lr"]
    saved.write_text(json.dumps(old))
    assert train(cfg) == first
    # ... except a setting whose default changed: such a run trained with what it was then
    del old["gumbel_noise_end"]
    saved.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"other settings \(gumbel_noise_end=1.0, not gumbel_noise_end=0.0\)"):
        train(cfg)
    assert train(config(tmp_path, data_root, max_steps=1, gumbel_noise_end=1.0)) == first
    # a run of another number of processes (torchrun): another global batch and data order, not resumed
    assert old["processes"] == 1
    saved.write_text(json.dumps({**old, "gumbel_noise_end": 0.0, "processes": 2}))
    with pytest.raises(ValueError, match=r"other settings \(processes=2, not processes=1\)"):
        train(cfg)
    saved.write_text("{not json")
    with pytest.raises(ValueError, match="train_config.json is not a readable run configuration"):
        train(cfg)


def _catalog(root: Path, products: int, corrupt: int) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    rows = []
    for i in range(products):
        path = root / f"p{i}.png"
        if i == corrupt:
            path.write_bytes(b"\x89PNG not really")
        else:
            Image.new("RGB", (64, 64), (i * 13 % 255, 90, 200 - i * 7 % 200)).save(path)
        rows.append(json.dumps({"id": f"p{i}", "image": path.name, "text": f"product {i}", "brand": f"b{i % 3}"}))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    (root / "validation.jsonl").write_text("\n".join(rows[:4]) + "\n")
    return root


def test_two_processes_stay_in_step_when_one_shard_has_an_unreadable_image(tmp_path):
    """gloo on CPU: one process gets 7 readable items, the other 8; the run finishes and reports the skip."""
    data = _catalog(tmp_path / "catalog", products=16, corrupt=5)
    cfg = config(tmp_path, str(data), dataset="catalog", method="clip-ft", batch_size=8, max_steps=2, device="cpu")
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.__dict__), nprocs=2, join=True)
    folder = tmp_path / "run" / "finetune"
    assert json.loads((folder / "done.json").read_text())["skipped"] == 1
    assert "p5.png" in (folder / "skipped_images.txt").read_text()
    assert len(losses(folder)) == 1  # 16 items = one step of 2 x 8; max_steps caps at the epoch's end


def test_e2_takes_the_entities_of_the_dataset_it_trains_on(tmp_path, tiny_checkpoints):
    """A catalog with two entity columns: E2 gets exactly those, saves them, and the retrieval task runs on it."""
    from PIL import Image
    from e2_plugins.cli import main

    root = tmp_path / "catalog"
    root.mkdir()
    for split, count in (("train", 16), ("validation", 8)):
        rows = []
        for i in range(count):
            Image.new("RGB", (64, 64), (i * 15, 80, 160)).save(root / f"{split}{i}.png")
            rows.append(json.dumps({"image": f"{split}{i}.png", "text": f"coat {i}", "brand": f"b{i % 3}",
                                    "season": ["FW2016", "SS2017"][i % 2]}))
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = config(tmp_path, str(root), dataset="catalog", pretrained=tiny_checkpoints["clip"], batch_size=8,
                 stages=["stage1:steps=1", "stage2:steps=1"])
    result = train(cfg)
    encoder = e2_core.load_encoder(result["stage2"])
    assert encoder.entities == ("brand", "season")
    assert e2_core.load_encoder(result["stage1"]).entities == ("brand", "season")
    assert main(["run", "retrieval", "--dataset", "catalog", "--data-root", str(root / "validation.jsonl"),
                 "--encoder", result["stage2"], "--baseline", tiny_checkpoints["clip"], "--protocol", "full",
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "selection.png").is_file()


def test_e2_trains_on_amazon_fashion_with_its_one_entity(tmp_path, tiny_checkpoints):
    from test_plugins import _amazon

    root = _amazon(tmp_path / "amazon")  # 4 training products, 2 test products, brands "Acme" and "Unknown"
    cfg = config(tmp_path, root, dataset="amazon-fashion", pretrained=tiny_checkpoints["clip"], batch_size=4,
                 stages=["stage1:steps=1", "stage2:steps=1"])
    result = train(cfg)
    assert e2_core.load_encoder(result["stage2"]).entities == ("brand",)
    assert len(losses(tmp_path / "run" / "stage2")) == 1


def test_a_resumed_run_repeats_no_metrics_or_skipped_images_and_clears_stale_files(tmp_path):
    """Crash after step 3 is logged but before its checkpoint: the resumed run's files equal an uninterrupted run's."""
    data = tmp_path / "catalog"
    _catalog(data, products=32, corrupt=-1)
    for i in range(0, 32, 3):  # every third image unreadable: every batch skips some
        (data / f"p{i}.png").write_bytes(b"\x89PNG not really")
    common = dict(dataset="catalog", method="clip-ft", batch_size=8, checkpoint_every=1)
    train(config(tmp_path / "a", str(data), **common))

    def crash(stage, step, model, logs):
        if step == 3:
            raise Interrupt

    interrupted = config(tmp_path / "b", str(data), **common)
    with pytest.raises(Interrupt):
        train(interrupted, callbacks=[crash])
    a, b = tmp_path / "a" / "run" / "finetune", tmp_path / "b" / "run" / "finetune"
    stale = [b / "latest.tmp", b / "checkpoints" / "step_0000002" / ".model.safetensors.x1.tmp",
             b / "checkpoints" / "step_0000009" / ".config.json.x2.tmp"]  # left by a write cut off mid-way
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_text("partial")
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"stage": "finetune", "loss": 1.')  # a record cut off mid-line
    train(interrupted)
    steps = [json.loads(line)["step"] for line in open(b / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4] and losses(b) == losses(a)
    assert (b / "skipped_images.txt").read_text() == (a / "skipped_images.txt").read_text()
    assert len((b / "skipped_images.txt").read_text().splitlines()) == 11
    assert json.loads((b / "done.json").read_text())["skipped"] == json.loads((a / "done.json").read_text())["skipped"]
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]


def test_a_training_state_that_pickles_objects_is_refused_without_torchs_advice(tmp_path, data_root):
    import argparse
    from e2_core.errors import CheckpointError

    cfg = config(tmp_path, data_root, method="clip-ft", max_steps=1, checkpoint_every=1)
    train(cfg)
    folder = tmp_path / "run" / "finetune"
    (folder / "done.json").unlink()
    state = folder / "checkpoints" / "step_0000001" / "training_state.pt"
    torch.save({"step": 1, "args": argparse.Namespace(lr=1)}, state)
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    assert str(err.value) == (f"{state} holds more than tensors (Unsupported global: GLOBAL argparse.Namespace), so "
                              f"it is not read; it is not a file this trainer wrote: remove {state.parent} and "
                              f"{folder / 'latest.json'} to start the stage afresh")


def test_the_random_start_is_said_only_when_the_start_is_random(tmp_path, data_root, caplog):
    cfg = config(tmp_path, data_root, method="clip-ft", stages=["finetune:steps=2"], checkpoint_every=1)

    def crash(stage, step, model, logs):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, callbacks=[crash])
    assert "starts from random weights" in caplog.text  # a fresh run from random weights says so
    assert "No pretrained weights loaded" not in caplog.text  # open_clip's own warning is not built into it
    caplog.clear()
    train(cfg)  # resumed: the checkpoint's weights replace the random ones
    assert "random weights" not in caplog.text


def test_entity_weights_reach_the_regional_loss(tiny_model):
    from e2_train import E2Training

    method = E2Training(tiny_model, config(Path("unused"), None, entity_weights="season=3,brand=0"))
    weights = dict(zip(tiny_model.entities, method.objective.entity_weights))
    assert weights["season"] == 3.0 and weights["brand"] == 0.0
    assert all(w == 1.0 for e, w in weights.items() if e not in ("season", "brand"))
    with pytest.raises(ValueError, match="unknown entities"):
        E2Training(tiny_model, config(Path("unused"), None, entity_weights="colour=2"))
    with pytest.raises(ValueError, match="entity_weights='season=-1'"):
        config(Path("unused"), None, entity_weights="season=-1")


def test_tokens_per_entity_reach_an_e2_built_on_a_clip():
    import open_clip
    from e2_train import E2Training

    clip = open_clip.create_model(TINY)
    method = E2Training(clip, config(Path("unused"), None, tokens_per_entity=3), entities=("brand", "season"), arch=TINY)
    assert method.model.config.tokens_per_entity == 3
    assert method.model.visual.selection_tokens.tokens.shape[0] == 6
    with pytest.raises(ValueError, match="tokens_per_entity=0: must be >= 1"):
        config(Path("unused"), None, tokens_per_entity=0)


def test_selection_settings_reach_an_e2_built_on_a_clip_and_its_loss(tmp_path, data_root):
    import open_clip
    from e2_train import E2Training

    cfg = config(Path("unused"), None, fusion_layers=[1, 2], gumbel_tau=4.0, gumbel_tau_end=1.0,
                 patch_sharing_weight=0.5)
    method = E2Training(open_clip.create_model(TINY), cfg, entities=("brand", "season"), arch=TINY)
    assert method.model.visual.fusion_layers == (1, 2) and method.objective.patch_sharing_weight == 0.5
    method.on_step(0, 10)
    assert method.model.visual.fusion[0].tau == 4.0
    method.on_step(10, 10)
    assert method.model.visual.fusion[1].tau == 1.0
    train(config(tmp_path, data_root, stages=["stage2:steps=2"], patch_sharing_weight=0.5))
    logged = [json.loads(line) for line in (tmp_path / "run" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [0 < r["patch_sharing"] <= 1 for r in logged if "loss" in r] == [True, True]
    faded = tmp_path / "faded"
    train(config(faded, data_root, stages=["stage1:steps=3", "stage2:steps=2"], fade_patches=True))
    gates = {stage: [json.loads(line).get("patch_gate") for line in (faded / "run" / stage / "metrics.jsonl")
                     .read_text().splitlines() if "loss" in line] for stage in ("stage1", "stage2")}
    schedule = e2_core.TemperatureSchedule(1.0, 0.0, total_steps=3)
    assert gates == {"stage1": [schedule(step) for step in range(3)], "stage2": [None, None]}
    with pytest.raises(ValueError, match="fusion_layers takes two layer counts"):
        config(Path("unused"), None, fusion_layers=[3])
    with pytest.raises(ValueError, match="gumbel_tau and gumbel_tau_end must be > 0"):
        config(Path("unused"), None, gumbel_tau_end=0.0)
    with pytest.raises(ValueError, match="patch_sharing_weight=-1.0: must be >= 0"):
        config(Path("unused"), None, patch_sharing_weight=-1.0)


def test_a_stage_can_give_the_new_parts_their_own_learning_rate(tmp_path, data_root, tiny_checkpoints):
    """``new_lr=0`` in a stage that trains everything: the CLIP's weights move, E2's added parts do not."""
    from e2_core.model import is_e2_parameter
    from e2_train.config import Stage

    assert Stage.parse("stage2:lr=1e-4,new_lr=1e-3") == Stage("stage2", lr=1e-4, new_lr=1e-3)
    assert Stage("stage2", new_lr=0.0).over(Stage("stage2", lr=1e-4, steps=3)).new_lr == 0.0
    with pytest.raises(ValueError, match="keys lr, epochs, steps, trains, new_lr"):
        Stage.parse("stage2:head_lr=1e-3")
    e2 = str(tmp_path / "e2")
    e2_core.save_pretrained(e2_core.create_e2(pretrained=tiny_checkpoints["clip"]), e2)
    result = train(config(tmp_path, data_root, pretrained=e2, stages=["stage2:steps=2,lr=1e-3,new_lr=0"]))
    start, trained = weights(e2), weights(result["stage2"])
    new = [k for k in start if is_e2_parameter(k)]
    assert new and all(torch.equal(start[k], trained[k]) for k in new)
    assert not torch.equal(start["visual.trunk.conv1.weight"], trained["visual.trunk.conv1.weight"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["new_lr"] for r in logged if "step" in r and "loss" in r] == [0.0, 0.0]


def test_a_bad_stage_on_the_command_line_says_which_keys_exist(capsys):
    from e2_plugins.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--stages", "stage2:head_lr=1e-3"])
    assert "keys lr, epochs, steps, trains, new_lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--stages", "stage2:new_lr=fast"])
    assert "new_lr='fast' is not a float" in capsys.readouterr().err
    # each stage's run is OUT/NAME: a repeated name would find the first one's run done and skip the second
    assert main(["train", "--stages", "stage1:steps=2", "stage1:steps=4"]) == 2
    assert "['stage1'] repeat in ['stage1', 'stage1']" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, least", [("max_steps", 0, 1), ("warmup_steps", -5, 0), ("eval_every", -1, 0),
                                                  ("workers", -1, 0), ("weight_decay", -0.1, 0), ("batch_size", 0, 1)])
def test_counts_out_of_range_are_refused_before_training(option, value, least, tmp_path, data_root):
    with pytest.raises(ValueError, match=f"{option}={value}: must be >= {least}"):
        config(tmp_path, data_root, **{option: value})
    assert not (tmp_path / "run").exists()


def test_the_entity_control_is_clip_ft_plus_the_regional_losses_on_the_image_embedding(tokenizer):
    """clip-ft-entities (the control for E2's regions): CLIP-FT's loss at global_weight 1, and otherwise the
    same weighted regional losses E2 trains with, each entity scored against the CLIP's own image embedding."""
    import types

    import open_clip
    from e2_core.loss import contrastive_loss
    from e2_core.model import text_tower
    from e2_train import CLIPFineTuning, EntityFineTuning
    from e2_train.distributed import Context
    from conftest import make_batch

    images, text, entity_text = make_batch(tokenizer)
    batch = types.SimpleNamespace(images=images, text=e2_core.trim_padding(text), entity_text=entity_text)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY)
    ctx, sizes = Context(0, 1, torch.device("cpu")), None
    entities = e2_core.FASHIONGEN_ENTITIES
    plain = CLIPFineTuning(clip, config(Path("unused"), None, method="clip-ft"), entities)
    expected = plain.loss(plain(batch), ctx, sizes)["loss"]
    only_global = EntityFineTuning(clip, config(Path("unused"), None, method="clip-ft", global_weight=1.0), entities)
    assert torch.allclose(only_global.loss(only_global(batch), ctx, sizes)["loss"], expected, atol=1e-6)
    control = EntityFineTuning(clip, config(Path("unused"), None, method="clip-ft", global_weight=0.8,
                                            entity_weights="season=0"), entities)
    losses = control.loss(control(batch), ctx, sizes)
    image = clip.encode_image(images, normalize=True)
    per_entity = {}
    for i, name in enumerate(entities):
        strings = text_tower(clip, entity_text.tokens[entity_text.index[:, i]], normalize=True)
        per_entity[name] = contrastive_loss(image, strings, clip.logit_scale.exp())
        assert torch.allclose(losses[f"loss_{name}"], per_entity[name], atol=1e-5), name
    regional = sum(per_entity[e] for e in entities if e != "season") / (len(entities) - 1)
    assert torch.allclose(losses["loss"], 0.8 * expected + 0.2 * regional, atol=1e-5)


def test_the_entity_control_trains_through_the_command_line(tmp_path, data_root):
    from e2_plugins.cli import main

    assert main(["train", "--method", "clip-ft-entities", "--model", TINY, "--data-root", data_root, "--stages",
                 "finetune:steps=2", "--batch-size", "16", "--workers", "0", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "finetune" / "metrics.jsonl")]
    logged = [r for r in records if "loss" in r]
    assert {"loss", "loss_global", "loss_brand", "loss_season"} <= set(logged[0]) and len(logged) == 2
    assert not e2_core.load_encoder(str(tmp_path / "run" / "finetune" / "best")).has_regions
