import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import e2_core
from e2_core import registry
from e2_plugins.cli import main, task_parser
from conftest import TINY


def test_project_plugins_are_discovered_through_entry_points():
    tasks = {p.name: p for p in registry.discover(registry.TASK_GROUP)}
    assert "embed" in tasks
    assert tasks["embed"].distribution.startswith("e2-plugins")
    assert isinstance(tasks["embed"].load(), registry.Task)


def fake_entry_points(monkeypatch, *eps):
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep for ep in eps if ep.group == group])


def test_broken_plugin_is_listed_with_its_error(monkeypatch, capsys):
    fake_entry_points(monkeypatch,
                      EntryPoint("broken", "no_such_module_xyz:task", registry.TASK_GROUP),
                      EntryPoint("embed", "e2_embed:task", registry.TASK_GROUP),
                      EntryPoint("diffusers", "no_such_adapter:adapter", registry.ADAPTER_GROUP))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "FAILED TO LOAD: ModuleNotFoundError" in out
    assert "embed" in out and "Encode images" in out
    assert "diffusers" in out
    assert "datasets (e2_plugins.datasets)" in out and "encoders (e2_plugins.encoders)" in out
    assert main(["run", "broken"]) == 2
    assert 'failed to load plugin "broken"' in capsys.readouterr().err


def test_function_entry_points_become_tasks(monkeypatch):
    fake_entry_points(monkeypatch, EntryPoint("hello", "tests_plugin_hello:run", registry.TASK_GROUP))

    def run(name: str = "world", times: int = 1, loud: bool = False):
        """Say hello.

        Args:
            name: who to greet
        """
        return {"greeting": ("HELLO " if loud else "hello ") * times + name}

    monkeypatch.setitem(__import__("sys").modules, "tests_plugin_hello", type("M", (), {"run": staticmethod(run)}))
    task = registry.get_task("hello")
    parser = task_parser(task)
    assert vars(parser.parse_args(["--times", "2", "--loud"])) == {"name": "world", "times": 2, "loud": True}
    assert "who to greet" in parser.format_help()


def test_unknown_task_is_a_clear_error(capsys):
    assert main(["run", "no-such-task"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'no-such-task'" in err and "embed" in err


def test_help_and_info(capsys):
    assert main([]) == 0
    assert "run" in capsys.readouterr().out
    assert main(["info", TINY]) == 0
    out = capsys.readouterr().out
    assert "selection tokens (10 x width)" in out and "fusion block 2" in out and "% of CLIP" in out
    assert main(["run"]) == 2


def test_parameter_overhead_of_vit_b32_matches_hand_count():
    import open_clip
    from e2_core.summary import parameter_summary
    with torch.device("meta"):  # shapes only
        model = e2_core.E2Model(open_clip.CLIP(**open_clip.get_model_config("ViT-B-32")), e2_core.E2Config(),
                                "ViT-B-32")
    _, totals = parameter_summary(model)
    width, dim = 768, 512
    hand = 10 * width + 2 * 3 * width * width + 5 * (2 * width + width * dim)
    assert totals["added"] == hand
    assert totals["clip"] == 151_277_313  # open_clip ViT-B-32


def write_images(folder: Path, n: int):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (80, 70), (i * 40, 100, 200)).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")


def test_embed_task_reports_unreadable_images(tmp_path, capsys, tiny_checkpoints):
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "texts.txt").write_text("a red shirt\nblue jeans\n")
    out = tmp_path / "emb.safetensors"
    code = main(["run", "embed", "--images", str(tmp_path / "imgs"), "--texts", str(tmp_path / "texts.txt"),
                 "--encoder", tiny_checkpoints["e2"], "--out", str(out), "--device", "cpu", "--regions",
                 "--batch-size", "2"])
    assert code == 0
    umask = __import__("os").umask(0)
    __import__("os").umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # the user's normal permissions, not 0600
    report = capsys.readouterr().out
    assert '"images": 3' in report and "broken.jpg" in report
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("image_features").shape == (3, 64)
        assert f.get_tensor("image_regional_features").shape == (3, 5, 64)
        assert f.get_tensor("text_features").shape == (2, 64)
        assert "broken.jpg" not in f.metadata()["images"]
    assert main(["run", "embed", "--images", str(tmp_path / "imgs"), "--encoder", tiny_checkpoints["e2"], "--strict",
                 "--out", str(out), "--device", "cpu"]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_embed_task_missing_input_is_a_clear_error(tmp_path, tiny_checkpoints):
    with pytest.raises(FileNotFoundError, match="no such folder or list file"):
        registry.get_task("embed").run(images=tmp_path / "nowhere", encoder=tiny_checkpoints["e2"])


def test_run_and_data_explain_themselves(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: e2-plugins run TASK" in out and "cir" in out and "caption" in out
    assert main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "amazon-fashion" in out
    assert main(["data"]) == 2
    with pytest.raises(SystemExit):
        main(["run", "cir", "--help"])
    help_text = capsys.readouterr().out
    assert "usage: e2-plugins run cir" in help_text and "(default: demo:e2)" in help_text


def test_every_option_shows_its_default_and_errors_use_the_flag_names(tmp_path, capsys):
    from e2_plugins.cli import task_parser
    from e2_plugins.commands import COMMANDS, DATA_BUILDERS

    tasks = [registry.get_task(p.name) for p in registry.discover(registry.TASK_GROUP)]
    for task in tasks + list(COMMANDS.values()) + list(DATA_BUILDERS.values()):
        for action in task_parser(task)._actions:
            if action.dest != "help" and not action.required:
                assert "(default: " in (action.help or ""), (task.name, action.dest)
    assert "(default: --no-strict)" in task_parser(registry.get_task("retrieval")).format_help()
    assert main(["data", "amazon-fashion", "--metadata", str(tmp_path / "meta.json"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "e2-plugins: error: no image source: pass --images-dir=<folder with one sub-folder of images per ASIN> to use "
        "images you have, or --download to download the image URLs of the metadata\n")
    assert main(["data", "amazon-fashion", "--metadata", "m.json", "--download", "--test-fraction", "2"]) == 2
    assert capsys.readouterr().err == "e2-plugins: error: --test-fraction must be in [0, 1), got 2.0\n"
    assert main(["data", "synthetic", "--fashioniq-triplets", "-3", "--out", str(tmp_path / "syn")]) == 2
    assert capsys.readouterr().err == "e2-plugins: error: --fashioniq-triplets=-3: must be >= 0\n"
    with pytest.raises(SystemExit):
        main(["data", "synthetic", "--size", "huge", "--out", str(tmp_path / "syn")])
    assert "invalid choice: 'huge' (choose from 'tiny', 'small')" in capsys.readouterr().err
    assert not (tmp_path / "syn").exists()


def test_embed_reads_a_catalogs_image_column_and_names_a_file_that_is_not_utf8(tmp_path, capsys, tiny_checkpoints):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 20, 20)).save(tmp_path / f"p{i}.png")
    (tmp_path / "products.csv").write_text("id,image,text,brand\np0,p0.png,Coat,A\np0,p1.png,,\np1,p2.png,Hat,B\n")
    texts = tmp_path / "texts.txt"
    texts.write_bytes("robe à fleurs\n".encode("latin-1"))
    args = ["run", "embed", "--images", str(tmp_path / "products.csv"), "--texts", str(texts), "--encoder",
            tiny_checkpoints["clip"], "--out", str(tmp_path / "emb.safetensors"), "--device", "cpu", "--workers", "0"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"e2-plugins: error: {texts}:1: byte 0xe0 is not utf-8 text; give the file's encoding, e.g. --encoding=latin-1 "
        "or --encoding=cp1252, or save the file as UTF-8\n")
    assert main(args + ["--encoding", "latin-1"]) == 0
    with safe_open(str(tmp_path / "emb.safetensors"), "pt") as f:
        assert f.get_tensor("image_features").shape[0] == 3 and json.loads(f.metadata()["texts"]) == ["robe à fleurs"]
        assert json.loads(f.metadata()["images"]) == [str(tmp_path / f"p{i}.png") for i in range(3)]


def test_train_and_run_refuse_an_unknown_dataset_alike(tmp_path, capsys):
    assert main(["train", "--dataset", "nope", "--out", str(tmp_path / "run")]) == 2
    from_train = capsys.readouterr().err
    assert main(["run", "retrieval", "--dataset", "nope", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == from_train == (
        "e2-plugins: error: unknown dataset 'nope'; installed product datasets: amazon-fashion, catalog, fashiongen, "
        "synthetic\n")
    assert not (tmp_path / "run").exists()


def _catalog(folder: Path) -> Path:
    """Three products in a catalog file, with their images."""
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 20, 20)).save(folder / f"p{i}.png")
    (folder / "products.csv").write_text("image,text,brand\np0.png,Coat,A\np1.png,Hat,B\np2.png,Bag,C\n")
    return folder / "products.csv"


@pytest.mark.parametrize("task", ["retrieval", "caption"])
def test_a_bad_encoder_is_refused_before_the_baseline_does_any_work(task, tmp_path, capsys, tiny_checkpoints):
    out = tmp_path / "out"
    assert main(["run", task, "--dataset", "catalog", "--data-root", str(_catalog(tmp_path)), "--baseline",
                 tiny_checkpoints["clip"], "--encoder", "nope:xx", "--out", str(out), "--device", "cpu"]) == 2
    assert "encoder 'nope:xx' is none of" in capsys.readouterr().err
    assert not any(p.is_file() for p in out.rglob("*"))      # no embeddings cached, no decoder trained


def test_an_out_that_is_a_file_is_named_not_a_traceback(tmp_path, capsys, tiny_checkpoints):
    taken = tmp_path / "results.txt"
    taken.write_text("keep me")
    assert main(["run", "retrieval", "--dataset", "catalog", "--data-root", str(_catalog(tmp_path)), "--baseline",
                 tiny_checkpoints["clip"], "--encoder", tiny_checkpoints["e2"], "--out", str(taken)]) == 2
    assert capsys.readouterr().err == f"e2-plugins: error: {taken}: File exists\n"
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:7", "device 'cuda:7'"),
])
def test_a_device_that_is_not_there_is_named(device, message, tmp_path, capsys, tiny_checkpoints):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(["run", "embed", "--texts", str(_catalog(tmp_path)), "--encoder", tiny_checkpoints["clip"],
                 "--device", device, "--out", str(tmp_path / "e.safetensors")]) == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_ends_in_one_line_and_status_130(monkeypatch, capsys):
    fake_entry_points(monkeypatch, EntryPoint("slow", "tests_plugin_slow:run", registry.TASK_GROUP))

    def run():
        """Interrupted by the user."""
        raise KeyboardInterrupt

    monkeypatch.setitem(__import__("sys").modules, "tests_plugin_slow", type("M", (), {"run": staticmethod(run)}))
    assert main(["run", "slow"]) == 130
    assert capsys.readouterr().err == ("\ne2-plugins: interrupted (run the same command again: train continues from "
                                       "its last checkpoint, embed --shard-size from its last finished shard)\n")
